"""The /proc sampler counts a whole process tree: memory of children, CPU of grandchildren."""
from __future__ import annotations

import subprocess
import sys
import time

from proc_sampler import Sample, TreeSampler, descendants

# The root holds 200 MB and starts a middle process, which starts a leaf burning CPU; the leaf
# prints its own CPU seconds, then lingers so that the sampler sees its final count.
LEAF = "import time\nx = 0\nfor i in range(3_000_000): x += i\nprint(time.process_time(), flush=True)\ntime.sleep(0.5)"
RUN = "import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True).stdout.strip())"
ROOT = f"""
block = bytearray(200 * 2**20)
for i in range(0, len(block), 4096): block[i] = 1
{RUN.format(code=RUN.format(code=LEAF))}
"""


def test_sampler_counts_the_tree_memory_and_cpu() -> None:
    root = subprocess.Popen([sys.executable, "-c", ROOT], stdout=subprocess.PIPE, text=True)
    with TreeSampler(root.pid, interval_s=0.05) as sampler:
        leaf_cpu = float(root.communicate(timeout=120)[0])
    assert sampler.peak_rss() >= 200 * 2**20  # the root's block
    assert sampler.cpu_between(sampler.samples[0].wall, sampler.samples[-1].wall) >= leaf_cpu


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
    sampler = TreeSampler(root=0)
    sampler.samples = [Sample(10.0, 1.0, 0), Sample(12.0, 3.0, 5), Sample(14.0, 3.0, 7)]
    assert sampler.cpu_between(11.0, 13.0) == 1.0  # 2.0 at t = 11, 3.0 at t = 13
    assert sampler.cpu_between(0.0, 99.0) == 2.0  # clamped to the samples
    assert sampler.peak_rss(11.0, 13.0) == 5
