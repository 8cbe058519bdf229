"""CPU time and resident memory of a process tree, sampled from /proc (Linux) by a thread.

The tree is a root process and every process that has been its descendant while sampled
(a process re-parented to init after its parent died still counts). Each sample records the
wall time, the tree's CPU seconds so far (user + system of every process ever seen, at its
last sighting) and the tree's summed resident set size. CPU of a process that lives less than
one interval, and the last interval of every process, is missed; RSS peaks shorter than an
interval are missed too, so the peak is a lower bound.
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sample:
    wall: float  # time.time()
    cpu_s: float  # user + system seconds of the tree so far
    rss_bytes: int  # summed VmRSS of the tree's live processes


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system seconds) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # ppid, utime + stime


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except OSError:
        return 0


def descendants(root: int) -> set[int]:
    """Every live process below `root` (by parent pid), not `root` itself."""
    parents = {pid: stat[0] for pid in _pids() if (stat := _stat(pid)) is not None}
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


class TreeSampler:
    """Samples the tree of `root` every `interval_s` until `stop()`; use as a context manager."""

    def __init__(self, root: int, interval_s: float = 0.1) -> None:
        self.root = root
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._members: set[int] = {root}
        self._cpu: dict[int, float] = {}  # pid -> CPU seconds at its last sighting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler-{root}", daemon=True)

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> Sample:
        stats = {pid: stat for pid in _pids() if (stat := _stat(pid)) is not None}
        grew = True
        while grew:  # add children of members until the tree is closed
            before = len(self._members)
            self._members |= {pid for pid, (ppid, _) in stats.items() if ppid in self._members}
            grew = len(self._members) > before
        live = [pid for pid in self._members if pid in stats]
        for pid in live:
            self._cpu[pid] = stats[pid][1]
        sample = Sample(time.time(), sum(self._cpu.values()), sum(_rss(pid) for pid in live))
        self.samples.append(sample)
        return sample

    def peak_rss(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((s.rss_bytes for s in self.samples if start <= s.wall <= end), default=0)

    def cpu_between(self, start: float, end: float) -> float:
        """Tree CPU seconds spent between two wall times (linear between samples)."""
        return self._cpu_at(end) - self._cpu_at(start)

    def _cpu_at(self, wall: float) -> float:
        walls = [s.wall for s in self.samples]
        i = bisect.bisect_left(walls, wall)
        if i == 0:
            return self.samples[0].cpu_s
        if i == len(walls):
            return self.samples[-1].cpu_s
        before, after = self.samples[i - 1], self.samples[i]
        share = (wall - before.wall) / (after.wall - before.wall) if after.wall > before.wall else 1.0
        return before.cpu_s + share * (after.cpu_s - before.cpu_s)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
