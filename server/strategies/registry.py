"""Strategy registry: the one place that maps a recipe's `strategy` name to a class.

Adding a strategy is one module defining a class with a `name` attribute and keyword-only,
defaulted hyper-parameters, plus one line in `_CLASSES`.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from .base import Strategy
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedcmp import FedCMP, FedCMPMeanFusion, FedCMPNoMomentum, FedCMPNoReliability, FedCMPSampleWeights
from .fedprox import FedProx
from .fedyogi import FedYogi

_CLASSES: tuple[type, ...] = (
    FedAvg,
    FedProx,
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
    FedCMP,
    FedCMPNoReliability,
    FedCMPNoMomentum,
    FedCMPMeanFusion,
    FedCMPSampleWeights,
)
_REGISTRY: dict[str, type] = {cls.name: cls for cls in _CLASSES}


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def hyper_parameters(name: str) -> dict[str, object]:
    """The hyper-parameters `build_strategy(name, ...)` accepts, with their defaults.

    They are the keyword-only parameters of the nearest `__init__` in the class's MRO that
    declares any, minus those the class `pinned` (the Fed-CMP ablations).
    """
    cls = _lookup(name)
    pinned = getattr(cls, "pinned", {})
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        keyword_only = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if keyword_only:
            return {key: default for key, default in keyword_only.items() if key not in pinned}
    return {}


def build_strategy(name: str, params: Mapping[str, float] | None = None) -> Strategy:
    """Instantiate strategy `name` with the recipe's `strategy_params` (missing keys: defaults)."""
    cls = _lookup(name)
    accepted = hyper_parameters(name)
    given = dict(params or {})
    unknown = sorted(given.keys() - accepted.keys())
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {unknown} for strategy {name!r}; accepted: {sorted(accepted) or 'none'}"
        )
    try:
        return cls(**given)
    except ValueError as err:
        raise ValueError(f"strategy {name!r}: {err}; accepted hyper-parameters: {sorted(accepted)}") from err


def _lookup(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(available_strategies())}")
    return _REGISTRY[name]
