"""The robustness targets: how far hostile clients move an aggregate, against FedAvg's shift."""
from __future__ import annotations

import pytest

from fedcmp.sim.attacks import ATTACKS, CLIENTS, median_ratio, shift_ratio, table

TARGET = 0.5  # at most half of FedAvg's shift, median over 10 seeds, the strategy's defaults


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.name for attack in ATTACKS])
def test_fedcmp_defaults_meet_the_robustness_target(attack) -> None:
    assert median_ratio("fedcmp", {}, attack) <= TARGET


def test_without_the_norm_bound_a_large_random_update_misses_the_target() -> None:
    # What the bound is for: unbounded, the overlap-aware fusion honours a 10x random update's move.
    random_10x = next(attack for attack in ATTACKS if "random update at 10x" in attack.name)
    assert median_ratio("fedcmp", {"norm_bound": float("inf")}, random_10x) > TARGET


def test_fedavg_is_the_unit_and_attacks_replace_honest_clients() -> None:
    for attack in ATTACKS:
        assert attack.hostile < CLIENTS / 2
        assert shift_ratio("fedavg", {}, attack, seed=0) == pytest.approx(1.0)


def test_table_has_a_row_per_setting_and_a_column_per_attack() -> None:
    lines = table([("fedavg", {}), ("fedavg", {"norm_bound": 2.0})]).splitlines()
    assert lines[0] == "| strategy | " + " | ".join(attack.name for attack in ATTACKS) + " |"
    assert lines[2] == "| fedavg | " + " | ".join(["1.00"] * len(ATTACKS)) + " |"
    assert lines[3].startswith("| fedavg `{'norm_bound': 2.0}` | ") and len(lines) == 4
