"""Aggregation time of `fedavg` vs `fedcmp` at the LLaVA-1.5-7B projector shape.

mlp2x_gelu: linear_1 1024 -> 4096, linear_2 4096 -> 4096, weights + biases, float32
(~21M parameters). 16 synthetic client updates = a shared low-rank drift + a client-specific
low-rank part + small noise, held in memory, or with --from-disk spilled to safetensors files
and loaded one per access with the project's codec, as the server's spilled sequence does (so
every pass over the clients is timed too; files sit in the page cache).
Both strategies run side by side in one process, interleaved (fedavg, fedcmp, fedavg, ...) so
that both see the same machine load; prints the best and the median time of each and the
ratio of the best times (the best time is the least disturbed by other processes).

    python bench/bench_aggregation.py [--clients 16] [--repeats 5] [--from-disk]
                                      [--fedcmp-params '{"r_max": 32}']
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fedcmp.common.codec import load_params_file, save_params_file
from fedcmp.server.strategies import ClientUpdate, build_strategy

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


def make_round(clients: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    gen = torch.Generator().manual_seed(seed)
    global_params = {key: 0.02 * torch.randn(shape, generator=gen) for key, shape in SHAPES.items()}
    shared = {key: low_rank(shape, 8, 1e-3, gen) for key, shape in SHAPES.items()}
    updates = []
    for k in range(clients):
        params = {
            key: global_params[key] + shared[key] + low_rank(shape, 4, 5e-4, gen) + noise(shape, 1e-5, gen)
            for key, shape in SHAPES.items()
        }
        updates.append(ClientUpdate(f"client-{k:02d}", 100 + 10 * k, params, {}))
    return global_params, updates


class SpilledRound(Sequence[ClientUpdate]):
    """The round's updates as safetensors files, one loaded per `__getitem__`."""

    def __init__(self, updates: list[ClientUpdate], folder: Path) -> None:
        self.entries = []
        for update in updates:
            path = folder / f"{update.client_id}.safetensors"
            save_params_file(path, update.params)
            self.entries.append((update.client_id, update.num_samples, path))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index):  # type: ignore[override]
        client_id, num_samples, path = self.entries[index]
        return ClientUpdate(client_id, num_samples, load_params_file(path), {})


def time_once(name: str, params: dict, global_params: dict, updates: Sequence[ClientUpdate]) -> float:
    strategy = build_strategy(name, params)
    start = time.perf_counter()
    strategy.aggregate(global_params, updates)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fedcmp-params", type=json.loads, default={}, help="JSON strategy_params for fedcmp")
    parser.add_argument("--from-disk", action="store_true", help="load each update from a safetensors file per access")
    args = parser.parse_args()
    global_params, in_memory = make_round(args.clients)
    folder = tempfile.TemporaryDirectory()
    updates = SpilledRound(in_memory, Path(folder.name)) if args.from_disk else in_memory
    n_params = sum(t.numel() for t in global_params.values())
    runs = {"fedavg": {}, "fedcmp": args.fedcmp_params}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats + 1):  # run 0 warms up allocators and BLAS
        for name, params in runs.items():
            elapsed = time_once(name, params, global_params, updates)
            if repeat:
                times[name].append(elapsed)
    print(
        f"projector mlp2x_gelu 1024->4096->4096, {n_params / 1e6:.1f}M params, {args.clients} clients, "
        f"{'from disk' if args.from_disk else 'in memory'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    for name, params in runs.items():
        label = f"  {params}" if params else ""
        print(f"{name:7s} best {min(times[name]):7.3f} s   median {statistics.median(times[name]):7.3f} s{label}")
    print(f"ratio of best times: {min(times['fedcmp']) / min(times['fedavg']):.2f} x")
    folder.cleanup()


if __name__ == "__main__":
    main()
