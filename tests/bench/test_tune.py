"""tune.py's choice: the best validation score, and for Fed-CMP only among the settings that meet the robustness target."""
from __future__ import annotations

import pytest
from tune import ROBUSTNESS_TARGET, choose, worst_shift_ratios

GRID = {
    "fedavgm": [{"strategy_params": {"server_momentum": 0.5}}, {"strategy_params": {"server_momentum": 0.7}}],
    "fedcmp": [{"strategy_params": {"rho": 0.1}}, {"strategy_params": {"rho": 0.3}}],
}


def test_a_robust_strategy_takes_its_best_setting_among_those_meeting_the_target() -> None:
    means = {"fedavgm": [0.9, 0.8], "fedcmp": [0.80, 0.85]}  # fedcmp's better score misses the target
    worst = {"fedcmp": [ROBUSTNESS_TARGET + 0.19, ROBUSTNESS_TARGET - 0.07]}
    chosen: dict = {}
    rows = choose(GRID, means, worst, chosen)
    assert chosen == {"fedavgm": GRID["fedavgm"][1], "fedcmp": GRID["fedcmp"][1]}
    assert "| fedcmp | `{'strategy_params': {'rho': 0.1}}` | 0.8000 | 0.69 |  |" in rows
    assert "| fedcmp | `{'strategy_params': {'rho': 0.3}}` | 0.8500 | 0.43 | yes |" in rows
    assert "| fedavgm | `{'strategy_params': {'server_momentum': 0.7}}` | 0.8000 |  | yes |" in rows


def test_no_eligible_setting_is_an_error_naming_the_strategy() -> None:
    with pytest.raises(ValueError, match="no fedcmp setting meets the robustness target 0.5"):
        choose(GRID, {"fedavgm": [0.9, 0.8], "fedcmp": [0.8, 0.85]}, {"fedcmp": [0.7, 0.6]}, {})


def test_worst_shift_ratios_are_the_attack_tables_worst_column() -> None:
    worst = worst_shift_ratios({"fedcmp": [{"strategy_params": {"norm_bound": float("inf")}}, {}]})
    assert worst["fedcmp"][0] > 1.0  # without the bound the 10x random update moves it further than FedAvg
    assert worst["fedcmp"][1] <= ROBUSTNESS_TARGET  # the defaults meet the target
