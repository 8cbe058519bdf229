"""No-op fedcmp clients for the system benchmark: the real client daemon and wire, no backbones.

Each client is a `ClientDaemon` (client/daemon.py) over its own `CoordinatorLink`, driven by a
`NoopSession` in place of the LocalSession: "training" downloads the global projector, adds
Gaussian noise to every tensor and uploads the result; "evaluation" reports a constant loss.
So the coordinator sees exactly the calls, bytes and checks of a real client, and the client
side costs only what moving the bytes costs (decode, noise, encode, sha256).

One process runs any number of clients as threads (`--clients`); `--max-active` bounds how
many of them hold a projector at once, so that 64 clients of an 84 MB projector fit in memory.

    python bench/noop_client.py --server 127.0.0.1:50051 --prefix site --first 0 --clients 4 \
        --vision-hidden 1024 --text-hidden 4096
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedcmp.client.daemon import ClientDaemon, ConnectionSettings, CoordinatorLink
from fedcmp.common.projector import projector_shapes
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe

NOISE_SCALE = 1e-3  # standard deviation of the noise a no-op client adds to each weight
# Every no-op client claims the same (absent) backbone files, so the coordinator admits them all.
NOOP_FINGERPRINT = hashlib.sha256(b"fedcmp no-op benchmark client: no backbones").hexdigest()


@dataclass(frozen=True)
class Widths:
    """The projector widths a session's model reports (the daemon writes them into upload metadata)."""

    vision_hidden: int
    text_hidden: int


@dataclass
class NoopSession:
    """What ClientDaemon needs of a LocalSession, without data or models."""

    recipe: Recipe
    model: Widths
    gate: threading.Semaphore  # held while this client holds a projector (train_round .. upload)
    seed: int
    num_train_samples: int = 100
    num_val_samples: int = 10

    def signature(self) -> dict[str, tuple[int, ...]]:
        return projector_shapes(self.recipe.projector_type, self.model.vision_hidden, self.model.text_hidden)

    def evaluate(self, params: dict[str, Tensor]) -> dict[str, float]:
        return {"val_loss": 0.0}

    def data_metrics(self) -> dict[str, float]:
        return {"bad_samples": 0.0}  # no data, so none unreadable

    def train_round(self, global_params: dict[str, Tensor], round_index: int, local_steps: int,
                    on_step: Callable[[int, float], None] | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
        """global + N(0, NOISE_SCALE^2) per value, seeded by (client, round); no steps to report.

        Counts the samples a real LocalSession would have seen (local steps x batch size): the
        coordinator refuses an upload claiming more."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + round_index)
        noisy = {key: value + NOISE_SCALE * torch.randn(value.shape, generator=generator)
                 for key, value in global_params.items()}
        return noisy, {"train_loss": 0.0, "samples": float(local_steps * self.recipe.batch_size)}


class GatedDaemon(ClientDaemon):
    """A ClientDaemon whose download-noise-upload runs only while it holds the process's gate,
    and which drops its copy of the global afterwards (a real client keeps one; 64 threads
    of one process cannot)."""

    def train(self, task, heartbeat) -> None:  # pb.Task, client.heartbeat.Heartbeat (beating while it waits)
        with self.session.gate:
            super().train(task, heartbeat)
            self._global = None


def run_clients(server: str, client_ids: dict[str, int], widths: Widths, max_active: int,
                reconnect_budget_s: float) -> int:
    """Run the clients (id -> noise seed) until the coordinator says DONE; returns how many failed."""
    gate = threading.Semaphore(max_active)
    failures: list[str] = []

    def one(client_id: str, seed: int) -> None:
        link = CoordinatorLink(ConnectionSettings(server, reconnect_budget_s=reconnect_budget_s))
        daemon = GatedDaemon(link, client_id)
        try:
            recipe = daemon.fetch_recipe()
            backbones = Backbones(recipe.vision_model, recipe.llm, NOOP_FINGERPRINT, NOOP_FINGERPRINT)
            daemon.run(NoopSession(recipe, widths, gate, seed=seed), backbones)
        except Exception as error:  # a benchmark client reports and counts its failure
            logging.getLogger("fedcmp.bench").error("%s failed: %r", client_id, error)
            failures.append(client_id)
        finally:
            link.close()

    threads = [threading.Thread(target=one, args=(cid, seed), name=cid) for cid, seed in client_ids.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="coordinator HOST:PORT")
    parser.add_argument("--prefix", default="noop", help="client ids are PREFIX-NNNN")
    parser.add_argument("--first", type=int, default=0, help="number of the first client id")
    parser.add_argument("--clients", type=int, default=1, help="clients (threads) in this process")
    parser.add_argument("--max-active", type=int, default=0, help="clients holding a projector at once (0: all)")
    parser.add_argument("--vision-hidden", type=int, default=1024)
    parser.add_argument("--text-hidden", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--reconnect-budget", type=float, default=120.0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.max_active < 0:
        parser.error("--clients must be >= 1 and --max-active >= 0")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(threadName)s %(message)s")
    torch.set_num_threads(args.threads)
    ids = {f"{args.prefix}-{number:04d}": number for number in range(args.first, args.first + args.clients)}
    widths = Widths(args.vision_hidden, args.text_hidden)
    failed = run_clients(args.server, ids, widths, args.max_active or args.clients, args.reconnect_budget)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
