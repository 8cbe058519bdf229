"""What an upload header may claim: its sample count and its metrics, checked before any byte.

A client's `num_samples` weighs its update in the aggregation, its `steps` metric divides that
weight under FedNova (n_k / tau_k), and its metrics are averaged into the round's record
(run.json, status). All are bounded here, so one client can neither weigh more than the task it
was given allows nor grow, poison or overwrite the server's record: `steps` lies in 1..the task's
local steps, and `num_samples` in 1..steps x batch size, so n_k / tau_k never exceeds the batch.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from fedcmp.server.strategies.fednova import STEPS_METRIC

MAX_METRICS = 32
METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")  # matched whole (fullmatch): no newline sneaks in
# What the coordinator itself writes into a round's record: no client metric may take these names.
SERVER_ROUND_FIELDS = frozenset({"round", "participants", "clients", "duration_s", "aggregation_s",
                                 "global_update_norm", "event", "global_version", "evaluated_clients"})


def upload_header_problem(num_samples: int, metrics: Mapping[str, float], local_steps: int, batch_size: int) -> str:
    """Why an upload header's claims are refused ('' when they are acceptable).

    local_steps: the steps of the client's TRAIN task; a client that reports no `steps` metric
    is taken to have made all of them.
    """
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics; at most {MAX_METRICS} are accepted"
    for name, value in metrics.items():
        if not METRIC_NAME.fullmatch(name):
            return (f"metric name {name[:80]!r} is not allowed: a letter, then letters, digits, '_', '.', '-' "
                    "(max 64 characters)")
        if name in SERVER_ROUND_FIELDS:
            return f"metric name {name!r} is reserved for the coordinator's round record"
        if not math.isfinite(value):
            return f"metric {name} = {value} is not finite"
    steps = metrics.get(STEPS_METRIC, float(local_steps))
    if not (float(steps).is_integer() and 1 <= steps <= local_steps):
        return f"metric {STEPS_METRIC} = {steps} is not a whole number in 1..{local_steps} (the task's local steps)"
    max_samples = int(steps) * batch_size
    if not 1 <= num_samples <= max_samples:
        return (f"num_samples {num_samples} is outside 1..{max_samples} (the {int(steps)} steps made times the "
                f"batch size {batch_size})")
    return ""
