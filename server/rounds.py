"""The coordinator's round state machine, independent of gRPC.

WAITING (for min clients) -> TRAINING(round r) -> AGGREGATING -> COMMITTED(r) -> ... ->
EVALUATING (the final projector on every client's held-out split) -> DONE.

All state lives in the event loop's thread; the gRPC servicer calls into it, and the only work
sent to a worker thread is aggregation and the commit's disk writes. Every change wakes the
long-polling clients and status watchers.
"""
from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedcmp.common.constants import POLL_HOLD_S
from fedcmp.common.projector import describe_shapes, init_projector_params, projector_shapes
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe
from fedcmp.server.identity import backbone_refusal, run_backbones
from fedcmp.server.store import CLIENT_ID_PATTERN, EncodedGlobal, RunRecord, RunStore, SpilledUpdates
from fedcmp.server.strategies import Strategy

if TYPE_CHECKING:
    from fedcmp.server.metrics import CoordinatorMetrics

log = logging.getLogger("fedcmp.server")

Shapes = dict[str, tuple[int, ...]]


class Phase(str, Enum):
    WAITING = "WAITING"
    TRAINING = "TRAINING"
    AGGREGATING = "AGGREGATING"
    EVALUATING = "EVALUATING"
    DONE = "DONE"


class SessionError(PermissionError):
    """A call with an unknown client or a stale session token: the client must register again."""


@dataclass
class ClientRecord:
    client_id: str
    num_samples: int
    num_eval_samples: int
    token: str
    last_seen: float
    state: str = "idle"  # idle, training, uploaded, evaluating, evaluated
    backbones: Backbones | None = None  # what the client loaded (None: an in-process caller that did not say)


@dataclass(frozen=True)
class TaskSpec:
    """What PollTask answers, before it becomes a protobuf message."""

    kind: str  # TRAIN, EVALUATE, WAIT, DONE
    round: int = 0
    global_version: int = 0
    local_steps: int = 0
    retry_after_s: float = 0.0
    message: str = ""


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str = ""
    duplicate: bool = False
    token: str = ""


