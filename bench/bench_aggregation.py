"""Aggregation time of `fedavg` vs `fedcmp` at the LLaVA-1.5-7B projector shape.

mlp2x_gelu: linear_1 1024 -> 4096, linear_2 4096 -> 4096, weights + biases, float32
(~21M parameters, 84 MB). K synthetic client updates = a shared low-rank drift + a
client-specific low-rank part + small noise, held in memory, or with --from-disk written as
safetensors files and read back through the coordinator's own `SpilledUpdates` (one update
per access, as the server aggregates; the files sit in the page cache). From disk, the round
is generated one client at a time, so K = 64 needs one projector of memory, not 64.
Both strategies run side by side in one process, interleaved (fedavg, fedcmp, fedavg, ...) so
that both see the same machine load; prints the best and the median time of each and the
ratio of the best times (the best time is the least disturbed by other processes).

    python bench/bench_aggregation.py [--clients 16] [--repeats 5] [--from-disk] [--plain-gemm]
                                      [--threads N] [--cpu-time] [--fedcmp-params '{"r_max": 32}']

--plain-gemm runs Fed-CMP's products as `a @ b.T` (MKL) instead of through oneDNN, to measure
what the oneDNN route buys.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedcmp.server.store import SpilledUpdates, SpilledUpload
from fedcmp.server.strategies import ClientUpdate, build_strategy
from fedcmp.server.strategies import fedcmp

SHAPES = {
    "linear_1.weight": (4096, 1024),
    "linear_1.bias": (4096,),
    "linear_2.weight": (4096, 4096),
    "linear_2.bias": (4096,),
}


def low_rank(shape: tuple[int, ...], rank: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return scale * torch.randn(shape, generator=gen)
    m, n = shape
    return (scale / rank**0.5) * torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen)


def noise(shape: tuple[int, ...], scale: float, gen: torch.Generator) -> torch.Tensor:
    return scale * torch.randn(shape, generator=gen)


def synthetic_round(clients: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], Iterator[ClientUpdate]]:
    """The global projector and a generator of the K client updates, made one at a time."""
    gen = torch.Generator().manual_seed(seed)
    global_params = {key: 0.02 * torch.randn(shape, generator=gen) for key, shape in SHAPES.items()}
    shared = {key: low_rank(shape, 8, 1e-3, gen) for key, shape in SHAPES.items()}

    def updates() -> Iterator[ClientUpdate]:
        for k in range(clients):
            params = {
                key: global_params[key] + shared[key] + low_rank(shape, 4, 5e-4, gen) + noise(shape, 1e-5, gen)
                for key, shape in SHAPES.items()
            }
            yield ClientUpdate(f"client-{k:02d}", 100 + 10 * k, params, {})

    return global_params, updates()


def spill(updates: Iterator[ClientUpdate], folder: Path) -> SpilledUpdates:
    """Write each update as the coordinator spills an upload (safetensors) and read them back its way."""
    uploads = []
    for update in updates:
        path = folder / f"{update.client_id}.safetensors"
        save_file(update.params, str(path))
        uploads.append(SpilledUpload(update.client_id, 1, update.num_samples, {}, path))
    return SpilledUpdates(uploads)


@dataclass(frozen=True)
class Timings:
    """Seconds per aggregation of each strategy over the repeats."""

    fedavg: list[float]
    fedcmp: list[float]
    products: list[float] = field(default_factory=list)  # Fed-CMP's matrix products alone (time_products)

    @property
    def ratio(self) -> float:
        """fedcmp / fedavg, best time against best time."""
        return min(self.fedcmp) / min(self.fedavg)

    @property
    def products_ratio(self) -> float:
        """The products' best time against fedavg's: the least Fed-CMP's ratio can be at its sketch size."""
        return min(self.products) / min(self.fedavg)


