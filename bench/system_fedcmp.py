"""One fedcmp federation for the system benchmark: a real `fedcmp-server` and K no-op clients.

The server runs FedAvg for R rounds (the clients' work is the same whatever the strategy) as
its users start it, from the console script; the clients are bench/noop_client.py processes.
The benchmark follows the run through the server's WatchStatus stream (round r starts when
status first says TRAINING round r, ends when round r is in the history) and, optionally,
times GetStatus calls from a bench/status_probe.py process, on the server's two ports and on an
idle bench/reference_status.py process (the machine's floor); the calls answered in TRAINING
are those made while downloads and uploads stream.
"""
from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc
from proc_sampler import TreeSampler
from status_probe import Call, read_calls
from system_run import Launcher, Round, RunResult, measured, wait_until

BIN = Path(sys.executable).parent
NOOP_CLIENT = Path(__file__).with_name("noop_client.py")
STATUS_PROBE = Path(__file__).with_name("status_probe.py")
REFERENCE_STATUS = Path(__file__).with_name("reference_status.py")


@dataclass(frozen=True)
class Workload:
    clients: int
    rounds: int
    vision_hidden: int = 1024
    text_hidden: int = 4096
    clients_per_process: int = 1
    max_active: int = 0  # per client process; 0: all of its clients at once
    wire_dtype: str = "float32"  # the recipe's projector dtype on the wire, both ways


class RoundWatcher:
    """Stamps round starts and ends from the server's WatchStatus stream, in a thread."""

    def __init__(self, address: str, rounds: int) -> None:
        self.rounds = rounds
        self.starts: dict[int, float] = {}
        self.ends: dict[int, float] = {}
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.thread = threading.Thread(target=self._follow, name="round-watcher", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        stub = pb_grpc.CoordinatorStub(self.channel)
        try:
            for status in stub.WatchStatus(pb.StatusRequest(), wait_for_ready=True):
                now = time.time()
                if status.phase == "TRAINING":
                    self.starts.setdefault(status.round, now)
                for row in status.history:
                    self.ends.setdefault(row.round, now)
        except grpc.RpcError:
            pass  # the server stopped: the stream ends

    def done(self) -> bool:
        return len(self.ends) >= self.rounds

    def timed_rounds(self) -> list[Round]:
        return [Round(r, self.starts[r], self.ends[r]) for r in sorted(self.ends) if r in self.starts]

    def close(self) -> None:
        self.channel.close()
        self.thread.join(timeout=5)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 < q < 1), interpolated between the nearest values."""
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def status_notes(calls: list[Call]) -> dict[str, float]:
    """Latency of the GetStatus and health calls answered while a round trained (transfers streaming)."""
    notes = {"status_calls_all": float(sum(call.kind == "status" for call in calls))}
    for kind in ("status", "health", "status_port", "reference"):
        training = [call.seconds for call in calls if call.kind == kind and call.phase == "TRAINING"]
        notes[f"{kind}_calls"] = float(len(training))
        if len(training) >= 2:
            notes |= {f"{kind}_p50_s": percentile(training, 0.5), f"{kind}_p99_s": percentile(training, 0.99),
                      f"{kind}_max_s": max(training)}
    return notes


def run_fedcmp(workload: Workload, workdir: Path, probe_interval_s: float = 0.0, timeout_s: float = 900) -> RunResult:
    """Run the federation to DONE; with `probe_interval_s` > 0 also time GetStatus during training."""
    launcher = Launcher(workdir / "logs")
    port_file = workdir / "server.port"
    probe_file = workdir / "status-calls.txt"
    status_port_file = workdir / "status.port"
    reference_port_file = workdir / "reference.port"
    recipe = workdir / "recipe.yaml"
    recipe.write_text(f"wire_dtype: {workload.wire_dtype}\n")
    try:
        server = launcher.start("server", [
            str(BIN / "fedcmp-server"), "--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
            "--state-dir", str(workdir / "state"), "--config", str(recipe), "--strategy", "fedavg",
            "--rounds", str(workload.rounds), "--min-clients", str(workload.clients), "--local-steps", "1",
            "--round-timeout", str(timeout_s), "--exit-when-done", "--linger", "30",
            *(["--status-port", "0", "--status-port-file", str(status_port_file)] if probe_interval_s > 0 else [])])
        wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "" or server.poll() is not None,
                   60, "fedcmp-server did not start")
        if server.poll() is not None:
            raise RuntimeError(f"fedcmp-server exited: {launcher.log_tail('server')}")
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        with TreeSampler({"server": server.pid, "run": os.getpid()}) as sampler:
            watcher = RoundWatcher(address, workload.rounds)
            if probe_interval_s > 0:
                launcher.start("reference-status", [sys.executable, str(REFERENCE_STATUS), "--port-file",
                                                    str(reference_port_file)])
                for port_file_of, what in ((status_port_file, "fedcmp-server did not open its status port"),
                                           (reference_port_file, "the reference status server did not start")):
                    wait_until(lambda path=port_file_of: path.exists() and path.read_text().strip() != "", 60, what)
                launcher.start("status-probe", [
                    sys.executable, str(STATUS_PROBE), "--server", address, "--interval", str(probe_interval_s),
                    "--status-port-server", f"127.0.0.1:{status_port_file.read_text().strip()}",
                    "--reference-server", f"127.0.0.1:{reference_port_file.read_text().strip()}",
                    "--out", str(probe_file)])
            clients = [launcher.start(f"clients-{first}", [
                sys.executable, str(NOOP_CLIENT), "--server", address, "--prefix", "site", "--first", str(first),
                "--clients", str(min(workload.clients_per_process, workload.clients - first)),
                "--max-active", str(workload.max_active), "--vision-hidden", str(workload.vision_hidden),
                "--text-hidden", str(workload.text_hidden)])
                for first in range(0, workload.clients, workload.clients_per_process)]
            wait_until(lambda: watcher.done() or server.poll() is not None
                       or all(client.poll() is not None for client in clients), timeout_s,
                       f"fedcmp with {workload.clients} clients did not finish {workload.rounds} rounds", 0.2)
            if watcher.done():
                server.wait(timeout=120)  # DONE, then every client told so (--exit-when-done, --linger)
                for client in clients:
                    client.wait(timeout=120)
            watcher.close()
        failed = [index for index, client in enumerate(clients) if client.poll() != 0]
        if failed or server.poll() != 0:
            first = failed[0] * workload.clients_per_process if failed else 0
            raise RuntimeError(f"fedcmp run failed ({len(failed)} client processes, server {server.poll()}): "
                               f"{launcher.log_tail('server')}\n{launcher.log_tail(f'clients-{first}')}")
        result = measured("fedcmp", workload.clients, watcher.timed_rounds(), sampler)
        if probe_interval_s > 0:
            result.notes |= status_notes(read_calls(probe_file))
        return result
    finally:
        launcher.stop_all()
