"""The validation sweep that sets every strategy's server-side knobs (bench/tuned.yaml, docs/TUNING.md).

Fairness: every strategy with a knob gets the same budget, four settings; FedAvgM and Fed-CMP get
the very same (learning rate, momentum) pairs. The score is the NLL on the validation splits
carved from the clients' own training data (`val_fraction` of each client, never trained on),
averaged over the four scenarios, on seeds the benchmark never uses. The test split is not
even loaded. The ablations inherit Fed-CMP's chosen setting, minus their component.

    python bench/tune.py            # writes bench/tuned.yaml and docs/TUNING.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import FULL, SCENARIOS, TUNED_FILE, TUNING_SEEDS, Method, base_recipe, scenario_data  # noqa: E402

from fedcmp.common.logs import setup_logging  # noqa: E402
from fedcmp.sim.engine import Federation, Simulator  # noqa: E402

MOMENTUM_PAIRS = [(1.0, 0.5), (1.0, 0.9), (2.0, 0.5), (0.5, 0.9)]
SERVER_ETAS = [0.003, 0.01, 0.03, 0.1]
GRID: dict[str, list[dict[str, Any]]] = {
    "fedavg": [{}],
    "fedprox": [{"proximal_mu": mu} for mu in (0.01, 0.1, 1.0, 10.0)],
    "fedavgm": [{"strategy_params": {"server_learning_rate": lr, "server_momentum": m}} for lr, m in MOMENTUM_PAIRS],
    "fedadam": [{"strategy_params": {"eta": eta}} for eta in SERVER_ETAS],
    "fedyogi": [{"strategy_params": {"eta": eta}} for eta in SERVER_ETAS],
    "fedadagrad": [{"strategy_params": {"eta": eta}} for eta in SERVER_ETAS],
    "fedcmp": [{"strategy_params": {"eta_s": lr, "beta": m}} for lr, m in MOMENTUM_PAIRS],
}


def inherit_ablations(chosen: dict[str, dict[str, Any]]) -> None:
    params = dict(chosen["fedcmp"].get("strategy_params", {}))
    chosen["fedcmp-no-reliability"] = {"strategy_params": params}
    chosen["fedcmp-no-momentum"] = {"strategy_params": {k: v for k, v in params.items() if k != "beta"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--report", type=Path, default=Path("docs/TUNING.md"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    setup_logging()
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    scores: dict[tuple[str, int], list[float]] = {}
    for scenario in SCENARIOS:
        for seed in TUNING_SEEDS:
            base = base_recipe(FULL, seed)
            data = scenario_data(args.cache, scenario, seed, FULL)
            federation = Federation.open(data, base, load_test=False)  # tuning never looks at the test split
            for name, settings in GRID.items():
                for index, overrides in enumerate(settings):
                    result = Simulator(federation, Method(name, overrides).recipe(base)).run("federated")
                    scores.setdefault((name, index), []).append(result.final["val_nll"])
                    print(f"{scenario:<9} {name:<11} {overrides}  val_nll {result.final['val_nll']:.4f}", flush=True)
    chosen: dict[str, dict[str, Any]] = {}
    lines = ["# Validation sweep", "",
             f"Produced by `python bench/tune.py` in {(time.monotonic() - began) / 60:.1f} minutes. Score: NLL on the "
             "validation splits carved from the clients' training data, mean over the four scenarios "
             f"(seeds {list(TUNING_SEEDS)}; the benchmark uses seeds 0-2 and the test split is never loaded). "
             f"Scale: {FULL.clients} clients x {FULL.samples_per_client} samples, {FULL.rounds} rounds.", "",
             "| strategy | setting | mean val NLL | chosen |", "|---|---|---|---|"]
    for name, settings in GRID.items():
        means = [statistics.fmean(scores[(name, index)]) for index in range(len(settings))]
        best = min(range(len(settings)), key=means.__getitem__)
        chosen[name] = settings[best]
        for index, overrides in enumerate(settings):
            lines.append(f"| {name} | `{overrides or 'defaults'}` | {means[index]:.4f} | {'yes' if index == best else ''} |")
    inherit_ablations(chosen)
    lines += ["", "The ablations `fedcmp-no-reliability` and `fedcmp-no-momentum` take Fed-CMP's chosen setting.", ""]
    TUNED_FILE.write_text("# Written by bench/tune.py (validation sweep); read by bench/bench_quality.py.\n" +
                          yaml.safe_dump(chosen, sort_keys=True))
    args.report.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
