"""The fedcmp side of the system benchmark end to end: a real server, no-op clients, timed rounds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import noop_client
from status_probe import Call, read_calls
from system_fedcmp import REFERENCE_STATUS, Workload, run_fedcmp, status_notes
from system_run import wait_until

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc


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
    kinds = {call.kind for call in read_calls(tmp_path / "status-calls.txt")}
    assert kinds == {"status", "health", "status_port", "reference"}  # both server ports and the idle reference
    lines = (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()
    rounds = [row for row in map(json.loads, lines) if row["event"] == "round"]
    assert [row["participants"] for row in rounds] == [3, 3]
    assert all(row["global_update_norm"] > 0 for row in rounds)  # the clients' noise moved the global


def test_reference_status_server_answers_its_fixed_status_until_terminated(tmp_path: Path) -> None:
    port_file = tmp_path / "reference.port"
    server = subprocess.Popen([sys.executable, str(REFERENCE_STATUS), "--port-file", str(port_file)])
    try:
        wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "", 60, "no port")
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            status = pb_grpc.CoordinatorStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
        assert (status.phase, status.strategy) == ("TRAINING", "reference")
        server.terminate()
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()


def test_noop_client_without_a_coordinator_fails(caplog) -> None:
    assert noop_client.main(["--server", "127.0.0.1:9", "--reconnect-budget", "0.5",
                             "--vision-hidden", "8", "--text-hidden", "16"]) == 1
    assert "noop-0000 failed" in caplog.text


def test_status_latency_counts_only_calls_made_while_training(tmp_path: Path) -> None:
    calls = tmp_path / "calls.txt"
    calls.write_text("0.500 status WAITING\n0.400 health WAITING\n"
                     + "".join(f"0.0{k} status TRAINING\n0.00{k} health TRAINING\n0.000{k} reference TRAINING\n"
                               for k in range(1, 10))
                     + "0.9 status AGGREG")
    read = read_calls(calls)
    assert len(read) == 29 and read[0] == Call(0.5, "status", "WAITING")  # the unfinished last line is left out
    notes = status_notes(read)
    assert notes["status_calls"] == 9 and notes["status_calls_all"] == 10 and notes["health_calls"] == 9
    assert notes["reference_calls"] == 9 and notes["reference_p50_s"] == 0.0005 and notes["reference_max_s"] == 0.0009
    assert notes["status_p50_s"] == 0.05 and notes["status_max_s"] == 0.09 and 0.08 < notes["status_p99_s"] <= 0.09
    assert notes["health_p50_s"] == 0.005 and notes["health_max_s"] == 0.009
