"""Strategy registry: the one place that maps a recipe's `strategy` name to a class.

Adding a strategy is one module defining a `NormBounded` class with a `name` attribute and
keyword-only, defaulted hyper-parameters, plus one line in `_CLASSES`. Every strategy also
accepts `norm_bound` (base.bounded), which the registry validates and sets, unless the class
`pinned` it (a class's `pinned` keys, the Fed-CMP ablations', are never accepted).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from .base import NORM_BOUND_KEY, Strategy, real_hyper
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavg_equal import FedAvgEqual
from .fedavgm import FedAvgM
from .fedcmp import (FedCMP, FedCMPMeanFusion, FedCMPNoMomentum, FedCMPNoNormBound, FedCMPNoReliability,
                     FedCMPSampleWeights)
from .fednova import FedNova
from .fedprox import FedProx
from .fedyogi import FedYogi

_CLASSES: tuple[type, ...] = (
    FedAvg,
    FedAvgEqual,
    FedProx,
    FedAvgM,
    FedNova,
    FedAdam,
    FedYogi,
    FedAdagrad,
    FedCMP,
    FedCMPNoReliability,
    FedCMPNoMomentum,
    FedCMPMeanFusion,
    FedCMPSampleWeights,
    FedCMPNoNormBound,
)
_REGISTRY: dict[str, type] = {cls.name: cls for cls in _CLASSES}


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def hyper_parameters(name: str) -> dict[str, object]:
    """The hyper-parameters `build_strategy(name, ...)` accepts, with their defaults.

    They are the keyword-only parameters of the nearest `__init__` in the class's MRO that
    declares any, plus `norm_bound`, minus those the class `pinned` (the Fed-CMP ablations).
    """
    cls = _lookup(name)
    accepted: dict[str, object] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        accepted = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        if accepted:
            break
    accepted[NORM_BOUND_KEY] = cls.norm_bound
    return {key: default for key, default in accepted.items() if key not in _pinned(cls)}


def build_strategy(name: str, params: Mapping[str, float] | None = None) -> Strategy:
    """Instantiate strategy `name` with the recipe's `strategy_params` (missing keys: defaults)."""
    cls = _lookup(name)
    accepted = hyper_parameters(name)
    given = dict(params or {})
    pinned = _pinned(cls)
    clash = sorted(given.keys() & pinned.keys())
    if clash:
        fixed = ", ".join(f"{key} = {pinned[key]}" for key in clash)
        raise ValueError(f"strategy {name!r} pins {fixed}; do not pass {clash}; accepted: {sorted(accepted)}")
    unknown = sorted(given.keys() - accepted.keys())
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {unknown} for strategy {name!r}; accepted: {sorted(accepted) or 'none'}"
        )
    norm_bound = given.pop(NORM_BOUND_KEY, None)
    try:
        strategy = cls(**given)  # sets a pinned norm_bound itself
        strategy.norm_bound = real_hyper(NORM_BOUND_KEY, strategy.norm_bound if norm_bound is None else norm_bound,
                                         "> 0 (inf: no bound)", lambda v: v > 0.0)
    except ValueError as err:
        raise ValueError(f"strategy {name!r}: {err}; accepted hyper-parameters: {sorted(accepted)}") from err
    return strategy


def _pinned(cls: type) -> dict[str, float]:
    """The hyper-parameters `cls` fixes (the Fed-CMP ablations'), `norm_bound` possibly among them."""
    return getattr(cls, "pinned", {})


def _lookup(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(available_strategies())}")
    return _REGISTRY[name]
