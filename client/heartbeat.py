"""The client's heartbeat: while a task runs, a background thread tells the coordinator every
`heartbeat_interval_s` that this client is alive and how far it got (step, total steps, last loss).

The coordinator counts a client silent for `client_timeout_s` as gone, so a long download,
training or upload must not look like a crash. A heartbeat that fails is only logged: the
task's own calls carry the retry policy.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from types import TracebackType

Beat = Callable[[int, float], None]  # (steps done, last loss) -> send one heartbeat


class Heartbeat:
    """`with Heartbeat(beat, interval_s): ...` beats at once and then every `interval_s` until the block ends."""

    def __init__(self, beat: Beat, interval_s: float) -> None:
        self._beat = beat
        self._interval_s = interval_s
        self._step = 0
        self._loss = math.nan
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedcmp-heartbeat", daemon=True)

    def progress(self, step: int, loss: float) -> None:
        """Record the training progress the next heartbeat reports (called after each optimizer step)."""
        self._step, self._loss = step, loss

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self._beat(self._step, self._loss)
            if self._stop.wait(self._interval_s):
                return
