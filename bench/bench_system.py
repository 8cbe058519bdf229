"""`make bench-system`: the coordinator against Flower's deployment runtime, written to docs/PERFORMANCE.md.

Measures, in one run on this machine (issue 12's targets):
1. K no-op clients (download the global, add noise, upload it back) moving the LLaVA-1.5-7B
   projector (mlp2x_gelu 1024 -> 4096 -> 4096, float32, 84 MB) through a real `fedcmp-server`
   and through Flower's SuperLink + SuperNodes + `flwr run` (bench/flower_app), side by side for
   each K: round time, server CPU per round, server peak RSS; plus a small-projector round of
   both, which shows each system's floor when the bytes cost nothing, and fedcmp at the largest
   K with `wire_dtype: bfloat16` (half the bytes).
2. Aggregation time of fedavg vs fedcmp at the 7B shape (bench_aggregation.py).
3. The server's peak RSS with 64 such clients in a round, against one projector's size.
4. 256 small-projector clients through four rounds (more GetStatus calls to take a p99 of),
   timing GetStatus while the uploads stream, on both of the server's ports and on an idle
   reference process (bench/reference_status.py) that shows the machine's own floor.

    python bench/bench_system.py --flower-venv .venv-flower [--out docs/PERFORMANCE.md] [--quick]

--quick shrinks every size (2 and 3 clients, small projectors, 16 swarm clients) to check the
harness end to end in about two minutes; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import bench_aggregation
from performance_report import Report, SystemPair
from system_fedcmp import Workload, run_fedcmp
from system_flower import run_flower

SMALL = {"vision_hidden": 128, "text_hidden": 256}  # the small projector: 98k parameters, 0.4 MB


@dataclass(frozen=True)
class Plan:
    system_clients: tuple[int, ...]
    rounds: int
    projector: dict[str, int]
    aggregation: tuple[tuple[int, bool, int], ...]  # (clients, from disk, repeats)
    aggregation_shape_scale: int  # 1: the 7B shape; the quick plan shrinks it
    rss_clients: int
    swarm_clients: int
    swarm_rounds: int
    bf16_clients: int  # a fedcmp run with wire_dtype bfloat16 at the plan's projector


FULL = Plan(system_clients=(4, 8, 16), rounds=3, projector={"vision_hidden": 1024, "text_hidden": 4096},
            aggregation=((4, False, 3), (16, False, 3), (16, True, 3), (64, True, 1)), aggregation_shape_scale=1,
            rss_clients=64, swarm_clients=256, swarm_rounds=4, bf16_clients=16)
QUICK = Plan(system_clients=(2, 3), rounds=2, projector={"vision_hidden": 64, "text_hidden": 512},
             aggregation=((2, False, 1), (4, True, 1)), aggregation_shape_scale=8,
             rss_clients=4, swarm_clients=16, swarm_rounds=2, bf16_clients=3)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def system_pairs(plan: Plan, workdir: Path, flower_venv: Path) -> list[SystemPair]:
    """fedcmp then Flower for every K at the plan's projector, then K = smallest at the small projector."""
    cases = [(k, plan.projector) for k in plan.system_clients] + [(plan.system_clients[0], SMALL)]
    pairs = []
    for clients, projector in cases:
        workload = Workload(clients=clients, rounds=plan.rounds, **projector)
        tag = f"k{clients}-{projector['text_hidden']}"
        log(f"fedcmp: {clients} clients, projector {projector}")
        ours = run_fedcmp(workload, workdir / f"fedcmp-{tag}")
        log(f"flower: {clients} supernodes, projector {projector}")
        theirs = run_flower(workload, workdir / f"flower-{tag}", flower_venv)
        pairs.append(SystemPair(projector["vision_hidden"], projector["text_hidden"], ours, theirs))
        log(f"  round {ours.round_s:.2f} s vs {theirs.round_s:.2f} s")
    return pairs


def aggregation_timings(plan: Plan) -> list[tuple[int, bool, bench_aggregation.Timings]]:
    if plan.aggregation_shape_scale != 1:
        bench_aggregation.SHAPES = {key: tuple(size // plan.aggregation_shape_scale for size in shape)
                                    for key, shape in bench_aggregation.SHAPES.items()}
    rows = []
    for clients, from_disk, repeats in plan.aggregation:
        log(f"aggregation: {clients} clients, {'from disk' if from_disk else 'in memory'}")
        rows.append((clients, from_disk, bench_aggregation.compare(clients, repeats, from_disk)))
    return rows


def _output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parent, timeout=60).stdout.strip()
    except OSError:
        return ""


def machine(flower_venv: Path) -> dict[str, str]:
    flower = _output([str(flower_venv / "bin" / "python"), "-c", "import flwr; print(flwr.__version__)"])
    return {"cpus": str(os.cpu_count()), "python": platform.python_version(), "torch": torch.__version__,
            "flower": flower or "unknown", "commit": _output(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flower-venv", type=Path, required=True, help="virtual environment with flwr (make bench-system)")
    parser.add_argument("--out", type=Path, default=Path("docs/PERFORMANCE.md"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, numbers mean nothing")
    args = parser.parse_args()
    # A stopped benchmark still ends what it started: SIGTERM unwinds through the runners' `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.flower_venv = args.flower_venv.resolve()  # Flower's commands run from each run's work directory
    if not (args.flower_venv / "bin" / "flower-superlink").exists():
        print(f"bench_system: {args.flower_venv} has no flower-superlink; run `make bench-system`", file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    report = Report(machine(args.flower_venv), quick=args.quick, load_before=os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="fedcmp-bench-system-") as folder:
        workdir = Path(folder)
        report.aggregation = aggregation_timings(plan)
        report.pairs = system_pairs(plan, workdir, args.flower_venv)
        log(f"fedcmp: {plan.bf16_clients} clients, projector {plan.projector}, bfloat16 on the wire")
        report.bf16_run = run_fedcmp(Workload(plan.bf16_clients, plan.rounds, wire_dtype="bfloat16", **plan.projector),
                                     workdir / "fedcmp-bf16")
        log(f"fedcmp: {plan.rss_clients} clients, projector {plan.projector}, one round")
        report.rss_run = run_fedcmp(Workload(plan.rss_clients, 1, clients_per_process=16, max_active=4,
                                             **plan.projector), workdir / "fedcmp-rss")
        log(f"fedcmp: {plan.swarm_clients} clients, projector {SMALL}, {plan.swarm_rounds} rounds, GetStatus every 20 ms")
        report.swarm_run = run_fedcmp(Workload(plan.swarm_clients, plan.swarm_rounds, clients_per_process=32, **SMALL),
                                      workdir / "fedcmp-swarm", probe_interval_s=0.02)
    report.load_after = os.getloadavg()
    report.wall_s = time.monotonic() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.markdown(plan.projector))
    log(f"wrote {args.out} ({report.wall_s / 60:.1f} min)")
    print(report.summary(plan.projector))
    return 0


if __name__ == "__main__":
    sys.exit(main())
