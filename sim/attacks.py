"""Hostile clients against a strategy: how far an attack moves one round's aggregate.

A synthetic round: honest clients whose deltas share a rank-2 drift, each add a rank-1 part of
their own and a little noise (10 samples and 5 local steps each), on a two-layer projector. An
attack replaces some clients with hostile ones. The *shift* of a strategy is
||aggregate(with attackers) - aggregate(without them)||; the *shift ratio* divides it by plain
FedAvg's shift under the same attack, from a fresh strategy (one round, no state). The
robustness table (`python -m fedcmp.sim.attacks`: Fed-CMP, its ablations and the baselines at
their defaults) is the median ratio over seeds 0-9; docs/algorithm.md quotes it,
`make bench-quality` writes it with the tuned settings into docs/RESULTS.md, and
tests/sim/test_attacks.py bounds it.
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fedcmp.server.strategies import ClientUpdate, build_strategy

Params = dict[str, Tensor]
SHAPES = {"linear_1.weight": (24, 16), "linear_1.bias": (24,), "linear_2.weight": (24, 24), "linear_2.bias": (24,)}
CLIENTS = 8  # honest + hostile
HONEST_SAMPLES = 10
HONEST_STEPS = 5
SEEDS = tuple(range(10))


Make = Callable[[Sequence[Params], torch.Generator], list[tuple[Params, int]]]  # honest deltas -> (delta, n_k)


@dataclass(frozen=True)
class Attack:
    """`hostile` clients replace as many honest ones; `make` builds their deltas and sample counts."""

    name: str
    hostile: int
    make: Make


def _mean(deltas: Sequence[Params]) -> Params:
    return {key: torch.stack([d[key] for d in deltas]).mean(0) for key in deltas[0]}


def _norm(delta: Params) -> float:
    return float(torch.cat([t.flatten() for t in delta.values()]).norm())


def _scaled_mean(factor: float, copies: int, samples: int = HONEST_SAMPLES) -> Make:
    """`copies` clients sending `factor` x the honest mean delta, each claiming `samples`."""
    def make(honest: Sequence[Params], gen: torch.Generator) -> list[tuple[Params, int]]:
        mean = _mean(honest)
        return [({key: factor * t for key, t in mean.items()}, samples) for _ in range(copies)]
    return make


def _random(factor: float) -> Make:
    """One client sending a Gaussian delta of `factor` x the mean honest norm."""
    def make(honest: Sequence[Params], gen: torch.Generator) -> list[tuple[Params, int]]:
        noise = {key: torch.randn(t.shape, generator=gen) for key, t in honest[0].items()}
        target = factor * statistics.fmean(_norm(d) for d in honest)
        return [({key: t * (target / _norm(noise)) for key, t in noise.items()}, HONEST_SAMPLES)]
    return make


ATTACKS = (
    Attack("one client at -10x the honest mean", 1, _scaled_mean(-10.0, 1)),
    Attack("2 of 8 colluding at -4x", 2, _scaled_mean(-4.0, 2)),
    Attack("one random update at 10x the honest norm", 1, _random(10.0)),
    Attack("one random update at 1000x the honest norm", 1, _random(1000.0)),
    Attack("-1x the honest mean claiming 100x the samples", 1, _scaled_mean(-1.0, 1, 100 * HONEST_SAMPLES)),
)


def honest_round(clients: int, gen: torch.Generator) -> tuple[Params, list[Params]]:
    """(W_t, honest deltas): a shared rank-2 drift + a rank-1 part per client + noise."""
    def low_rank(shape: tuple[int, ...], rank: int) -> Tensor:
        if len(shape) < 2:
            return torch.randn(shape, generator=gen)
        return torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen) / rank**0.5

    global_params = {key: torch.randn(shape, generator=gen) for key, shape in SHAPES.items()}
    shared = {key: 0.5 * low_rank(shape, 2) for key, shape in SHAPES.items()}
    deltas = [{key: shared[key] + 0.2 * low_rank(shape, 1) + 0.05 * torch.randn(shape, generator=gen)
               for key, shape in SHAPES.items()} for _ in range(clients)]
    return global_params, deltas


def _updates(global_params: Params, deltas: Sequence[tuple[Params, int]], prefix: str) -> list[ClientUpdate]:
    return [ClientUpdate(f"{prefix}{k}", n, {key: global_params[key] + d[key] for key in d},
                         {"steps": float(HONEST_STEPS), "samples": float(n)})
            for k, (d, n) in enumerate(deltas)]


def shift_ratio(strategy: str, params: dict[str, float], attack: Attack, seed: int) -> float:
    """How far `attack` moves `strategy`'s aggregate, over how far it moves FedAvg's (one round)."""
    gen = torch.Generator().manual_seed(seed)
    global_params, honest = honest_round(CLIENTS - attack.hostile, gen)
    clean = _updates(global_params, [(d, HONEST_SAMPLES) for d in honest], "honest-")
    attacked = clean + _updates(global_params, attack.make(honest, gen), "hostile-")

    def shift(name: str, hyper: dict[str, float]) -> float:
        with_attack = build_strategy(name, hyper).aggregate(global_params, attacked)
        without = build_strategy(name, hyper).aggregate(global_params, clean)
        return float(torch.cat([(with_attack[key] - without[key]).flatten() for key in SHAPES]).norm())

    return shift(strategy, params) / shift("fedavg", {})


def median_ratio(strategy: str, params: dict[str, float], attack: Attack, seeds: Sequence[int] = SEEDS) -> float:
    return statistics.median(shift_ratio(strategy, params, attack, seed) for seed in seeds)


def table(settings: Sequence[tuple[str, dict[str, float]]]) -> str:
    """Markdown: one row per (strategy, params), one column per attack; median shift ratio over SEEDS."""
    lines = ["| strategy | " + " | ".join(attack.name for attack in ATTACKS) + " |", "|---|" + "---|" * len(ATTACKS)]
    for name, params in settings:
        label = name + (f" `{params}`" if params else "")
        ratios = [median_ratio(name, params, attack) for attack in ATTACKS]
        lines.append(f"| {label} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    return "\n".join(lines)


DEFAULT_SETTINGS = (
    ("fedcmp", {}),
    ("fedcmp-no-reliability", {}),
    ("fedcmp-mean-fusion", {}),
    ("fedcmp-sample-weights", {}),
    ("fedcmp", {"norm_bound": float("inf")}),
    ("fedcmp-no-reliability", {"norm_bound": float("inf")}),
    ("fedavg", {"norm_bound": 2.0}),
    ("fedavg-equal", {}),
    ("fednova", {}),
    ("fedavgm", {}),
    ("fedyogi", {}),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(table(DEFAULT_SETTINGS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
