"""The fedcmp side of the system benchmark end to end: a real server, no-op clients, timed rounds."""
from __future__ import annotations

import json
from pathlib import Path

import noop_client
from system_fedcmp import Workload, run_fedcmp


def test_noop_clients_go_through_every_round(tmp_path: Path) -> None:
    result = run_fedcmp(Workload(clients=3, rounds=2, vision_hidden=8, text_hidden=16, clients_per_process=2),
                        tmp_path, probe_interval_s=0.01)
    assert [r.index for r in result.rounds] == [1, 2]
    assert all(r.end >= r.start for r in result.rounds) and result.rounds[1].start >= result.rounds[0].end
    assert len(result.server_cpu_s) == 2 and all(cpu >= 0 for cpu in result.server_cpu_s)
    assert result.peak_rss_bytes >= result.baseline_rss_bytes > 0
    lines = (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()
    rounds = [row for row in map(json.loads, lines) if row["event"] == "round"]
    assert [row["participants"] for row in rounds] == [3, 3]
    assert all(row["global_update_norm"] > 0 for row in rounds)  # the clients' noise moved the global


def test_noop_client_without_a_coordinator_fails(caplog) -> None:
    assert noop_client.main(["--server", "127.0.0.1:9", "--reconnect-budget", "0.5",
                             "--vision-hidden", "8", "--text-hidden", "16"]) == 1
    assert "noop-0000 failed" in caplog.text
