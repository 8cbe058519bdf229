"""Recipe validation: files, overrides, and error messages that name the field."""
from __future__ import annotations

import json

import pytest

from fedcmp.common.recipe import Recipe, RecipeError, load_recipe


def test_defaults_are_valid_and_use_the_micro_zoo() -> None:
    recipe = load_recipe()
    assert (recipe.vision_model, recipe.llm, recipe.projector_type) == ("micro", "micro", "mlp2x_gelu")


def test_yaml_file_with_overrides(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("rounds: 7\nstrategy: fedcmp\nstrategy_params: {beta: 0.3}\n")
    recipe = load_recipe(path, {"rounds": 3, "seed": None})
    assert (recipe.rounds, recipe.strategy, recipe.strategy_params) == (3, "fedcmp", {"beta": 0.3})


def test_json_round_trip() -> None:
    recipe = Recipe(rounds=2, projector_type="linear")
    assert Recipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize("fields, message", [
    ({"rounds": 0}, "rounds: Input should be greater than or equal to 1"),
    ({"projector_type": "mlp3x"}, "unknown projector type 'mlp3x'"),
    ({"micro_batch_size": 0}, "micro_batch_size: Input should be greater than or equal to 1"),
    ({"lr_schedule": "linear"}, "lr_schedule: Input should be 'constant' or 'cosine'"),
    ({"warmup_ratio": 1.0}, "warmup_ratio: Input should be less than 1"),
    ({"batch_size": "many"}, "batch_size"),
    ({"lr": -1}, "lr: Input should be greater than 0"),
    ({"optimiser": "adamw"}, "optimiser: Extra inputs are not permitted"),
    ({"val_fraction": 1.0}, "val_fraction"),
])
def test_invalid_fields_are_named(fields, message) -> None:
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        load_recipe(overrides=fields)


def test_unreadable_and_malformed_files(tmp_path) -> None:
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(listy)


def test_local_steps_spread_one_pass_over_the_rounds() -> None:
    recipe = Recipe(rounds=4, batch_size=10, epochs=1.0)
    assert recipe.local_steps_for(400) == 10  # 40 batches over 4 rounds
    assert recipe.local_steps_for(3) == 1  # never zero
    assert Recipe(local_steps=5).local_steps_for(10_000) == 5
    assert json.loads(recipe.to_json())["rounds"] == 4


def test_batch_defaults_and_forward_batch() -> None:
    """LLaVA stage 1's schedule by default; micro-batches never exceed the effective batch."""
    recipe = load_recipe()
    assert (recipe.lr_schedule, recipe.warmup_ratio, recipe.weight_decay) == ("cosine", 0.03, 0.0)
    assert recipe.forward_batch_size == recipe.batch_size == 16  # no accumulation unless asked
    assert Recipe(batch_size=16, micro_batch_size=4).forward_batch_size == 4
    assert Recipe(batch_size=8, micro_batch_size=32).forward_batch_size == 8
