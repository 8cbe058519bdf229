"""The learning-rate schedule of a client over the whole federated run.

LLaVA's stage 1 warms up linearly over the first `warmup_ratio` of its optimizer steps and then
decays the rate along a cosine to zero (transformers' `get_cosine_schedule_with_warmup`, warm-up
steps rounded up). In a federation a client's optimizer steps are spread over the rounds: round
r (0-based) with S local steps holds the run's steps r * S .. r * S + S - 1 of `rounds * S`. The
rate is a pure function of (recipe, round, local steps, step), so a client restarted at round r
and a coordinator resumed at round r give exactly the rates of an uninterrupted run, and a
federation of K sites sees one warm-up and one decay, not one per round.
"""
from __future__ import annotations

import math

from fedcmp.common.recipe import Recipe


def lr_factor(schedule: str, warmup_ratio: float, step: int, total_steps: int) -> float:
    """Multiplier of the peak rate at optimizer step `step` (0-based) of `total_steps`."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; known: constant, cosine")
    warmup_steps = math.ceil(warmup_ratio * total_steps)
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def round_learning_rates(recipe: Recipe, round_index: int, local_steps: int) -> list[float]:
    """The rate of each of the `local_steps` optimizer steps of round `round_index` (0-based)."""
    total_steps = recipe.rounds * local_steps
    first = round_index * local_steps
    return [
        recipe.lr * lr_factor(recipe.lr_schedule, recipe.warmup_ratio, first + step, total_steps)
        for step in range(local_steps)
    ]
