"""Recipe flags generated from the model: one per field, `--set` for mapping entries, errors naming the field."""
from __future__ import annotations

import argparse

import pytest

from fedcmp.common.recipe import Recipe, RecipeError, load_recipe
from fedcmp.common.recipe_flags import add_recipe_flags, recipe_overrides


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_recipe_flags(parser)
    return parser.parse_args(list(argv))


def test_every_recipe_field_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_recipe_flags(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert {f"--{name.replace('_', '-')}" for name in Recipe.model_fields} <= flags
    assert {"--quorum", "--lr", "--batch-size", "--projector-type", "--client-timeout-s", "--client-timeout",
            "--heartbeat-interval", "--round-timeout", "--max-clients", "--set"} <= flags


def test_flag_values_become_typed_recipe_fields(tmp_path) -> None:
    config = tmp_path / "r.yaml"
    config.write_text("strategy: fedcmp\nstrategy_params: {beta: 0.5}\nlr: 0.1\n")
    args = parse("--lr", "1e-3", "--batch-size", "8", "--quorum", "0.5", "--projector-type", "linear",
                 "--vision-model", "123", "--set", "strategy_params.rho=0.3", "--round-timeout", "30")
    recipe = load_recipe(config, recipe_overrides(args))
    assert (recipe.lr, recipe.batch_size, recipe.quorum, recipe.projector_type) == (1e-3, 8, 0.5, "linear")
    assert recipe.vision_model == "123"  # text fields are taken as written, not as YAML numbers
    assert recipe.strategy_params == {"beta": 0.5, "rho": 0.3}  # one entry set, the file's others kept
    assert recipe.round_timeout_s == 30.0


def test_a_whole_mapping_and_set_by_field_name() -> None:
    args = parse("--strategy-params", "{rho: 0.3}", "--set", "rounds=4")
    recipe = load_recipe(None, recipe_overrides(args))
    assert (recipe.strategy_params, recipe.rounds) == ({"rho": 0.3}, 4)


@pytest.mark.parametrize("argv, message", [
    (("--set", "lrate=1"), "expected FIELD=VALUE"),
    (("--set", "lr"), "expected FIELD=VALUE"),
    (("--set", "lr.x=1"), "recipe field lr is not a mapping"),
    (("--lr", "-1"), "lr: Input should be greater than 0"),
    (("--batch-size", "many"), "batch_size"),
    (("--client-timeout", "4", "--heartbeat-interval", "5"), "client_timeout_s .* at least twice"),
    (("--vision-hidden", "8"), "give both or neither"),
])
def test_bad_flags_name_the_field(argv, message) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, recipe_overrides(parse(*argv)))
