"""Fault test: the coordinator is killed (SIGKILL) mid-run and restarted with --resume; clients carry on."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def committed_round(state: Path) -> int:
    try:
        return json.loads((state / "run.json").read_text())["committed_round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_killed_coordinator_resumes_and_clients_finish(processes, two_client_data: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    flags = ("--rounds", "3", "--min-clients", "2", "--local-steps", "6", "--strategy", "fedavgm")
    server, address = processes.server(state, *flags)
    clients = [processes.client(f"client_{i}", address, two_client_data / f"client_{i}") for i in range(2)]
    wait_for(lambda: committed_round(state) >= 1, 180, "round 1 to commit")
    server.send_signal(signal.SIGKILL)
    server.wait()
    version = committed_round(state)

    port = address.rsplit(":", 1)[1]
    restarted, _ = processes.server(state, "--resume", "--port", port)
    assert [processes.wait(c) for c in clients] == [0, 0], [c.log_path.read_text()[-2000:] for c in clients]
    assert processes.wait(restarted) == 0
    record = json.loads((state / "run.json").read_text())
    assert record["done"] and [row["round"] for row in record["history"]] == [1, 2, 3]
    assert all(row["participants"] == 2 for row in record["history"])
    log = restarted.log_path.read_text()
    assert f"resuming {state} at round {version + 1}" in log
    assert any("registering again" in c.log_path.read_text() or "unavailable" in c.log_path.read_text()
               for c in clients)
