"""Shared pieces of the quality benchmark and its tuning sweep: scenarios, methods, one sweep cell.

A *method* is a strategy name (run federated) or one of the bounds `centralized` / `local`,
plus recipe overrides (server learning rate, strategy hyper-parameters). Every method of a
scenario+seed runs on one `Federation`: the frozen features are encoded once and reused.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedcmp.common.datagen import generate_federation
from fedcmp.common.recipe import Recipe
from fedcmp.sim.engine import Federation, Simulator

SCENARIOS = ("iid", "concept", "domain", "quantity")
BOUNDS = ("centralized", "local")
STRATEGIES = ("fedavg", "fedavg-equal", "fedprox", "fedavgm", "fednova", "fedadam", "fedyogi", "fedadagrad", "fedcmp",
              "fedcmp-no-reliability", "fedcmp-no-momentum", "fedcmp-mean-fusion", "fedcmp-sample-weights",
              "fedcmp-no-norm-bound")
TUNED_FILE = Path(__file__).with_name("tuned.yaml")


@dataclass(frozen=True)
class Scale:
    """How big a benchmark run is."""

    clients: int = 8
    samples_per_client: int = 160
    test_samples: int = 400
    rounds: int = 10


FULL = Scale(samples_per_client=640, rounds=8)
QUICK = Scale(samples_per_client=256, test_samples=200, rounds=4)
TUNING_SEEDS = (100, 101)  # the sweep never sees the benchmark's seeds (0, 1, 2) nor any test split


@dataclass
class Method:
    name: str  # strategy name or a bound
    recipe_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return self.name if self.name in BOUNDS else "federated"

    def recipe(self, base: Recipe) -> Recipe:
        strategy = "fedavg" if self.name in BOUNDS else self.name
        return Recipe.model_validate({**base.model_dump(), "strategy": strategy, **self.recipe_overrides})


def tuned_methods(path: Path = TUNED_FILE) -> list[Method]:
    """Every strategy with the settings its validation sweep chose (defaults where none was run), then the bounds."""
    chosen = yaml.safe_load(path.read_text()) if path.exists() else {}
    return [Method(name, dict(chosen.get(name) or {})) for name in (*STRATEGIES, *BOUNDS)]


def scenario_data(cache: Path, scenario: str, seed: int, scale: Scale) -> Path:
    """The scenario's LLaVA-format federation for a seed, generated once and reused."""
    root = cache / f"{scenario}-c{scale.clients}-n{scale.samples_per_client}-t{scale.test_samples}-s{seed}"
    if not (root / "manifest.json").exists():
        generate_federation(root, scenario, scale.clients, scale.samples_per_client, scale.test_samples, seed,
                            overwrite=True)
    return root


def base_recipe(scale: Scale, seed: int, wire_dtype: str = "float32") -> Recipe:
    return Recipe(rounds=scale.rounds, seed=seed, wire_dtype=wire_dtype)


def run_method(federation: Federation, method: Method, base: Recipe) -> dict[str, Any]:
    """One method on one federation: per-round rows and final metrics."""
    result = Simulator(federation, method.recipe(base)).run(method.mode)  # type: ignore[arg-type]
    return {"method": method.name, "rounds": result.rounds, "final": result.final}


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.pstdev(finite) if len(finite) > 1 else 0.0


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
