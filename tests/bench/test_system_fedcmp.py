"""The fedcmp side of the system benchmark end to end: a real server, no-op clients, timed rounds."""
from __future__ import annotations

import json
from pathlib import Path

import noop_client
from status_probe import Call, read_calls
from system_fedcmp import Workload, run_fedcmp, status_notes


def test_noop_clients_go_through_every_round(tmp_path: Path) -> None:
    workload = Workload(clients=3, rounds=2, vision_hidden=8, text_hidden=16, clients_per_process=2,
                        wire_dtype="bfloat16")
    result = run_fedcmp(workload, tmp_path, probe_interval_s=0.01, timeout_s=120)
    assert json.loads((tmp_path / "state" / "recipe.json").read_text())["wire_dtype"] == "bfloat16"
    assert [r.index for r in result.rounds] == [1, 2]
    assert all(r.end >= r.start for r in result.rounds) and result.rounds[1].start >= result.rounds[0].end
    assert len(result.server_cpu_s) == 2 and all(cpu >= 0 for cpu in result.server_cpu_s)
    assert result.peak_rss_bytes >= result.baseline_rss_bytes > 0
    assert result.notes["status_calls_all"] >= 1  # the probe process timed calls until DONE
    lines = (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()
    rounds = [row for row in map(json.loads, lines) if row["event"] == "round"]
    assert [row["participants"] for row in rounds] == [3, 3]
    assert all(row["global_update_norm"] > 0 for row in rounds)  # the clients' noise moved the global


def test_noop_client_without_a_coordinator_fails(caplog) -> None:
    assert noop_client.main(["--server", "127.0.0.1:9", "--reconnect-budget", "0.5",
                             "--vision-hidden", "8", "--text-hidden", "16"]) == 1
    assert "noop-0000 failed" in caplog.text


def test_status_latency_counts_only_calls_made_while_training(tmp_path: Path) -> None:
    calls = tmp_path / "calls.txt"
    calls.write_text("0.500 status WAITING\n0.400 health WAITING\n"
                     + "".join(f"0.0{k} status TRAINING\n0.00{k} health TRAINING\n" for k in range(1, 10))
                     + "0.9 status AGGREG")
    read = read_calls(calls)
    assert len(read) == 20 and read[0] == Call(0.5, "status", "WAITING")  # the unfinished last line is left out
    notes = status_notes(read)
    assert notes["status_calls"] == 9 and notes["status_calls_all"] == 10 and notes["health_calls"] == 9
    assert notes["status_p50_s"] == 0.05 and notes["status_max_s"] == 0.09 and 0.08 < notes["status_p99_s"] <= 0.09
    assert notes["health_p50_s"] == 0.005 and notes["health_max_s"] == 0.009
