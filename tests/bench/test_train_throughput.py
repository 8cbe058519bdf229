"""bench-train runs end to end at a toy size: both objectives agree, and every loop is reported."""
from __future__ import annotations

import re
import sys

import pytest

import bench_train_throughput


def test_bench_train_runs_and_both_sides_compute_the_same_loss(monkeypatch: pytest.MonkeyPatch, capsys,
                                                                micro_zoo) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_train_throughput.py", "--samples", "4", "--batch-size", "2",
                                      "--steps", "1", "--repeats", "1", "--workers", "1",
                                      "--cache-dir", str(micro_zoo.root.parent)])
    bench_train_throughput.main()
    out = capsys.readouterr().out
    losses = re.search(r"fedcmp cache on ([\d.]+), cache off ([\d.]+) .* plain transformers ([\d.]+)", out)
    assert losses, out
    cache_on, cache_off, plain = map(float, losses.groups())
    assert cache_on == cache_off  # the same bf16-rounded features, cached or live
    assert plain == pytest.approx(cache_on, rel=1e-3)  # fp32 features on the plain side
    for loop in ("plain transformers median", "fedcmp cache on  median", "fedcmp cache off median"):
        assert out.count(loop) == 2, out  # by wall clock and by CPU time
    assert out.count("one batch, CPU time:") == 5  # inputs, whole tower, fedcmp features, cached step, plain step
