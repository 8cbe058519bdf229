"""`make bench-quality`: every strategy and both bounds on the four scenarios, 3 seeds; writes RESULTS.md + plots.

RESULTS.md also holds the robustness table (fedcmp.sim.attacks) of every strategy at the same
tuned settings, so one page shows what each ingredient buys on benign and hostile federations.

Each cell is an in-process simulation (fedcmp-sim's engine) on the embedded micro zoo. Per
scenario and seed the federation's frozen features are encoded once and every method reuses
them. Strategy settings come from bench/tuned.yaml (written by bench/tune.py on validation
splits carved from the clients' training data, never on the test split). Everything in the
report is computed from this run's raw rows (also written, as results.jsonl).

    python bench/bench_quality.py --out docs            # full: 3 seeds
    python bench/bench_quality.py --quick --out runs/q  # 1 seed, fewer rounds
    python bench/bench_quality.py --quick --methods fedcmp fedcmp-no-norm-bound --out runs/nb

`--methods` runs only the named methods, plus `fedavg` always: the report measures against it
(rounds to FedAvg's final NLL, the update cosines of FedAvg's rounds). The share of the FedAvg ->
centralized gap closed is reported only when `centralized` ran.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import (FULL, QUICK, SCENARIOS, Method, Scale, append_jsonl, base_recipe, mean_std,  # noqa: E402
                     run_method, scenario_data, tuned_methods)

from fedcmp.common.logs import setup_logging  # noqa: E402
from fedcmp.sim import attacks  # noqa: E402
from fedcmp.sim.engine import Federation, rounds_to_reach  # noqa: E402

NON_IID = ("concept", "domain", "quantity")
REFERENCE = "fedavg"  # every run includes it: the report's relative columns are measured against it
# Ablations whose benign cost the report states in units of seed noise: the vote, the norm bound
SEED_NOISE_ABLATIONS = ("fedcmp-no-reliability", "fedcmp-no-norm-bound")


def select_methods(methods: list[Method], names: list[str] | None) -> list[Method]:
    """The methods named (all when `names` is None) plus the reference, in `methods`' order."""
    if names is None:
        return methods
    known = [m.name for m in methods]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(known)}")
    wanted = {*names, REFERENCE}
    return [m for m in methods if m.name in wanted]


def run_cell(scenario: str, seed: int, scale: Scale, methods: list[Method], cache: Path,
             threads: int, wire_dtype: str) -> list[dict[str, Any]]:
    """Every method on one scenario and seed (one federation, features encoded once)."""
    torch.set_num_threads(threads)
    data = scenario_data(cache, scenario, seed, scale)
    base = base_recipe(scale, seed, wire_dtype)
    federation = Federation.open(data, base)
    rows = []
    for method in methods:
        began = time.monotonic()
        row = {"scenario": scenario, "seed": seed, **run_method(federation, method, base)}
        row["seconds"] = time.monotonic() - began
        rows.append(row)
        print(f"{scenario:<9} seed {seed}  {method.name:<22} test_nll {row['final']['test_nll']:.4f}  "
              f"retrieval {row['final'].get('test_retrieval', math.nan):.3f}  ({row['seconds']:.0f}s)", flush=True)
    return rows


def run_all(scale: Scale, seeds: list[int], methods: list[Method], cache: Path, raw: Path,
            jobs: int, wire_dtype: str) -> list[dict[str, Any]]:
    """All cells, `jobs` worker processes at a time (one torch thread each when jobs > 1)."""
    cells = [(scenario, seed) for scenario in SCENARIOS for seed in seeds]
    threads = 1 if jobs > 1 else (os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_cell, scenario, seed, scale, methods, cache, threads, wire_dtype)
                   for scenario, seed in cells]
        for future in futures:
            for row in future.result():
                append_jsonl(raw, row)
                rows.append(row)
    return rows


