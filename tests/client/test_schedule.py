"""The run-wide learning-rate schedule: one warm-up and one cosine decay over all rounds, stateless."""
from __future__ import annotations

import math

import pytest

from fedcmp.client.schedule import lr_factor, round_learning_rates
from fedcmp.common.recipe import Recipe


def test_cosine_with_warmup_matches_transformers_formula() -> None:
    total, ratio = 100, 0.03  # 3 warm-up steps (rounded up, as transformers' Trainer does)
    factors = [lr_factor("cosine", ratio, step, total) for step in range(total)]
    assert factors[:4] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert factors[3 + 97 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * (97 // 2) / 97)))
    assert all(a > b for a, b in zip(factors[3:], factors[4:]))  # decays monotonically after the peak
    assert 0 < factors[-1] < 1e-3
    assert lr_factor("cosine", ratio, total + 5, total) == 0.0  # past the end: stays at zero
    assert [lr_factor("constant", ratio, step, total) for step in (0, 50, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        lr_factor("linear", ratio, 0, total)


def test_rounds_continue_one_schedule() -> None:
    """Round r's steps are steps r*S .. r*S+S-1 of one schedule over rounds*S steps."""
    recipe = Recipe(rounds=4, lr=1e-3, lr_schedule="cosine", warmup_ratio=0.25)
    per_round = [round_learning_rates(recipe, r, local_steps=5) for r in range(4)]
    whole = [1e-3 * lr_factor("cosine", 0.25, step, 20) for step in range(20)]
    assert [rate for rates in per_round for rate in rates] == pytest.approx(whole)
    assert per_round[0][0] == 0.0 and max(per_round[1]) == pytest.approx(1e-3)  # one warm-up, in round 0-1
    assert per_round[3][-1] < per_round[2][-1] < per_round[1][-1]  # one decay across the rounds
    constant = recipe.model_copy(update={"lr_schedule": "constant"})
    assert round_learning_rates(constant, 2, 3) == [1e-3] * 3
