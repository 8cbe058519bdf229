"""What one system-benchmark run measured, and the process plumbing both runners share.

A run is one federation (fedcmp's or Flower's) of K no-op clients for R rounds. Round r
lasts from the moment the server hands out round r's work until round r's aggregate exists;
the server's CPU and memory are its process tree's, sampled from /proc (proc_sampler).
"""
from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from proc_sampler import TreeSampler, descendants


@dataclass(frozen=True)
class Round:
    index: int
    start: float  # time.time()
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class RunResult:
    system: str  # "fedcmp" or "flower"
    clients: int
    rounds: list[Round]
    server_cpu_s: list[float]  # per round: the server's process tree, user + system
    server_system_s: list[float]  # per round: the system (kernel) part of it
    run_cpu_s: list[float]  # per round: every process of the benchmark (server, clients, the harness)
    machine_busy_s: list[float]  # per round: every process of the machine, ours or not
    peak_rss_bytes: int  # the server's, over the whole run
    peak_anon_bytes: int  # the server's anonymous RSS (not file-backed, not shared), over the whole run
    baseline_rss_bytes: int  # the server's when it had started and no client had come yet
    baseline_anon_bytes: int  # the anonymous part of it
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def round_s(self) -> float:
        return statistics.mean(r.seconds for r in self.rounds)

    @property
    def cpu_per_round_s(self) -> float:
        return statistics.mean(self.server_cpu_s)

    @property
    def system_per_round_s(self) -> float:
        return statistics.mean(self.server_system_s)

    @property
    def others_per_round_s(self) -> float:
        """CPU seconds per round of the benchmark's processes other than the server: mostly the clients."""
        return statistics.mean(self.run_cpu_s) - self.cpu_per_round_s

    @property
    def outside_per_round_s(self) -> float:
        """CPU seconds per round of work on the machine that is not the benchmark's."""
        return statistics.mean(self.machine_busy_s) - statistics.mean(self.run_cpu_s)


def measured(system: str, clients: int, rounds: list[Round], sampler: TreeSampler) -> RunResult:
    """The result of a run whose sampler watched the trees "server" and "run" (the benchmark's process)."""
    if not rounds:
        raise RuntimeError(f"{system} with {clients} clients completed no round")
    return RunResult(
        system, clients, rounds,
        server_cpu_s=[sampler.cpu_between("server", r.start, r.end) for r in rounds],
        server_system_s=[sampler.cpu_between("server", r.start, r.end, "system_s") for r in rounds],
        run_cpu_s=[sampler.cpu_between("run", r.start, r.end) for r in rounds],
        machine_busy_s=[sampler.machine_busy_between(r.start, r.end) for r in rounds],
        peak_rss_bytes=sampler.peak_rss("server"), peak_anon_bytes=sampler.peak_anon("server"),
        baseline_rss_bytes=sampler.samples[0].trees["server"].rss_bytes,
        baseline_anon_bytes=sampler.samples[0].trees["server"].anon_bytes)


class Launcher:
    """Starts processes in their own sessions, logs each to a file, and ends every one it started."""

    def __init__(self, logs: Path, env: dict[str, str] | None = None) -> None:
        self.logs = logs
        self.env = {**os.environ, **(env or {})}
        self.started: list[subprocess.Popen] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd,
                                   start_new_session=True)
        log.close()
        self.started.append(process)
        return process

    def log_tail(self, name: str, chars: int = 2000) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]

    def stop_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM every started process and its descendants (Flower detaches some into sessions
        of their own), then SIGKILL whatever is left after `grace_s`."""
        pids = {process.pid for process in self.started}
        for process in self.started:
            pids |= descendants(process.pid)
        _signal(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.started:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _signal(pids, signal.SIGKILL)
        for process in self.started:
            process.wait()
        self.started = []


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s:.0f}s")
        time.sleep(interval_s)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
