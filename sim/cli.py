"""`fedcmp-sim`: run a whole federation in one process (no gRPC) and write its per-round metrics.

    fedcmp-sim --data runs/fed --strategy fedcmp --rounds 10 --out runs/sim/fedcmp.jsonl
    fedcmp-sim --data runs/fed --mode centralized

`--data` is a folder written by `fedcmp-data` (client_* folders plus test/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from fedcmp.common.constants import EXIT_OK, EXIT_USAGE
from fedcmp.common.cliflags import add_common_flags
from fedcmp.common.logs import setup_logging
from fedcmp.common.recipe import RecipeError, load_recipe
from fedcmp.server.strategies import build_strategy
from fedcmp.sim.engine import MODES, Federation, Simulator


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedcmp-sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="recipe file (YAML or JSON); flags override its fields")
    parser.add_argument("--mode", choices=MODES, default="federated")
    parser.add_argument("--strategy")
    parser.add_argument("--strategy-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a strategy hyper-parameter (repeatable), e.g. --strategy-param beta=0.5")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--local-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, help="JSON lines: one row per round, then the final metrics")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    setup_logging(log_format=args.log_format)
    torch.set_num_threads(max(1, args.threads))
    try:
        params = dict(parse_param(item) for item in args.strategy_param)
        recipe = load_recipe(args.config, {"strategy": args.strategy, "rounds": args.rounds, "lr": args.lr,
                                           "local_steps": args.local_steps, "seed": args.seed,
                                           "strategy_params": params or None})
        build_strategy(recipe.strategy, recipe.strategy_params)  # refuse a bad name or knob before loading data
        federation = Federation.open(args.data, recipe, args.cache_dir)
        simulator = Simulator(federation, recipe)
    except (RecipeError, ValueError, FileNotFoundError) as error:
        print(f"fedcmp-sim: {error}", file=sys.stderr)
        return EXIT_USAGE
    sink = open(args.out, "w") if args.out else None
    try:
        def report(row: dict[str, float]) -> None:
            print(" ".join(f"{key}={value:.4f}" for key, value in row.items()), flush=True)
            if sink:
                sink.write(json.dumps({"event": "round", **row}) + "\n")

        result = simulator.run(args.mode, report)
        print("final " + " ".join(f"{key}={value:.4f}" for key, value in result.final.items()), flush=True)
        for metric, why in result.unavailable.items():
            print(f"{metric} unavailable: {why}", flush=True)
        if sink:
            sink.write(json.dumps({"event": "final", **result.final, "unavailable": result.unavailable}) + "\n")
    finally:
        if sink:
            sink.close()
    return EXIT_OK


def parse_param(item: str) -> tuple[str, float]:
    key, sep, value = item.partition("=")
    try:
        if not sep:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise ValueError(f"--strategy-param expects KEY=NUMBER, got {item!r}") from None


if __name__ == "__main__":
    raise SystemExit(main())