def summarise(rows: list[dict[str, Any]], methods: list[Method]) -> dict[str, dict[str, dict[str, tuple]]]:
    """scenario -> method -> metric -> (mean, std) over seeds, with rounds-to-FedAvg's-final-NLL."""
    table: dict[str, dict[str, dict[str, tuple]]] = {}
    for scenario in SCENARIOS:
        cells = [row for row in rows if row["scenario"] == scenario]
        fedavg_final = {row["seed"]: row["final"]["test_nll"] for row in cells if row["method"] == "fedavg"}
        table[scenario] = {}
        for method in methods:
            mine = [row for row in cells if row["method"] == method.name]
            if not mine:
                continue
            table[scenario][method.name] = {
                "test_nll": mean_std([row["final"]["test_nll"] for row in mine]),
                "test_retrieval": mean_std([row["final"].get("test_retrieval", math.nan) for row in mine]),
                "rounds_to_fedavg": mean_std([rounds_to_reach(row["rounds"], fedavg_final[row["seed"]])
                                              for row in mine if row["seed"] in fedavg_final]),
            }
    return table


def gap_closed(table: dict, scenario: str, method: str) -> float:
    """Fraction of the FedAvg -> centralized test-NLL gap that `method` closes on `scenario`."""
    fedavg = table[scenario]["fedavg"]["test_nll"][0]
    central = table[scenario]["centralized"]["test_nll"][0]
    return (fedavg - table[scenario][method]["test_nll"][0]) / (fedavg - central) if fedavg != central else math.nan


def conflict(rows: list[dict[str, Any]], scenario: str) -> float:
    """Mean pairwise cosine between client updates over FedAvg's rounds and seeds (low = conflicting updates)."""
    values = [r["update_cosine"] for row in rows if row["scenario"] == scenario and row["method"] == "fedavg"
              for r in row["rounds"]]
    return mean_std(values)[0]


def robustness(methods: list[Method]) -> list[str]:
    """The robustness table of every federated method at its benchmark settings (markdown lines)."""
    settings = [(m.name, dict(m.recipe_overrides.get("strategy_params", {}))) for m in methods if m.mode == "federated"]
    return [f"Shift of one round's aggregate under each attack, as a fraction of plain FedAvg's shift under the "
            f"same attack (median over seeds {attacks.SEEDS[0]}-{attacks.SEEDS[-1]}; {attacks.CLIENTS} synthetic "
            "clients, fedcmp.sim.attacks), every strategy with its benchmark settings. Target: <= 0.5.", "",
            *attacks.table(settings).splitlines()]