def time_products(clients: int, clock: Callable[[], float], sketch_size: int) -> float:
    """Fed-CMP's matrix products alone for one round of `clients` at SHAPES, on random matrices.

    Per client and sketched layer [W | b] (m x n, m > 2s): Omega^T D [s, n], D (Omega^T D)^T
    [m, s] (the sketch pass) and Q^T D [s, n] (the projection pass), through the same GEMM
    route as the strategy (fedcmp.times_transposed). Their time is a floor under Fed-CMP's
    aggregation that no elementwise saving removes: about 6 s m n flops per client and layer
    against FedAvg's 2 m n.
    """
    gen = torch.Generator().manual_seed(1)
    layers = [torch.randn(shape[0], shape[1] + 1, generator=gen) for key, shape in SHAPES.items()
              if len(shape) == 2 and shape[0] > 2 * sketch_size]  # D [m, n] of each sketched [W | b]
    ranges = [torch.randn(sketch_size, d.shape[0], generator=gen) for d in layers]  # Omega^T, Q^T [s, m]
    start = clock()
    for _ in range(clients):
        for d, omega_t in zip(layers, ranges):
            sketch = fedcmp.times_transposed(omega_t, d.T)  # Omega^T D [s, n]
            fedcmp.times_transposed(d, sketch)  # D D^T Omega [m, s]
            fedcmp.times_transposed(omega_t, d.T)  # Q^T D [s, n]
    return clock() - start


def time_once(name: str, params: dict, global_params: dict, updates: Sequence[ClientUpdate],
              clock: Callable[[], float]) -> float:
    strategy = build_strategy(name, params)
    start = clock()
    strategy.aggregate(global_params, updates)
    return clock() - start


def compare(clients: int, repeats: int, from_disk: bool, fedcmp_params: dict | None = None,
            cpu_time: bool = False) -> Timings:
    """Interleaved fedavg / fedcmp aggregations of one synthetic round; a warm-up run of each first.

    Wall-clock seconds, or with `cpu_time` this process's CPU seconds: on a shared machine a
    single-threaded run's CPU time hardly depends on what else runs, its wall time does.
    """
    clock = time.process_time if cpu_time else time.perf_counter
    global_params, generated = synthetic_round(clients)
    with tempfile.TemporaryDirectory(prefix="fedcmp-bench-agg-") as folder:
        updates = spill(generated, Path(folder)) if from_disk else list(generated)
        times: dict[str, list[float]] = {"fedavg": [], "fedcmp": [], "products": []}
        sketch_size = build_strategy("fedcmp", fedcmp_params or {}).sketch_size
        for repeat in range(repeats + 1):  # run 0 warms up allocators and BLAS
            for name, params in (("fedavg", {}), ("fedcmp", fedcmp_params or {})):
                elapsed = time_once(name, params, global_params, updates, clock)
                if repeat:
                    times[name].append(elapsed)
            if repeat:
                times["products"].append(time_products(clients, clock, sketch_size))
    return Timings(times["fedavg"], times["fedcmp"], times["products"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fedcmp-params", type=json.loads, default={}, help="JSON strategy_params for fedcmp")
    parser.add_argument("--from-disk", action="store_true",
                        help="spill the updates to safetensors files and read them as the coordinator does")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--cpu-time", action="store_true", help="time with process CPU seconds, not wall clock")
    parser.add_argument("--plain-gemm", action="store_true", help="Fed-CMP's GEMMs as a @ b.T, not through oneDNN")
    args = parser.parse_args()
    if args.clients < 1 or args.repeats < 1:
        parser.error("--clients and --repeats must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.plain_gemm:
        fedcmp._ONEDNN_LINEAR = None
    timings = compare(args.clients, args.repeats, args.from_disk, args.fedcmp_params, args.cpu_time)
    n_params = sum(torch.Size(shape).numel() for shape in SHAPES.values())
    print(
        f"projector mlp2x_gelu 1024->4096->4096, {n_params / 1e6:.1f}M params, {args.clients} clients, "
        f"{'from disk' if args.from_disk else 'in memory'}, torch {torch.__version__}, "
        f"{'MKL' if fedcmp._ONEDNN_LINEAR is None else 'oneDNN'} GEMMs in fedcmp, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats, {'CPU' if args.cpu_time else 'wall'} seconds"
    )
    for name, times in (("fedavg", timings.fedavg), ("fedcmp", timings.fedcmp)):
        label = f"  {args.fedcmp_params}" if name == "fedcmp" and args.fedcmp_params else ""
        print(f"{name:7s} best {min(times):7.3f} s   median {statistics.median(times):7.3f} s{label}")
    print(f"ratio of best times: {timings.ratio:.2f} x")
    print(f"fedcmp's matrix products alone: best {min(timings.products):.3f} s, {timings.products_ratio:.2f} x fedavg")


if __name__ == "__main__":
    main()
