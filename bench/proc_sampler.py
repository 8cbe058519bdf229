"""CPU time and resident memory of process trees and the machine's busy time, sampled from /proc (Linux).

A tree is a root process and every process that has been its descendant while sampled (a
process re-parented to init after its parent died still counts). Each sample records the wall
time, the machine's busy CPU seconds so far (all processes, /proc/stat) and, per named tree,
its user and system CPU seconds so far (every process ever seen, at its last sighting), its
summed resident set size and the anonymous part of it (resident less file-backed and shared
pages: what memory-mapped files do not explain). One scan of /proc serves every tree.
CPU of a process that lives less than one interval, and the last interval of every process,
is missed; RSS peaks shorter than an interval are missed too, so peaks are lower bounds.
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Reading:
    """One tree at one instant."""

    user_s: float  # user CPU seconds of the tree so far
    system_s: float  # system (kernel) CPU seconds of the tree so far
    rss_bytes: int  # summed VmRSS of the tree's live processes
    anon_bytes: int  # summed resident - shared (file-backed and shmem) pages

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s


@dataclass(frozen=True)
class Sample:
    wall: float  # time.time()
    machine_busy_s: float  # busy CPU seconds of the whole machine since boot, every core
    trees: dict[str, Reading]


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, user seconds, system seconds) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS  # ppid, utime, stime


def _memory(pid: int) -> tuple[int, int]:
    """(resident, resident less shared) bytes of a process; zeros once it is gone."""
    try:
        resident, shared = Path(f"/proc/{pid}/statm").read_text().split()[1:3]
    except (OSError, ValueError):
        return 0, 0
    return int(resident) * PAGE_BYTES, (int(resident) - int(shared)) * PAGE_BYTES


def machine_busy_s() -> float:
    """CPU seconds every core has spent on anything but idle and I/O wait since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / CLOCK_TICKS  # user nice system idle iowait irq softirq steal


def descendants(root: int) -> set[int]:
    """Every live process below `root` (by parent pid), not `root` itself."""
    parents = {pid: stat[0] for pid in _pids() if (stat := _stat(pid)) is not None}
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def live_descendants_cpu_s(root: int) -> float:
    """User + system CPU seconds so far of the live processes below `root` (not yet reaped)."""
    return sum(stat[1] + stat[2] for pid in descendants(root) if (stat := _stat(pid)) is not None)


class TreeSampler:
    """Samples the trees of `roots` (name -> root pid) every `interval_s` until `stop()`; a context manager."""

    def __init__(self, roots: Mapping[str, int], interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._members: dict[str, set[int]] = {name: {root} for name, root in roots.items()}
        self._cpu: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in roots}  # at last sighting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

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
        memory: dict[int, tuple[int, int]] = {}
        trees = {}
        for name, members in self._members.items():
            grew = True
            while grew:  # add children of members until the tree is closed
                before = len(members)
                members |= {pid for pid, (ppid, _, _) in stats.items() if ppid in members}
                grew = len(members) > before
            live = [pid for pid in members if pid in stats]
            cpu = self._cpu[name]
            for pid in live:
                cpu[pid] = stats[pid][1:]
                if pid not in memory:
                    memory[pid] = _memory(pid)
            trees[name] = Reading(sum(user for user, _ in cpu.values()), sum(system for _, system in cpu.values()),
                                  sum(memory[pid][0] for pid in live), sum(memory[pid][1] for pid in live))
        sample = Sample(time.time(), machine_busy_s(), trees)
        self.samples.append(sample)
        return sample

    def peak_rss(self, tree: str, start: float = 0.0, end: float = float("inf")) -> int:
        return max((s.trees[tree].rss_bytes for s in self.samples if start <= s.wall <= end), default=0)

    def peak_anon(self, tree: str, start: float = 0.0, end: float = float("inf")) -> int:
        return max((s.trees[tree].anon_bytes for s in self.samples if start <= s.wall <= end), default=0)

    def cpu_between(self, tree: str, start: float, end: float, part: str = "cpu_s") -> float:
        """CPU seconds of `tree` between two wall times (linear between samples); `part` "user_s" or
        "system_s" for one kind."""
        def reading(sample: Sample) -> float:
            return getattr(sample.trees[tree], part)

        return self._at(end, reading) - self._at(start, reading)

    def machine_busy_between(self, start: float, end: float) -> float:
        return self._at(end, lambda s: s.machine_busy_s) - self._at(start, lambda s: s.machine_busy_s)

    def _at(self, wall: float, value: Callable[[Sample], float]) -> float:
        walls = [s.wall for s in self.samples]
        i = bisect.bisect_left(walls, wall)
        if i == 0:
            return value(self.samples[0])
        if i == len(walls):
            return value(self.samples[-1])
        before, after = self.samples[i - 1], self.samples[i]
        share = (wall - before.wall) / (after.wall - before.wall) if after.wall > before.wall else 1.0
        return value(before) + share * (value(after) - value(before))


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
