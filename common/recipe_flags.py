"""Command-line flags generated from the Recipe model: one flag per recipe field, plus `--set`.

Every field `name` of `fedcmp.common.recipe.Recipe` becomes `--name-with-dashes VALUE`
(`lr` -> `--lr`, `batch_size` -> `--batch-size`); a field in seconds (`round_timeout_s`) also
answers to its name without the unit (`--round-timeout`). Values of text fields are taken as
written; all other values are read as YAML, so `--strategy-params '{rho: 0.3}'` replaces a
mapping (an optional field is cleared in a --config file, not by a flag). `--set FIELD=VALUE` (repeatable) does
the same by field name, and `--set FIELD.KEY=VALUE` sets one entry of a mapping field
(`--set strategy_params.rho=0.3`). The recipe itself validates the values and names the field
of a bad one.
"""
from __future__ import annotations

import argparse
from typing import Any, Literal, get_origin

import yaml

from fedcmp.common.recipe import Recipe, RecipeError

DEST_PREFIX = "recipe__"  # argparse dest of a field's flag, so recipe flags never clash with a tool's own
SET_DEST = "recipe_set"


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every Recipe field, and `--set`, in a "recipe" group of `parser`."""
    group = parser.add_argument_group("recipe", "override one field of the recipe (or of --config)")
    for name, field in Recipe.model_fields.items():
        flags = [f"--{name.replace('_', '-')}"]
        if name.endswith("_s"):
            flags.append(f"--{name[:-2].replace('_', '-')}")
        default = field.get_default(call_default_factory=True)
        group.add_argument(*flags, dest=DEST_PREFIX + name, metavar=_metavar(name),
                           help=f"recipe field {name} (default: {default!r})")
    group.add_argument("--set", dest=SET_DEST, action="append", default=[], metavar="FIELD[.KEY]=VALUE",
                       help="set a recipe field, or one entry of a mapping field: --set strategy_params.rho=0.3 "
                            "(repeatable; VALUE is read as YAML)")


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields the command line sets: {field: value, "field.key": value}, for `load_recipe`."""
    overrides: dict[str, Any] = {}
    for assignment in getattr(args, SET_DEST):
        key, equals, raw = assignment.partition("=")
        name = key.partition(".")[0]
        if not equals or name not in Recipe.model_fields:
            raise RecipeError(f"--set {assignment!r}: expected FIELD=VALUE or FIELD.KEY=VALUE with FIELD one of "
                              f"{', '.join(Recipe.model_fields)}")
        overrides[key] = _parse(name, raw, key != name)
    for name in Recipe.model_fields:
        raw = getattr(args, DEST_PREFIX + name)
        if raw is not None:
            overrides[name] = _parse(name, raw, False)
    return overrides


def _is_text(name: str) -> bool:
    annotation = Recipe.model_fields[name].annotation
    return annotation is str or get_origin(annotation) is Literal


def _metavar(name: str) -> str:
    annotation = Recipe.model_fields[name].annotation
    if get_origin(annotation) is Literal:
        return "{" + ",".join(str(choice) for choice in annotation.__args__) + "}"
    return name.upper()


def _parse(name: str, raw: str, entry: bool) -> Any:
    """A flag's text as the value the recipe validates: text fields verbatim, the rest as YAML."""
    if _is_text(name) and not entry:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe field {name}: cannot read {raw!r}: {error}") from error
