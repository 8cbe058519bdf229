"""Aggregation that never yields a bad global, whatever the clients sent.

`aggregate_safely` runs the strategy over a round's uploads. When the strategy raises, or the
new global holds NaN/inf, the round is aggregated again without the offending update(s),
found in this order:

1. screening: an update whose tensors differ from the global's keys/shapes, hold NaN/inf, or
   that claims fewer than one sample;
2. leave-one-out: the single update without which the others aggregate to a finite global;
3. otherwise the update farthest from the global (largest ||W_k - W||_F, the likeliest to
   overflow the strategy's float32 accumulations) is dropped, and 2 is tried again.

The strategy's state is restored before every retry, so failed attempts leave no trace in its
momentum or moments. When no subset aggregates, `new_global` is None: the round keeps the old
global. Every exclusion carries a reason for the log and the round's status row.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedcmp.server.store import SpilledUpdates, SpilledUpload
from fedcmp.server.strategies import Strategy

log = logging.getLogger("fedcmp.server")

Params = dict[str, Tensor]


@dataclass
class Outcome:
    new_global: Params | None  # None: nothing could be aggregated, keep the old global
    excluded: dict[str, str] = field(default_factory=dict)  # client id -> why its update was left out


def aggregate_safely(strategy: Strategy, current: Params, uploads: Sequence[SpilledUpload]) -> Outcome:
    """The strategy's new global from `uploads`, without the updates that make it fail (see the module doc)."""
    snapshot = strategy.state_dict()
    new_global, failure = _attempt(strategy, current, uploads)
    if new_global is not None:
        return Outcome(new_global)
    log.error("aggregation failed (%s); looking for the offending update(s)", failure)
    excluded: dict[str, str] = {}
    distances: dict[str, float] = {}
    for upload in uploads:
        reason, distances[upload.client_id] = screen(current, upload)
        if reason:
            excluded[upload.client_id] = reason
    remaining = [upload for upload in uploads if upload.client_id not in excluded]
    while remaining:
        strategy.load_state_dict(snapshot)
        new_global, failure = _attempt(strategy, current, remaining)
        if new_global is not None:
            return Outcome(new_global, excluded)
        for culprit in remaining if len(remaining) > 1 else ():
            strategy.load_state_dict(snapshot)
            new_global, _ = _attempt(strategy, current, [upload for upload in remaining if upload is not culprit])
            if new_global is not None:
                excluded[culprit.client_id] = f"the others aggregate without it ({failure})"
                return Outcome(new_global, excluded)
        farthest = max(remaining, key=lambda upload: distances[upload.client_id])
        excluded[farthest.client_id] = (f"farthest from the global (distance {distances[farthest.client_id]:.3g}) "
                                        f"in a round that failed: {failure}")
        remaining.remove(farthest)
    strategy.load_state_dict(snapshot)
    return Outcome(None, excluded)


def _attempt(strategy: Strategy, current: Params, uploads: Sequence[SpilledUpload]) -> tuple[Params | None, str]:
    """(new global, "") or (None, why not)."""
    try:
        new_global = strategy.aggregate(current, SpilledUpdates(uploads))
    except Exception as error:  # noqa: BLE001 - whatever a strategy raises on some input, the run goes on
        return None, f"{type(error).__name__}: {error}"
    if not is_finite(new_global):
        return None, "the new global holds NaN/inf"
    return new_global, ""


def is_finite(params: Params) -> bool:
    """Whether every value is finite, from each tensor's min and max: one read, no temporary as
    large as the tensor (isfinite makes one). aminmax propagates NaN, and +-inf is an extreme."""
    return all(tensor.numel() == 0 or all(math.isfinite(float(end)) for end in torch.aminmax(tensor))
               for tensor in params.values())


def screen(current: Params, upload: SpilledUpload) -> tuple[str, float]:
    """(why the update cannot be aggregated or "", its distance ||W_k - W||_F from the global)."""
    if upload.num_samples < 1:
        return f"claims {upload.num_samples} samples", math.nan
    try:
        params = SpilledUpdates([upload])[0].params
    except (OSError, ValueError) as error:
        return f"unreadable upload: {error}", math.nan
    shapes = {key: tuple(tensor.shape) for key, tensor in params.items()}
    expected = {key: tuple(tensor.shape) for key, tensor in current.items()}
    if shapes != expected:
        return "tensors do not match the projector's keys and shapes", math.nan
    if not is_finite(params):
        return "holds NaN/inf", math.nan
    squared = sum(float((params[key].double() - current[key].double()).pow(2).sum()) for key in current)
    return "", math.sqrt(squared)
