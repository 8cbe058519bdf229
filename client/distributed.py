"""One logical client on several processes: torchrun ranks sharing each step, a DDP projector.

`torchrun --nproc-per-node N [--nnodes M --node-rank I --master-addr HOST --master-port P]
-m fedcmp.client ...` starts N (x M) ranks of one client; across nodes torchrun's elastic c10d
rendezvous works too (docs/training.md: both multi-node commands, and which nodes must reach the
coordinator). Rank 0 is the client the coordinator sees: it fetches the recipe,
registers, polls, downloads, evaluates and uploads. The other ranks follow rank 0's commands,
sent over a control channel (a gloo group whose timeout outlasts any wait between rounds):

- `open`: rank 0 has opened its session (so that anything it caches on disk is there for the
  others); every other rank opens the same session on its own device, and the projector goes
  under DDP on every rank.
- `train`: every rank trains the round from the same global projector. Each optimizer step's
  batch (the same on every rank: the batch stream is a pure function of the seed, client id and
  round) is split into N contiguous shares; rank i forwards share i in micro-batches, and DDP
  all-reduces the projector gradients on the last micro-batch. Each rank scales its loss by
  N / (tokens of the whole batch) and DDP averages over the N ranks, so the gradient is that of
  the mean token NLL of the whole batch: N ranks make the update of one process with the same
  effective batch.
- `stop`: the run is over, or rank 0 failed between rounds (coordinator unreachable, refused):
  the other ranks exit cleanly and rank 0 exits with its own code.

A rank that dies inside a collective (while opening or training) cannot tell the others; torchrun
then stops every rank of its node and exits non-zero.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from fedcmp.common.recipe import Recipe, RecipeError

if TYPE_CHECKING:
    from fedcmp.client.model import ProjectorMLLM
    from fedcmp.client.trainer import LocalSession

# Ranks other than 0 wait on the control channel while rank 0 polls the coordinator, which can
# take as long as the slowest site of the federation: far beyond torch's default 30 minutes.
CONTROL_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the ranks of its client (from torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a plain process is rank 0 of 1."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """This rank's device: `cuda` becomes `cuda:LOCAL_RANK` when several ranks share a client.

        A single device (`cuda:N`) cannot hold several ranks; refused with a ValueError.
        """
        if self.world_size == 1 or torch.device(requested).type != "cuda":
            return requested
        if requested != "cuda":
            raise ValueError(f"--device {requested} names one GPU, but this client runs {self.world_size} ranks; "
                             f"pass --device cuda (rank r of a node takes cuda:LOCAL_RANK) and choose the GPUs "
                             f"with CUDA_VISIBLE_DEVICES")
        return f"cuda:{self.local_rank}"

    def check_batch(self, recipe: Recipe) -> None:
        """Refuse a recipe whose step batch leaves a rank without examples."""
        if recipe.batch_size < self.world_size:
            raise RecipeError(f"batch_size {recipe.batch_size} cannot feed {self.world_size} ranks: every rank "
                              f"needs at least one example of each step's batch")


class Replicas:
    """How the ranks of one client share an optimizer step. This base class is the single process."""

    world_size = 1

    def forward_module(self, projector: nn.Module) -> nn.Module:
        """The module to call for the projector's forward (DDP's wrapper when distributed)."""
        return projector

    def share(self, batch: Tensor) -> Tensor:
        """This rank's rows of a step's batch [B] (all of them for one process)."""
        return batch

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's backward: all-reduce the gradients only on the `last` one."""
        return contextlib.nullcontext()

    def sum(self, value: Tensor) -> Tensor:
        """`value` summed over the ranks."""
        return value


class DataParallelReplicas(Replicas):
    """The ranks of the default process group; the projector wrapped in DDP."""

    def __init__(self, model: ProjectorMLLM) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        device = model.device
        self._ddp = DistributedDataParallel(model.projector, device_ids=[device] if device.type == "cuda" else None)

    def forward_module(self, projector: nn.Module) -> nn.Module:
        return self._ddp

    def share(self, batch: Tensor) -> Tensor:
        return batch.tensor_split(self.world_size)[self.rank]  # [B / N], contiguous

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self._ddp.no_sync()

    def sum(self, value: Tensor) -> Tensor:
        total = value.clone()
        dist.all_reduce(total)
        return total


