"""Step progress of a local round: a log line every few seconds, and the client's Prometheus gauges.

A long local round would otherwise be silent in a container log between "training N steps" and
"upload accepted". `TrainingProgress.step` is called after every optimizer step (the trainer's
`on_step`); it logs `step/total, loss, steps/s, ETA` at most every `interval_s` seconds and at
the last step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fedcmp.client.metrics import ClientMetrics

log = logging.getLogger("fedcmp.client")


class TrainingProgress:
    """Follows one round at a time: `begin(round, total)`, then `step(done, loss)` after each step."""

    def __init__(self, interval_s: float, metrics: ClientMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.metrics = metrics
        self.clock = clock
        self.round = 0
        self.total = 0
        self._started = self._last_logged = clock()

    def begin(self, round_index: int, total_steps: int) -> None:
        self.round, self.total = round_index, total_steps
        self._started = self._last_logged = self.clock()
        if self.metrics is not None:
            self.metrics.round.set(round_index)
            self.metrics.total_steps.set(total_steps)
            self.metrics.step.set(0)

    def eta_s(self, done: int) -> float:
        """Seconds left at the pace so far (steps done so far / time since `begin`)."""
        elapsed = self.clock() - self._started
        return elapsed / done * (self.total - done) if done > 0 else float("nan")

    def uploaded(self) -> None:
        """The round's upload was accepted."""
        if self.metrics is not None:
            self.metrics.rounds.inc()

    def step(self, done: int, loss: float) -> None:
        now = self.clock()
        eta = self.eta_s(done)
        if self.metrics is not None:
            self.metrics.step.set(done)
            self.metrics.loss.set(loss)
            self.metrics.eta.set(eta)
        if now - self._last_logged >= self.interval_s or done == self.total:
            self._last_logged = now
            rate = done / max(now - self._started, 1e-9)
            log.info("round %d: step %d/%d, loss %.4f, %.2f steps/s, eta %.0fs", self.round, done, self.total, loss,
                     rate, eta)
