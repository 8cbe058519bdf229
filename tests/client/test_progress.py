"""Round progress: a log line every interval and at the last step, ETA at the pace so far, gauges."""
from __future__ import annotations

import logging

import pytest

from fedcmp.client.metrics import ClientMetrics
from fedcmp.client.progress import TrainingProgress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_at_its_interval_and_last_step_with_eta(caplog) -> None:
    clock, metrics = FakeClock(), ClientMetrics()
    progress = TrainingProgress(interval_s=10.0, metrics=metrics, clock=clock)
    progress.begin(round_index=2, total_steps=8)
    caplog.set_level(logging.INFO, logger="fedcmp.client")
    for step, now in enumerate([102.0, 104.0, 110.0, 112.0, 114.0, 116.0, 118.0, 120.0], start=1):
        clock.now = now
        progress.step(step, loss=1.0 / step)
    logged = [record.getMessage() for record in caplog.records]
    assert logged == ["round 2: step 3/8, loss 0.3333, 0.30 steps/s, eta 17s",  # 10 s after begin
                      "round 2: step 8/8, loss 0.1250, 0.40 steps/s, eta 0s"]  # the last step
    clock.now = 105.0
    assert progress.eta_s(1) == pytest.approx(5.0 * 7)  # 5 s for 1 step, 7 to go
    sample = metrics.registry.get_sample_value
    assert sample("fedcmp_client_round") == 2 and sample("fedcmp_client_total_steps") == 8
    assert sample("fedcmp_client_step") == 8 and sample("fedcmp_client_train_loss") == 0.125
    progress.uploaded()
    assert sample("fedcmp_client_rounds_trained_total") == 1
