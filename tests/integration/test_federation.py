"""End to end on loopback: a real coordinator and real client daemons, real gRPC, the micro zoo."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcmp.common.constants import EXIT_REFUSED


@pytest.mark.parametrize("strategy", ["fedavg", "fedcmp"])
def test_two_clients_two_rounds_lower_the_held_out_loss(processes, two_client_data: Path, tmp_path: Path,
                                                        strategy: str) -> None:
    state = tmp_path / "state"
    status_port_file = tmp_path / "status.port"
    server, address = processes.server(state, "--rounds", "2", "--min-clients", "2", "--strategy", strategy,
                                       "--local-steps", "15", "--status-port", "0", "--status-port-file",
                                       str(status_port_file), "--linger", "20")
    deadline = time.monotonic() + 60
    while not (status_port_file.exists() and status_port_file.read_text().strip()):
        assert time.monotonic() < deadline, "the status port was never opened"
        time.sleep(0.1)
    watchers = [subprocess.Popen([str(Path(sys.executable).parent / "fedcmp-status"), "--server", at, "--watch",
                                  "--json"], stdout=subprocess.PIPE, text=True)
                for at in (address, f"127.0.0.1:{status_port_file.read_text().strip()}")]  # main port, status port
    processes.started.extend(watchers)
    clients = [processes.client(f"client_{i}", address, two_client_data / f"client_{i}") for i in range(2)]
    assert [processes.wait(c) for c in clients] == [0, 0], [c.log_path.read_text()[-2000:] for c in clients]
    assert processes.wait(server) == 0
    statuses, on_status_port = ([json.loads(line) for line in watcher.stdout] for watcher in watchers)
    assert statuses[-1]["phase"] == "DONE" and statuses[-1]["round"] == 2
    assert {"WAITING", "TRAINING", "AGGREGATING", "EVALUATING"} <= {s["phase"] for s in statuses}
    # The status port's stream follows the same run from snapshots (every 0.2 s) to the same end.
    assert on_status_port[-1]["phase"] == "DONE" and on_status_port[-1]["round"] == 2
    assert {"WAITING", "TRAINING"} <= {s["phase"] for s in on_status_port}

    record = json.loads((state / "run.json").read_text())
    assert record["done"] and record["committed_round"] == 2 and record["strategy"] == strategy
    before = record["history"][0]["metrics"]["val_loss"]  # held-out loss of the initial global, measured by the clients
    after = record["final_metrics"]["val_loss"]  # held-out loss of the final global
    assert after < before - 0.02, (before, after)
    assert [row["participants"] for row in record["history"]] == [2, 2]
    assert (state / "global" / "v2.safetensors").exists()
    rows = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert [row["event"] for row in rows] == ["round", "round", "final"]


def test_a_client_with_another_projector_shape_is_refused(processes, two_client_data: Path, tmp_path: Path,
                                                          other_vision_tower: Path, micro_zoo) -> None:
    """With the widths pinned (the way to fix the shape before round 1), a mismatch is refused at registration."""
    from transformers import AutoConfig

    vision, text = (AutoConfig.from_pretrained(path) for path in (micro_zoo.vision_path, micro_zoo.llm_path))
    server, address = processes.server(tmp_path / "state", "--rounds", "1", "--min-clients", "2", "--vision-hidden",
                                       str(vision.hidden_size), "--text-hidden", str(text.hidden_size))
    first = processes.client("first", address, two_client_data / "client_0")
    deadline = time.monotonic() + 120
    while not processes.status(address)["clients"]:
        assert first.poll() is None, first.log_path.read_text()
        assert time.monotonic() < deadline, "the first client never registered"
        time.sleep(0.5)
    odd = processes.client("odd", address, two_client_data / "client_1", "--vision-model", str(other_vision_tower))
    assert processes.wait(odd, timeout=120) == EXIT_REFUSED
    log = odd.log_path.read_text()
    assert "projector shape mismatch" in log
    expected = f"linear_1.weight[{text.hidden_size}x{vision.hidden_size}]"
    offered = f"linear_1.weight[{text.hidden_size}x{AutoConfig.from_pretrained(other_vision_tower).hidden_size}]"
    assert expected in log and offered in log, log[-2000:]
    assert [c["client_id"] for c in processes.status(address)["clients"]] == ["client_0"]
