"""Client liveness: the coordinator's record of each registered client, and who counts as alive.

Every authenticated call refreshes a client's `last_seen`; while a client downloads, trains,
uploads or evaluates, its daemon also heartbeats every `heartbeat_interval_s` with its step
progress, and a waiting client's long-poll returns within that interval. A client not heard
from for `client_timeout_s` is `gone`: `sweep` marks it, the coordinator takes it out of the
open round and out of selection, and its next call (`touch`) brings it back.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedcmp.common.provenance import Backbones

GONE = "gone"

Shapes = dict[str, tuple[int, ...]]


@dataclass
class Progress:
    """What a working client last said in a heartbeat."""

    round: int = 0
    step: int = 0
    total_steps: int = 0
    last_loss: float = math.nan
    started: float = 0.0  # time.monotonic() when the coordinator handed out the task (0: unknown)

    def eta_s(self, now: float) -> float:
        """Seconds left at the pace so far ((now - started) / step per step to go); -1 while unknown."""
        if self.step < 1 or self.total_steps < 1 or self.started <= 0:
            return -1.0
        return (now - self.started) / self.step * max(self.total_steps - self.step, 0)


@dataclass
class ClientRecord:
    client_id: str
    instance_id: str  # random per client process: tells a restart from a second process
    num_samples: int
    num_eval_samples: int
    token: str
    last_seen: float
    shapes: Shapes = field(default_factory=dict)  # the projector signature it registered with
    backbones: Backbones | None = None  # what it loaded (None: an in-process caller that did not say)
    state: str = "idle"  # idle, training, uploaded, evaluating, evaluated, gone
    progress: Progress = field(default_factory=Progress)


def is_live(client: ClientRecord, now: float, timeout_s: float) -> bool:
    return client.state != GONE and now - client.last_seen <= timeout_s


def live_ids(clients: Iterable[ClientRecord], now: float, timeout_s: float) -> set[str]:
    return {client.client_id for client in clients if is_live(client, now, timeout_s)}


def sweep(clients: Iterable[ClientRecord], now: float, timeout_s: float) -> list[ClientRecord]:
    """Mark every client silent for longer than `timeout_s` as gone; returns the newly gone ones."""
    newly_gone = [client for client in clients if client.state != GONE and now - client.last_seen > timeout_s]
    for client in newly_gone:
        client.state = GONE
    return newly_gone


def touch(client: ClientRecord, now: float) -> bool:
    """Record that `client` called; True when it was gone and is back."""
    client.last_seen = now
    if client.state == GONE:
        client.state = "idle"
        return True
    return False