class Coordinator:
    """Owns one run: its recipe, strategy, registered clients and the durable store."""

    def __init__(self, recipe: Recipe, store: RunStore, strategy: Strategy, record: RunRecord,
                 metrics: CoordinatorMetrics | None = None) -> None:
        self.recipe = recipe
        self.metrics = metrics
        self.store = store
        self.strategy = strategy
        # A finished run resumed with more rounds than it committed goes on training.
        finished = record.done and record.committed_round >= recipe.rounds
        self.record = record if finished or not record.done else replace(record, done=False)
        self.phase = Phase.DONE if finished else Phase.WAITING
        self.round = record.committed_round
        self.clients: dict[str, ClientRecord] = {}
        self.selected: list[str] = []
        self.reported: set[str] = set()
        self.evaluations: dict[str, tuple[int, dict[str, float]]] = {}
        self.told_done: set[str] = set()
        self.started = time.monotonic()
        self._round_started = self.started
        self._changed = asyncio.Event()

    # ---- notifications --------------------------------------------------------------------
    def _notify(self) -> None:
        if self.metrics is not None:
            self.metrics.set_phase(self.phase, self.round, len(self.clients))
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._changed.wait(), timeout=max(timeout, 0.0))
        except asyncio.TimeoutError:
            pass

    # ---- registration and sessions --------------------------------------------------------
    @property
    def backbones(self) -> Backbones | None:
        """The run's backbones: fixed with the projector signature by the first admitted client."""
        return Backbones(**self.record.backbones) if self.record.backbones else None

    def register(self, client_id: str, shapes: Shapes, num_samples: int, num_eval_samples: int,
                 backbones: Backbones | None = None) -> Verdict:
        """Admit a client whose backbones (when given: the gRPC service always does) and projector fit the run."""
        if not CLIENT_ID_PATTERN.match(client_id):
            return Verdict(False, f"client id {client_id!r} is not allowed: use letters, digits, '.', '_', '-' "
                                  "(max 128 characters)")
        if num_samples <= 0:
            return Verdict(False, f"client {client_id} reports {num_samples} training samples; it needs at least 1")
        refusal = self._check_signature(client_id, shapes)
        refusal = refusal or (backbone_refusal(client_id, backbones, self.backbones, self.recipe) if backbones else "")
        if refusal:
            return Verdict(False, refusal)
        if not self.record.projector_shapes:
            self._fix_run(shapes, backbones)
        token = secrets.token_hex(16)
        self.clients[client_id] = ClientRecord(client_id, num_samples, num_eval_samples, token, time.monotonic(),
                                               backbones=backbones)
        log.info("registered %s (%d samples, %d held-out; %s)", client_id, num_samples, num_eval_samples,
                 backbones.describe() if backbones else "backbones not given")
        self._notify()
        return Verdict(True, token=token)

    def _check_signature(self, client_id: str, shapes: Shapes) -> str:
        expected = {key: tuple(shape) for key, shape in self.record.projector_shapes.items()}
        if not expected:
            expected = self._signature_from(shapes)
            if expected is None:
                return (f"client {client_id} offers projector {describe_shapes(shapes) or '(empty)'}, which is not a "
                        f"{self.recipe.projector_type} projector as the recipe asks")
            if expected != shapes:
                return (f"projector shape mismatch: the recipe's {self.recipe.projector_type} projector has "
                        f"{describe_shapes(expected)} but client {client_id} has {describe_shapes(shapes)}")
            return ""
        if shapes != expected:
            return (f"projector shape mismatch: the coordinator's projector is {describe_shapes(expected)} but "
                    f"client {client_id} has {describe_shapes(shapes)}; load the backbones the recipe names "
                    f"(vision_model={self.recipe.vision_model!r}, llm={self.recipe.llm!r})")
        return ""

    def _fix_run(self, shapes: Shapes, backbones: Backbones | None) -> None:
        """The first admitted client fixes the projector signature and the backbones; global v0 is written."""
        initial = init_projector_params(self.recipe.projector_type, shapes["linear_1.weight"][1],
                                        shapes["linear_1.weight"][0], self.recipe.seed)
        run = run_backbones(self.recipe, backbones) if backbones else None
        self.record = self.store.commit_initial_global(self.record, initial, run)
        if run is not None:
            log.info("the run's backbones: %s", run.describe())

    def _signature_from(self, shapes: Shapes) -> Shapes | None:
        """The recipe's projector shapes for the widths a client's first layer implies."""
        first = shapes.get("linear_1.weight")
        if first is None or len(first) != 2:
            return None
        return projector_shapes(self.recipe.projector_type, vision_hidden=first[1], text_hidden=first[0])

    def authenticate(self, client_id: str, token: str) -> ClientRecord:
        client = self.clients.get(client_id)
        if client is None or not secrets.compare_digest(client.token, token):
            raise SessionError(f"unknown session for client {client_id!r}; register again")
        client.last_seen = time.monotonic()
        return client

    # ---- tasks ------------------------------------------------------------------------------
    async def next_task(self, client: ClientRecord, hold_s: float = POLL_HOLD_S) -> TaskSpec:
        """The client's next task, holding the call up to `hold_s` while there is none."""
        deadline = time.monotonic() + hold_s
        while True:
            task = self._task_for(client)
            remaining = deadline - time.monotonic()
            if task.kind != "WAIT" or remaining <= 0:
                client.last_seen = time.monotonic()
                return task
            await self._wait_change(remaining)

    def _task_for(self, client: ClientRecord) -> TaskSpec:
        if self.phase is Phase.DONE:
            self.told_done.add(client.client_id)
            return TaskSpec("DONE", message="the run is finished")
        if self.phase is Phase.TRAINING and client.client_id in self.selected and client.client_id not in self.reported:
            client.state = "training"
            return TaskSpec("TRAIN", round=self.round, global_version=self.record.global_version,
                            local_steps=self.recipe.local_steps_for(client.num_samples))
        if self.phase is Phase.EVALUATING and client.client_id not in self.evaluations:
            client.state = "evaluating"
            return TaskSpec("EVALUATE", round=self.round, global_version=self.record.global_version)
        return TaskSpec("WAIT", retry_after_s=0.0, message=f"{self.phase.value.lower()}, round {self.round}")

    def global_blob(self, version: int) -> EncodedGlobal:
        """The current global version in the recipe's wire dtype (encoded once; call it off the event loop)."""
        if version != self.record.global_version:
            raise LookupError(f"global version {version} is not available; the current one is "
                              f"{self.record.global_version}")
        return self.store.encoded_global(version, self.recipe.wire_dtype)

    # ---- uploads and evaluations -------------------------------------------------------------
    def check_upload(self, client: ClientRecord, round_index: int, global_version: int) -> Verdict | None:
        """Why an upload header cannot be taken (None: go ahead and receive its chunks)."""
        if self.store.has_upload(round_index, client.client_id):
            return Verdict(True, "already received", duplicate=True)
        if self.phase is not Phase.TRAINING or round_index != self.round:
            return Verdict(False, f"round {round_index} is not open for uploads (phase {self.phase.value}, "
                                  f"round {self.round})")
        if client.client_id not in self.selected:
            return Verdict(False, f"client {client.client_id} is not selected for round {round_index}")
        if global_version != self.record.global_version:
            return Verdict(False, f"trained from global v{global_version}, round {round_index} uses "
                                  f"v{self.record.global_version}")
        return None

    def upload_accepted(self, client: ClientRecord, round_index: int) -> None:
        if self.phase is Phase.TRAINING and round_index == self.round:
            self.reported.add(client.client_id)
            client.state = "uploaded"
            self._notify()

    def accept_evaluation(self, client: ClientRecord, global_version: int, num_samples: int,
                          metrics: dict[str, float]) -> Verdict:
        if self.phase is not Phase.EVALUATING or global_version != self.record.global_version:
            return Verdict(False, f"no evaluation of v{global_version} is open (phase {self.phase.value})")
        self.evaluations[client.client_id] = (num_samples, dict(metrics))
        client.state = "evaluated"
        self._notify()
        return Verdict(True)

    # ---- the run ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Drive rounds until DONE; returns when the run is finished (the server keeps serving)."""
        if self.phase is Phase.DONE:
            return
        while len(self.clients) < self.recipe.min_clients:
            await self._wait_change(POLL_HOLD_S)
        for round_index in range(self.record.committed_round + 1, self.recipe.rounds + 1):
            await self._train_round(round_index)
        await self._final_evaluation()

    def _needed(self) -> int:
        return max(1, math.ceil(self.recipe.quorum * len(self.selected)))

    async def _train_round(self, round_index: int) -> None:
        self.round = round_index
        self.selected = choose_clients(self.clients, self.recipe, round_index)
        # Uploads spilled before a restart were trained from this same global version: keep them.
        self.reported = {upload.client_id for upload in self.store.uploads(round_index)} & set(self.selected)
        self.phase = Phase.TRAINING
        self._round_started = time.monotonic()
        log.info("round %d/%d: training on %s", round_index, self.recipe.rounds, ", ".join(self.selected))
        self._notify()
        deadline = self._round_started + self.recipe.round_timeout_s
        while not set(self.selected) <= self.reported:
            if time.monotonic() >= deadline:
                if len(self.reported) >= self._needed():
                    log.warning("round %d deadline: aggregating %d of %d selected clients", round_index,
                                len(self.reported), len(self.selected))
                    break
                log.warning("round %d deadline: only %d of %d needed uploads; waiting another %.0fs", round_index,
                            len(self.reported), self._needed(), self.recipe.round_timeout_s)
                deadline = time.monotonic() + self.recipe.round_timeout_s
            await self._wait_change(deadline - time.monotonic())
        await self._aggregate_and_commit(round_index)

    async def _aggregate_and_commit(self, round_index: int) -> None:
        self.phase = Phase.AGGREGATING
        self._notify()
        uploads = [upload for upload in self.store.uploads(round_index) if upload.client_id in self.reported]
        updates = SpilledUpdates(uploads)
        current = self.store.load_global(self.record.global_version)
        began = time.monotonic()
        new_global = await asyncio.to_thread(self.strategy.aggregate, current, updates)
        aggregation_s = time.monotonic() - began
        metrics = {
            "round": round_index,
            "participants": len(uploads),
            "clients": sorted(upload.client_id for upload in uploads),
            "duration_s": time.monotonic() - self._round_started,
            "aggregation_s": aggregation_s,
            **weighted_means([(upload.num_samples, upload.metrics) for upload in uploads]),
            **update_norms(current, new_global),
        }
        self.record = await asyncio.to_thread(self.store.commit_round, self.record, round_index, new_global,
                                              self.strategy.state_dict(), metrics)
        if self.metrics is not None:
            self.metrics.round_committed(metrics)
        for client in self.clients.values():
            client.state = "idle"
        log.info("round %d committed: %s", round_index, _summary(metrics))
        self._notify()

    async def _final_evaluation(self) -> None:
        self.phase = Phase.EVALUATING
        self.evaluations = {}
        self._round_started = time.monotonic()
        self._notify()
        deadline = self._round_started + self.recipe.round_timeout_s
        while time.monotonic() < deadline and not set(self.clients) <= set(self.evaluations):
            await self._wait_change(deadline - time.monotonic())
        final = weighted_means(list(self.evaluations.values()))
        final["evaluated_clients"] = float(len(self.evaluations))
        self.record = await asyncio.to_thread(self.store.commit_final, self.record, final)
        self.phase = Phase.DONE
        log.info("run finished: %s", _summary(final))
        self._notify()

    # ---- status ------------------------------------------------------------------------------
    def eta_s(self) -> float:
        history = self.record.history
        if self.phase is Phase.DONE:
            return 0.0
        if not history:
            return -1.0
        mean_round = sum(row["duration_s"] for row in history) / len(history)
        return mean_round * (self.recipe.rounds - self.record.committed_round)

    async def watch(self) -> AsyncIterator[None]:
        """Yields once now and then after every change, until the run is DONE."""
        while True:
            changed = self._changed
            yield None
            if self.phase is Phase.DONE:
                return
            await changed.wait()


def choose_clients(client_ids: Iterable[str], recipe: Recipe, round_index: int) -> list[str]:
    """The clients of a round: all of them, or `clients_per_round` drawn by a (seed, round) generator."""
    ids = sorted(client_ids)
    wanted = recipe.clients_per_round
    if wanted is None or wanted >= len(ids):
        return ids
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + round_index)
    picks = torch.randperm(len(ids), generator=generator)[:wanted].tolist()
    return sorted(ids[i] for i in picks)


def weighted_means(rows: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Sample-weighted mean of every metric the rows carry (each metric over the rows that have it)."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for num_samples, metrics in rows:
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + num_samples * float(value)
            weights[key] = weights.get(key, 0.0) + num_samples
    return {key: sums[key] / weights[key] for key in sorted(sums) if weights[key] > 0}


def update_norms(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, float]:
    """Size of the committed global step, for watching oscillation: ||W_{t+1} - W_t||_F over all tensors."""
    squared = sum(float((new[key] - old[key]).pow(2).sum()) for key in old)
    return {"global_update_norm": math.sqrt(squared)}


def _summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:.4g}" for key, value in metrics.items() if isinstance(value, float))
