"""What an upload header may claim: its sample count and its metrics, checked before any byte.

A client's `num_samples` weighs its update in the aggregation, and its metrics are averaged
into the round's record (run.json, status). Both are bounded here, so one client can neither
weigh more than the task it was given allows nor grow, poison or overwrite the server's record.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

from fedcmp.common.recipe import Recipe

MAX_METRICS = 32
METRIC_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")  # matched whole (fullmatch): no newline sneaks in
# What the coordinator itself writes into a round's record: no client metric may take these names.
SERVER_ROUND_FIELDS = frozenset({"round", "participants", "clients", "duration_s", "aggregation_s",
                                 "global_update_norm", "event", "global_version", "evaluated_clients"})


def max_upload_samples(recipe: Recipe, registered_samples: int) -> int:
    """The most examples a round's training can touch: the TRAIN task's steps times the batch size."""
    return recipe.local_steps_for(registered_samples) * recipe.batch_size


def upload_header_problem(num_samples: int, metrics: Mapping[str, float], max_samples: int) -> str:
    """Why an upload header's claims are refused ('' when they are acceptable)."""
    if not 1 <= num_samples <= max_samples:
        return (f"num_samples {num_samples} is outside 1..{max_samples} (the round's local steps times the "
                "batch size)")
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
    return ""
