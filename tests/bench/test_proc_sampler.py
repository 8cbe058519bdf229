"""The /proc sampler counts whole process trees: memory of children, CPU of grandchildren, mapped files apart."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from proc_sampler import Reading, Sample, TreeSampler, descendants

# The root holds 200 MB and starts a middle process, which starts a leaf burning CPU; the leaf
# prints its own CPU seconds, then lingers so that the sampler sees its final count.
LEAF = "import time\nx = 0\nfor i in range(3_000_000): x += i\nprint(time.process_time(), flush=True)\ntime.sleep(0.5)"
RUN = ("import subprocess, sys\n"
       "print(subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True).stdout.strip())")
ROOT = f"""
block = bytearray(200 * 2**20)
for i in range(0, len(block), 4096): block[i] = 1
{RUN.format(code=RUN.format(code=LEAF))}
"""


def test_sampler_counts_the_tree_memory_and_cpu() -> None:
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdout=subprocess.PIPE, text=True)
    with TreeSampler({"tree": root.pid, "other": os.getpid()}, interval_s=0.05) as sampler:
        leaf_cpu = float(root.communicate(timeout=120)[0])
    first, last = sampler.samples[0].wall, sampler.samples[-1].wall
    assert sampler.peak_anon("tree") >= 200 * 2**20  # the root's block, anonymous memory
    assert sampler.peak_rss("tree") >= sampler.peak_anon("tree")
    tree_cpu = sampler.cpu_between("tree", first, last)
    assert tree_cpu >= leaf_cpu
    parts = sampler.cpu_between("tree", first, last, "user_s") + sampler.cpu_between("tree", first, last, "system_s")
    assert tree_cpu == pytest.approx(parts)
    assert sampler.cpu_between("other", first, last) >= tree_cpu  # this process's tree holds the root's
    assert sampler.machine_busy_between(first, last) >= tree_cpu


def test_anonymous_memory_leaves_out_mapped_files(tmp_path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"\1" * (100 * 2**20))
    reader = ("import mmap, sys, time\nf = open(sys.argv[1], 'rb')\nm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n"
              "sum(m[i] for i in range(0, len(m), 4096))\nprint('mapped', flush=True)\ntime.sleep(30)")
    process = subprocess.Popen([sys.executable, "-c", reader, str(blob)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "mapped"
        sample = TreeSampler({"reader": process.pid}).sample().trees["reader"]
        assert sample.rss_bytes - sample.anon_bytes >= 100 * 2**20  # the mapped file is resident, not anonymous
        assert sample.anon_bytes < 100 * 2**20
    finally:
        process.kill()
        process.wait(timeout=30)


def test_descendants_finds_grandchildren_only() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                              "subprocess.run([sys.executable, '-c', 'import time; time.sleep(30)'])"])
    try:
        deadline = time.monotonic() + 30
        while not descendants(child.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        below = descendants(child.pid)
        assert len(below) == 1 and child.pid not in below
    finally:
        for pid in descendants(child.pid):
            subprocess.run(["kill", str(pid)], check=False)
        child.wait(timeout=30)


def test_cpu_between_interpolates_between_samples() -> None:
    sampler = TreeSampler({"tree": 0})
    sampler.samples = [Sample(10.0, 100.0, {"tree": Reading(1.0, 0.0, 0, 0)}),
                       Sample(12.0, 104.0, {"tree": Reading(2.0, 1.0, 5, 4)}),
                       Sample(14.0, 104.0, {"tree": Reading(2.0, 1.0, 7, 3)})]
    assert sampler.cpu_between("tree", 11.0, 13.0) == 1.0  # 2.0 at t = 11, 3.0 at t = 13
    assert sampler.cpu_between("tree", 11.0, 13.0, "system_s") == 0.5
    assert sampler.cpu_between("tree", 0.0, 99.0) == 2.0  # clamped to the samples
    assert sampler.machine_busy_between(11.0, 13.0) == 2.0
    assert sampler.peak_rss("tree", 11.0, 13.0) == 5 and sampler.peak_anon("tree") == 4