def report(table: dict, rows: list[dict[str, Any]], methods: list[Method], seeds: list[int], scale: Scale,
           seconds: float, command: str, robustness_lines: list[str]) -> str:
    def cell(stat: tuple, digits: int = 4) -> str:
        mean, std = stat
        return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = ["# Quality benchmark results", "",
             f"Produced by `{command}` in {seconds / 60:.1f} minutes on this machine "
             f"({len(seeds)} seed(s): {seeds}; {scale.clients} clients x {scale.samples_per_client} samples, "
             f"{scale.test_samples} test samples, {scale.rounds} rounds; micro zoo). Raw rows: results.jsonl.",
             "", "Test NLL is the mean per-token negative log-likelihood of the balanced test captions (lower is "
             "better); retrieval is the accuracy of picking the true caption among 10 by lowest NLL; "
             "rounds-to-FedAvg is the first round whose test NLL reaches FedAvg's final one (n/a: never).", "",
             "## Summary: test NLL, mean over seeds", "",
             "| method | " + " | ".join(SCENARIOS) + " |", "|---|" + "---|" * len(SCENARIOS)]
    ran = [m for m in methods if all(m.name in table[s] for s in SCENARIOS)]
    contenders = [m.name for m in ran if m.mode == "federated" and not m.name.startswith("fedcmp-")]
    best = [min(contenders, key=lambda name: table[s][name]["test_nll"][0]) for s in SCENARIOS]
    for method in ran:
        nll = [table[s][method.name]["test_nll"][0] for s in SCENARIOS]
        lines.append(f"| {method.name} | " + " | ".join(
            f"**{v:.4f}**" if method.name == b else f"{v:.4f}" for v, b in zip(nll, best)) + " |")
    lines += ["", "Bold: the best of Fed-CMP and the baselines (its ablations not counted) in the scenario.", ""]
    for scenario in SCENARIOS:
        lines += [f"## {scenario}", "", f"Mean pairwise cosine between client updates (FedAvg rounds): "
                  f"{conflict(rows, scenario):.3f}.", "", "| method | test NLL | retrieval@10 | rounds to FedAvg's final NLL |",
                  "|---|---|---|---|"]
        ranked = sorted(table[scenario].items(), key=lambda item: item[1]["test_nll"][0])
        for name, stats in ranked:
            lines.append(f"| {name} | {cell(stats['test_nll'])} | {cell(stats['test_retrieval'], 3)} | "
                         f"{cell(stats['rounds_to_fedavg'], 1)} |")
        lines += ["", f"![{scenario}]({scenario}_nll.png)", ""]
    lines += ["## Robustness", "", *robustness_lines, "", "## Against the target", ""]
    names = [m.name for m in ran]
    if "fedcmp" in names:
        firsts = [s for s, b in zip(SCENARIOS, best) if b == "fedcmp"]
        baselines = [name for name in contenders if name != "fedcmp"]
        lines.append(f"- Fed-CMP ranks first on test NLL against the baselines ({', '.join(baselines)}) in "
                     f"{len(firsts)} of 4 scenarios ({', '.join(firsts) or 'none'}).")
    if "centralized" in names:
        lines.append("- Share of the FedAvg -> centralized test-NLL gap closed on the non-IID scenarios:")
        for name in [name for name in names if name.startswith("fedcmp")]:
            closed = [gap_closed(table, s, name) for s in NON_IID]
            lines.append(f"  - {name}: " + ", ".join(f"{s} {c:.2f}" for s, c in zip(NON_IID, closed)) +
                         f"; mean {sum(closed) / len(closed):.2f}")
    else:
        lines.append("- Share of the FedAvg -> centralized gap closed: n/a (`centralized` was not run).")
    for ablation in [name for name in SEED_NOISE_ABLATIONS if "fedcmp" in names and name in names]:
        lines.append(f"- Full Fed-CMP against `{ablation}` (test NLL difference, in units of the larger "
                     "of their two standard deviations over seeds; > 1 means Fed-CMP is worse beyond one std):")
        for scenario in SCENARIOS:
            (full, full_std), (other, other_std) = (table[scenario][name]["test_nll"] for name in ("fedcmp", ablation))
            spread = max(full_std, other_std)
            units = (full - other) / spread if spread > 0 else math.nan
            lines.append(f"  - {scenario}: {full:.4f} ± {full_std:.4f} vs {other:.4f} ± {other_std:.4f}, "
                         f"{units:+.2f} std")
    lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], methods: list[Method], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: one per method, never reused
    for scenario in SCENARIOS:
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, method in enumerate(methods):
            mine = [row for row in rows if row["scenario"] == scenario and row["method"] == method.name]
            if not mine:
                continue
            per_round = list(zip(*[[r["test_nll"] for r in row["rounds"]] for row in mine]))
            means = [sum(values) / len(values) for values in per_round]
            style = "-" if method.mode == "federated" else ":"
            width = 2.5 if method.name == "fedcmp" else 1.2
            axis.plot(range(1, len(means) + 1), means, style, linewidth=width, label=method.name,
                      color=colours[index % len(colours)])
        axis.set_title(f"{scenario}: test NLL per round (mean over seeds)")
        axis.set_xlabel("round")
        axis.set_ylabel("test caption NLL per token")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, ncol=2)
        figure.tight_layout()
        figure.savefig(out / f"{scenario}_nll.png", dpi=100)
        plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="one seed, fewer rounds")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="scenario/seed cells run in parallel processes (1 torch thread each)")
    parser.add_argument("--methods", nargs="+", metavar="NAME",
                        help=f"run only these strategies/bounds (default: all), plus {REFERENCE}, the reference")
    parser.add_argument("--wire-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the recipe's wire_dtype: projectors round-trip through it both ways, as on the network")
    args = parser.parse_args(argv)
    setup_logging()
    scale = QUICK if args.quick else FULL
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    try:
        methods = select_methods(tuned_methods(), args.methods)
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "results.jsonl"
    raw.unlink(missing_ok=True)
    began = time.monotonic()
    robustness_lines = robustness(methods)  # seconds; first, so a failure cannot cost the whole run
    print("\n".join(robustness_lines), flush=True)
    rows = run_all(scale, seeds, methods, args.cache, raw, args.jobs, args.wire_dtype)
    table = summarise(rows, methods)
    plot(rows, methods, args.out)
    command = shlex.join(["python", "bench/bench_quality.py", *(sys.argv[1:] if argv is None else argv)])
    (args.out / "RESULTS.md").write_text(report(table, rows, methods, seeds, scale, time.monotonic() - began, command,
                                                   robustness_lines))
    print((args.out / "RESULTS.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
