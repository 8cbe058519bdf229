"""Real `fedcmp-server` / `fedcmp-client` processes on 127.0.0.1, always stopped by the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


class Processes:
    """Starts the project's console scripts and guarantees none outlives the test."""

    def __init__(self, logs: Path, cache_dir: Path) -> None:
        self.logs = logs
        self.cache_dir = cache_dir
        self.started: list[subprocess.Popen] = []
        logs.mkdir(parents=True, exist_ok=True)

    def launch(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Any command (e.g. torchrun around a client), logged as `name`, stopped with the others."""
        return self._spawn(name, argv, env)

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**os.environ, "FEDCMP_CACHE": str(self.cache_dir), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        process.log_path = self.logs / f"{name}.log"  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    def server(self, state_dir: Path, *flags: str, exit_when_done: bool = True) -> tuple[subprocess.Popen, str]:
        """A coordinator on a free port (a later `--port N` in `flags` pins it), once it listens; it exits at
        DONE unless `exit_when_done` is False (then it serves status until the test stops it)."""
        port_file = state_dir.parent / f"{state_dir.name}.port"
        port_file.unlink(missing_ok=True)
        name = "server" if not any(p.log_path.name.startswith("server") for p in self.started) else \
            f"server-{len(self.started)}"
        process = self._spawn(name, [str(BIN / "fedcmp-server"), "--host", "127.0.0.1", "--port", "0",
                                     "--port-file", str(port_file), "--state-dir", str(state_dir),
                                     *(["--exit-when-done"] if exit_when_done else []), *flags])
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, f"server died: {process.log_path.read_text()}"  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        return process, f"127.0.0.1:{port_file.read_text().strip()}"

    def client(self, name: str, address: str, data: Path, *flags: str) -> subprocess.Popen:
        return self._spawn(name, [str(BIN / "fedcmp-client"), "--server", address, "--data", str(data),
                                  "--cache-dir", str(self.cache_dir), "--threads", "1", "--no-progress",
                                  "--reconnect-budget", "60", *flags])

    def status(self, address: str) -> dict:
        out = subprocess.run([str(BIN / "fedcmp-status"), "--server", address, "--json"], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def wait(self, process: subprocess.Popen, timeout: float = 300) -> int:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{process.args[0]} did not finish; log:\n{process.log_path.read_text()[-3000:]}")  # type: ignore[attr-defined]

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def processes(tmp_path: Path, micro_zoo) -> Iterator[Processes]:
    launcher = Processes(tmp_path / "logs", micro_zoo.root.parent)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="session")
def two_client_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fedcmp.common.datagen import generate_federation

    return generate_federation(tmp_path_factory.mktemp("federation") / "data", "iid", num_clients=2,
                               samples_per_client=96, test_samples=40, seed=3)


@pytest.fixture(scope="session")
def other_vision_tower(tmp_path_factory: pytest.TempPathFactory, micro_zoo) -> Path:
    """A CLIP vision tower narrower than the micro zoo's: its projector cannot match."""
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionConfig, CLIPVisionModel

    reference = AutoConfig.from_pretrained(micro_zoo.vision_path)
    config = CLIPVisionConfig(**{**reference.to_dict(), "hidden_size": reference.hidden_size - 16,
                                 "intermediate_size": 2 * (reference.hidden_size - 16)})
    path = tmp_path_factory.mktemp("odd_vision")
    CLIPVisionModel(config).save_pretrained(path)
    AutoImageProcessor.from_pretrained(micro_zoo.vision_path).save_pretrained(path)
    return path
