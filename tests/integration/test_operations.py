"""Operating a real coordinator: JSON logs, status and metrics after DONE, backbone refusal, SIGTERM, export."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from fedcmp.client.fingerprint import fingerprint_backbones
from fedcmp.common.constants import EXIT_REFUSED

BIN = Path(__import__("sys").executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def json_lines(path: Path) -> list[dict]:
    """Every line of a --log-format json log, parsed (fails on any line that is not one JSON object)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


@pytest.fixture(scope="module")
def same_width_vision_tower(tmp_path_factory: pytest.TempPathFactory, micro_zoo) -> Path:
    """A CLIP vision tower exactly as wide as the micro zoo's, with other (random) weights."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel

    path = tmp_path_factory.mktemp("same_width_vision")
    torch.manual_seed(123)
    CLIPVisionModel(AutoConfig.from_pretrained(micro_zoo.vision_path)).save_pretrained(path)
    AutoImageProcessor.from_pretrained(micro_zoo.vision_path).save_pretrained(path)
    return path


def test_a_run_operated_as_in_a_container(processes, two_client_data: Path, tmp_path: Path, micro_zoo,
                                          same_width_vision_tower: Path) -> None:
    state, metrics_port = tmp_path / "state", free_port()
    server, address = processes.server(state, "--rounds", "1", "--min-clients", "1", "--local-steps", "3",
                                       "--log-format", "json", "--metrics-port", str(metrics_port),
                                       exit_when_done=False)
    client = processes.client("site", address, two_client_data / "client_0", "--client-id", "site",
                              "--log-format", "json", "--progress-interval", "0")
    assert processes.wait(client) == 0, client.log_path.read_text()[-2000:]

    # The coordinator is still up after DONE: status, metrics and health answer.
    status = processes.status(address)
    assert status["phase"] == "DONE" and server.poll() is None
    expected = fingerprint_backbones("micro", "micro", micro_zoo.root.parent)
    assert status["backbones"]["vision_fingerprint"] == expected.vision_fingerprint
    assert status["clients"][0]["backbones"]["llm_fingerprint"] == expected.llm_fingerprint
    exposition = scrape(metrics_port)
    for series in ("fedcmp_build_info{", "process_cpu_seconds_total", "fedcmp_round_duration_seconds_count 1.0",
                   'fedcmp_client_last_seen_seconds{client="site"}'):
        assert series in exposition, series

    # Another vision tower of the same width: refused, both fingerprints named.
    impostor = processes.client("impostor", address, two_client_data / "client_1", "--client-id", "impostor",
                                "--vision-model", str(same_width_vision_tower))
    assert processes.wait(impostor, timeout=120) == EXIT_REFUSED
    refusal = impostor.log_path.read_text()
    assert "backbone mismatch" in refusal and expected.vision_fingerprint[:12] in refusal
    other = fingerprint_backbones(str(same_width_vision_tower), "micro", micro_zoo.root.parent)
    assert other.vision_fingerprint[:12] in refusal

    # SIGTERM: a clean stop, exit 0, no traceback.
    server.send_signal(signal.SIGTERM)
    assert processes.wait(server, timeout=60) == 0
    server_log = json_lines(server.log_path)  # every line is JSON
    messages = [entry["message"] for entry in server_log]
    assert any("serving status until stopped" in message for message in messages)
    assert not any("Traceback" in line or "CancelledError" in line for line in server.log_path.read_text().splitlines())
    client_log = json_lines(client.log_path)
    assert any("step 3/3" in entry["message"] and "eta" in entry["message"] for entry in client_log)

    exported = subprocess.run([str(BIN / "fedcmp-export"), str(state), "--out", str(tmp_path / "export"),
                               "--cache-dir", str(micro_zoo.root.parent)], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "export" / "llava" / "mm_projector.bin").exists()
    assert (tmp_path / "export" / "transformers" / "model.safetensors").exists()