class RankGroup:
    """The process group of a client's ranks plus its control channel (NCCL between CUDA ranks,
    gloo between CPU ranks; the control channel is always gloo)."""

    def __init__(self, ranks: Ranks, device: str) -> None:
        self.ranks = ranks
        torch_device = torch.device(device)
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo",
                                rank=ranks.rank, world_size=ranks.world_size)
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    def broadcast(self, command: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
        """Rank 0 sends `command` (a picklable tuple) to every rank; every rank returns it."""
        box = [command]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]  # type: ignore[return-value]

    def close(self) -> None:
        dist.destroy_process_group()


def _distribute(session: LocalSession) -> LocalSession:
    session.replicas = DataParallelReplicas(session.model)  # collective: every rank's session is open
    return session


def follow(group: RankGroup, open_session: Callable[[Recipe], LocalSession]) -> None:
    """Ranks other than 0: open the session and train the rounds rank 0 announces, until it says stop."""
    session: LocalSession | None = None
    while True:
        command = group.broadcast()
        if command[0] == "stop":
            return
        if command[0] == "open":
            session = _distribute(open_session(command[1]))
        elif command[0] == "train" and session is not None:
            session.train_round(*command[1:])
        else:
            raise RuntimeError(f"rank {group.ranks.rank}: unexpected command {command[0]!r} from rank 0")


class Leader:
    """Rank 0: opens the session on every rank, has every rank train each round, and tells the
    others to stop when it leaves, unless it left from inside a collective (nothing would hear)."""

    def __init__(self, group: RankGroup | None) -> None:
        self.group = group  # None: a single process, nothing to lead
        self._in_collective = False

    @contextlib.contextmanager
    def _collective(self) -> Iterator[None]:
        self._in_collective = True
        yield
        self._in_collective = False  # not reached on an exception: the other ranks may be stuck with us

    def open(self, recipe: Recipe, open_session: Callable[[Recipe], LocalSession]) -> LocalSession | LeaderSession:
        """This rank's session (rank 0 opens first), then every other rank's; the one the daemon drives."""
        if self.group is None:
            return open_session(recipe)
        self.group.ranks.check_batch(recipe)
        session = open_session(recipe)
        with self._collective():
            self.group.broadcast(("open", recipe))
            return LeaderSession(_distribute(session), self)

    def train_round(
        self, session: LocalSession, global_params: dict[str, Tensor], round_index: int, local_steps: int,
        on_step: Callable[[int, float], None] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        assert self.group is not None
        with self._collective():
            self.group.broadcast(("train", global_params, round_index, local_steps))
            return session.train_round(global_params, round_index, local_steps, on_step)

    def stop(self) -> None:
        """Release the other ranks (done, or failed between rounds)."""
        if self.group is not None and not self._in_collective:
            self.group.broadcast(("stop",))


class LeaderSession:
    """Rank 0's session as the daemon drives it: each round it trains, every rank trains it too."""

    def __init__(self, session: LocalSession, leader: Leader) -> None:
        self.session = session
        self.leader = leader

    @property
    def recipe(self) -> Recipe:
        return self.session.recipe

    @property
    def model(self) -> ProjectorMLLM:
        return self.session.model

    @property
    def num_train_samples(self) -> int:
        return self.session.num_train_samples

    @property
    def num_val_samples(self) -> int:
        return self.session.num_val_samples

    def signature(self) -> dict[str, tuple[int, ...]]:
        return self.session.signature()

    def evaluate(self, params: dict[str, Tensor]) -> dict[str, float]:
        return self.session.evaluate(params)  # rank 0 alone: the held-out split is small

    def data_metrics(self) -> dict[str, float]:
        return self.session.data_metrics()  # every rank scanned the same data

    def train_round(
        self, global_params: dict[str, Tensor], round_index: int, local_steps: int,
        on_step: Callable[[int, float], None] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Every rank trains the round; `on_step` (heartbeat, progress log) runs on rank 0."""
        return self.leader.train_round(self.session, global_params, round_index, local_steps, on_step)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: str) -> Iterator[RankGroup | None]:
    """The ranks' process group for their lifetime (None for a single process)."""
    if ranks.world_size == 1:
        yield None
        return
    group = RankGroup(ranks, device)
    try:
        yield group
    finally:
        group.close()


@contextlib.contextmanager
def leading(group: RankGroup | None) -> Iterator[Leader]:
    """Rank 0's `Leader`; on leaving, normally or by an exception between rounds, the others stop."""
    leader = Leader(group)
    try:
        yield leader
    finally:
        leader.stop()
