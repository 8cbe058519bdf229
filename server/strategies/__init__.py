"""Aggregation strategies: Fed-CMP, its ablations and the FL baselines, one per module.

    from fedcmp.server.strategies import build_strategy
    strategy = build_strategy(recipe.strategy, recipe.strategy_params)
    new_global = strategy.aggregate(global_params, updates)
"""
from .base import ClientUpdate, Strategy
from .registry import available_strategies, build_strategy, hyper_parameters

__all__ = ["ClientUpdate", "Strategy", "available_strategies", "build_strategy", "hyper_parameters"]
