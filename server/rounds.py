"""The coordinator's round state machine, independent of gRPC.

WAITING (for min live clients) -> TRAINING(round r) -> AGGREGATING -> COMMITTED(r) -> ... ->
EVALUATING (the final projector on every live client's held-out split) -> DONE.

All state lives in the event loop's thread; the gRPC servicer calls into it, and the only work
sent to a worker thread is aggregation and disk writes. Every change wakes the long-polling
clients and status watchers. Who may register is decided in `admission`, who is alive in
`liveness`, and how a round is aggregated without a bad update in `safe_aggregation`; a
disk error on a commit never ends the run: the coordinator reports itself unhealthy and
retries (`_durably`).
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fedcmp.common.constants import POLL_HOLD_S
from fedcmp.common.projector import describe_shapes, init_projector_params
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe
from fedcmp.server.admission import (Signature, id_in_use, id_refusal, majority, offer_refusal, pinned_shapes,
                                     room_for, signature, signature_of)
from fedcmp.server.identity import backbone_refusal, run_backbones
from fedcmp.server.liveness import GONE, ClientRecord, Progress, Shapes, is_live, live_ids, sweep, touch
from fedcmp.server.safe_aggregation import Outcome, aggregate_safely
from fedcmp.server.store import EncodedGlobal, RunRecord, RunStore, SpilledUpload
from fedcmp.server.strategies import Strategy
from fedcmp.common.allocator import release_free_memory
from fedcmp.server.strategies.base import blocks, sum_of_squares

if TYPE_CHECKING:
    from fedcmp.server.metrics import CoordinatorMetrics

log = logging.getLogger("fedcmp.server")

METRICS_KEPT = 32  # client metric means a round row keeps
METRIC_NAME_CHARS = 64
COMMIT_RETRY_FIRST_S = 1.0  # first wait after a commit's disk writes failed; doubles up to
COMMIT_RETRY_MAX_S = 60.0


class Phase(str, Enum):
    WAITING = "WAITING"
    TRAINING = "TRAINING"
    AGGREGATING = "AGGREGATING"
    EVALUATING = "EVALUATING"
    DONE = "DONE"


class SessionError(PermissionError):
    """A call with an unknown client or a stale session token: the client must register again."""


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
    retry_after_s: float = 0.0


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
        # The projector shape and backbones: final once a round is committed; before, the shape may be
        # pinned by the recipe, and both are chosen by the live registrants when round 1 opens
        # (admission's module doc says why). `self.signature` is set once they are fixed.
        committed = record.committed_round > 0
        shapes = {key: tuple(shape) for key, shape in record.projector_shapes.items()}
        self.shapes: Shapes | None = shapes if committed else pinned_shapes(recipe)
        self.backbones: Backbones | None = Backbones(**record.backbones) if committed and record.backbones else None
        self.signature: Signature | None = signature(shapes, self.backbones) if committed else None
        self.clients: dict[str, ClientRecord] = {}
        self.selected: list[str] = []
        self.reported: set[str] = set()
        # Selected clients of the open round whose upload was refused for what it holds (id -> reason): retraining
        # the same task would be refused again, so until the round (re-)opens it neither waits for nor tasks them.
        self.refused: dict[str, str] = {}
        self.evaluations: dict[str, tuple[int, dict[str, float]]] = {}
        self.told_done: set[str] = set()
        self.healthy = True
        self.health_message = ""
        self.started = time.monotonic()
        self._round_started = self.started
        self._changed = asyncio.Event()
        # Held polls wake on milestones only: at hundreds of clients every upload or registration woke
        # every held poll (O(K^2) task checks a round on the event loop, issue 12).
        self._tasks_changed = asyncio.Event()
        self._tasks_milestone: tuple[str, int, int, bool] | None = None

    # ---- notifications --------------------------------------------------------------------
    def _notify(self) -> None:
        if self.metrics is not None:
            self.metrics.set_phase(self.phase, self.round, len(self.clients))
        self._changed.set()
        self._changed = asyncio.Event()
        if self.milestone() != self._tasks_milestone:  # only a milestone can turn a WAIT into a task
            self._tasks_milestone = self.milestone()
            self._tasks_changed.set()
            self._tasks_changed = asyncio.Event()

    async def _wait_change(self, timeout: float, tasks_only: bool = False) -> None:
        """Until the next change (with `tasks_only`: the next milestone, see `next_task`), or `timeout` seconds."""
        changed = self._tasks_changed if tasks_only else self._changed
        waiter = asyncio.ensure_future(changed.wait())
        try:  # not asyncio.wait_for: on 3.11 it drops a cancel that lands as the event is set
            await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        finally:
            waiter.cancel()

    # ---- registration and sessions --------------------------------------------------------
    def register(self, client_id: str, instance_id: str, shapes: Shapes, num_samples: int,
                 num_eval_samples: int, backbones: Backbones | None = None) -> Verdict:
        """Admit a client whose id, backbones (when given: the gRPC service always does) and projector fit the run."""
        now = time.monotonic()
        timeout = self.recipe.client_timeout_s
        samples = "" if num_samples > 0 else f"client {client_id} reports {num_samples} training samples; it needs at least 1"
        refusal = (id_refusal(client_id) or samples or offer_refusal(self.recipe, client_id, shapes, self.shapes)
                   or (backbone_refusal(client_id, backbones, self.backbones, self.recipe) if backbones else ""))
        if refusal:
            return Verdict(False, refusal)
        refusal, retry_after = id_in_use(self.clients.get(client_id), instance_id, now, timeout)
        if refusal:
            return Verdict(False, refusal, retry_after_s=retry_after)
        refusal, evicted = room_for(self.clients, client_id, self.recipe.max_clients, now, timeout)
        if refusal:
            return Verdict(False, refusal)
        if evicted is not None:
            log.info("%s takes the place of %s, gone since %.0fs", client_id, evicted, now - self.clients[evicted].last_seen)
            del self.clients[evicted]
        previous = self.clients.get(client_id)
        if previous is not None and previous.instance_id != instance_id:
            log.info("%s restarted (new client process); it takes its id back", client_id)
            self.refused.pop(client_id, None)  # a new process (perhaps a fixed one) may train the round again
        token = secrets.token_hex(16)
        self.clients[client_id] = ClientRecord(client_id, instance_id, num_samples, num_eval_samples, token, now,
                                               shapes=dict(shapes), backbones=backbones)
        log.info("registered %s (%d samples, %d held-out; %s)", client_id, num_samples, num_eval_samples,
                 backbones.describe() if backbones else "backbones not given")
        self._notify()
        return Verdict(True, token=token)

    def authenticate(self, client_id: str, token: str) -> ClientRecord:
        client = self.clients.get(client_id)
        if client is None or not secrets.compare_digest(client.token, token):
            raise SessionError(f"unknown session for client {client_id!r}; register again")
        if touch(client, time.monotonic()):
            log.info("%s is back", client_id)
            self._notify()
        return client

    def heartbeat(self, client: ClientRecord, progress: Progress) -> None:
        """A working client's progress; shown in status (no notification: watchers see it on the next change).
        The task's start time stays the coordinator's own, so the ETA needs no client clock."""
        started = client.progress.started if client.progress.round == progress.round else time.monotonic()
        client.progress = replace(progress, started=started)

    # ---- liveness ---------------------------------------------------------------------------
    def live(self) -> set[str]:
        return live_ids(self.clients.values(), time.monotonic(), self.recipe.client_timeout_s)

    async def _watch_liveness(self) -> None:
        """Mark silent clients gone; a gone client leaves the open round (its upload, if any, stays)."""
        period = min(1.0, self.recipe.heartbeat_interval_s)
        while True:
            gone = sweep(self.clients.values(), time.monotonic(), self.recipe.client_timeout_s)
            for client in gone:
                left = client.client_id in self.selected and client.client_id not in self.reported
                if left:
                    self.selected.remove(client.client_id)
                log.warning("%s is gone (silent for %.0fs)%s", client.client_id, self.recipe.client_timeout_s,
                            f"; it leaves round {self.round}" if left else "")
            if gone:
                self._notify()
            await asyncio.sleep(period)

    # ---- tasks ------------------------------------------------------------------------------
    async def next_task(self, client: ClientRecord, hold_s: float = POLL_HOLD_S) -> TaskSpec:
        """The client's next task, holding the call while there is none (at most a heartbeat interval,
        so a waiting client is heard from as often as a working one). A held call looks again only
        when a milestone (phase, round, commit, health) moves: nothing else turns a WAIT into a task."""
        deadline = time.monotonic() + min(hold_s, self.recipe.heartbeat_interval_s)
        while True:
            task = self._task_for(client)
            remaining = deadline - time.monotonic()
            if task.kind != "WAIT" or remaining <= 0:
                touch(client, time.monotonic())
                return task
            await self._wait_change(remaining, tasks_only=True)

    def _task_for(self, client: ClientRecord) -> TaskSpec:
        if self.phase is Phase.DONE:
            self.told_done.add(client.client_id)
            return TaskSpec("DONE", message="the run is finished")
        if self.phase is Phase.TRAINING and client.client_id in self.refused:
            reason = self.refused[client.client_id]
            return TaskSpec("WAIT", message=f"your upload for round {self.round} was refused ({reason}); "
                                            "wait for the next round")
        if self.phase is Phase.TRAINING and client.client_id in self.selected and client.client_id not in self.reported:
            client.state = "training"
            steps = self.recipe.local_steps_for(client.num_samples)
            client.progress = Progress(round=self.round, total_steps=steps, started=time.monotonic())
            return TaskSpec("TRAIN", round=self.round, global_version=self.record.global_version, local_steps=steps)
        if self.phase is Phase.EVALUATING and client.client_id not in self.evaluations:
            client.state = "evaluating"
            client.progress = Progress(round=self.round)
            return TaskSpec("EVALUATE", round=self.round, global_version=self.record.global_version)
        return TaskSpec("WAIT", retry_after_s=0.0, message=f"{self.phase.value.lower()}, round {self.round}")

    def global_blob(self, version: int) -> EncodedGlobal:
        """The current global version in the recipe's wire dtype (encoded once; call it off the event loop)."""
        if version != self.record.global_version or self.shapes is None:
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

    def upload_refused(self, client: ClientRecord, round_index: int, reason: str) -> None:
        """A selected client's upload for the open round was refused for its header or contents: the same task
        would be refused again, so the client leaves the round's waiting list and gets WAIT until the next one."""
        if (self.phase is Phase.TRAINING and round_index == self.round and client.client_id in self.selected
                and client.client_id not in self.reported):
            self.refused[client.client_id] = reason
            client.state = "refused"
            self._notify()

    def upload_accepted(self, client: ClientRecord, round_index: int) -> None:
        if self.phase is Phase.TRAINING and round_index == self.round:
            self.refused.pop(client.client_id, None)
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
        watchdog = asyncio.create_task(self._watch_liveness())
        try:
            for round_index in range(self.record.committed_round + 1, self.recipe.rounds + 1):
                await self._train_round(round_index)
            await self._final_evaluation()
        finally:
            watchdog.cancel()

    def _candidates(self) -> list[str]:
        """Live clients with the run's signature (before it is fixed: with the majority's)."""
        now = time.monotonic()
        live = [client for client in self.clients.values() if is_live(client, now, self.recipe.client_timeout_s)]
        reference = self.signature
        if reference is None:
            leader = majority(live)
            reference = signature_of(leader) if leader else None
        return sorted(client.client_id for client in live if signature_of(client) == reference)

    async def _await_clients(self) -> list[str]:
        """Wait (phase WAITING) until `min_clients` live clients can train; returns them."""
        while len(candidates := self._candidates()) < self.recipe.min_clients:
            if self.phase is not Phase.WAITING:
                self.phase = Phase.WAITING
                log.info("waiting for %d live clients (%d now)", self.recipe.min_clients, len(candidates))
                self._notify()
            await self._wait_change(self.recipe.heartbeat_interval_s)
        return candidates

    async def _fix_run(self, reference: ClientRecord) -> None:
        """Make `reference`'s projector shape and backbones the run's, write global v0 from the seed;
        registrants with another signature must leave."""
        self.shapes = reference.shapes
        self.backbones = run_backbones(self.recipe, reference.backbones) if reference.backbones else None
        self.signature = signature_of(reference)
        self.record = await self._durably("write global v0", self._write_initial_global, self.shapes, self.backbones)
        for client in [c for c in self.clients.values() if signature_of(c) != self.signature]:
            log.warning("dropping %s: its projector %s or backbones differ from the run's", client.client_id,
                        describe_shapes(client.shapes))
            del self.clients[client.client_id]  # its next call fails; registering again says why
        log.info("projector fixed: %s; backbones: %s", describe_shapes(self.shapes),
                 self.backbones.describe() if self.backbones else "not given")

    def _write_initial_global(self, shapes: Shapes, backbones: Backbones | None) -> RunRecord:
        """Global v0 of `shapes` from the recipe's seed, allocated and written in a worker thread."""
        vision_hidden, text_hidden = shapes["linear_1.weight"][1], shapes["linear_1.weight"][0]
        initial = init_projector_params(self.recipe.projector_type, vision_hidden, text_hidden, self.recipe.seed)
        return self.store.commit_initial_global(self.record, initial, backbones)

    def _needed(self) -> int:
        return max(1, math.ceil(self.recipe.quorum * len(self.selected)))

    async def _train_round(self, round_index: int) -> None:
        self.round = round_index
        while True:
            candidates = await self._await_clients()
            if self.signature is None:
                await self._fix_run(self.clients[candidates[0]])  # candidates share the majority's signature
            if await self._collect_uploads(round_index):
                break
            log.warning("round %d: no selected client uploaded; re-opening it with the live clients", round_index)
        await self._aggregate_and_commit(round_index)

    async def _collect_uploads(self, round_index: int) -> bool:
        """Run the TRAINING phase of a round; True when there are uploads to aggregate.

        The round closes when every selected client still in it has uploaded or had its upload
        refused, with at least one upload; at its deadline when a quorum of them has uploaded; at
        twice the deadline with whatever uploads there are (live stragglers heartbeat, so they get
        one more timeout). Gone clients leave the round. A client whose upload was refused is asked
        nothing more until the round is (re-)opened: so it retries at most once per opening.
        """
        self.selected = choose_clients(self._candidates(), self.recipe, round_index)
        # Uploads spilled before a restart were trained from this same global version: keep them.
        self.reported = {upload.client_id for upload in self.store.uploads(round_index)} & set(self.selected)
        self.refused = {}
        self.phase = Phase.TRAINING
        self._round_started = time.monotonic()
        log.info("round %d/%d: training on %s", round_index, self.recipe.rounds, ", ".join(self.selected))
        self._notify()
        deadline = self._round_started + self.recipe.round_timeout_s
        last_call = deadline + self.recipe.round_timeout_s
        while set(self.selected) - self.reported - set(self.refused) or (self.refused and not self.reported):
            now = time.monotonic()
            if now >= deadline and len(self.reported) >= self._needed():
                log.warning("round %d deadline: aggregating %d of %d selected clients", round_index,
                            len(self.reported), len(self.selected))
                break
            if now >= last_call:
                log.warning("round %d: %d of %d needed uploads after %.0fs; closing with what there is",
                            round_index, len(self.reported), self._needed(), now - self._round_started)
                break
            await self._wait_change((deadline if now < deadline else last_call) - now)
        return bool(self.reported)

    async def _aggregate_and_commit(self, round_index: int) -> None:
        self.phase = Phase.AGGREGATING
        self._notify()
        self.store.forget_encoded_global()
        # The transfers' buffers and the encoded global are free now: handing them back before the
        # aggregation maps the global and an upload keeps them out of its peak (docs/decisions.md).
        await asyncio.to_thread(release_free_memory)
        began = time.monotonic()
        uploads, outcome, new_global, step_norm = await asyncio.to_thread(self._aggregate, round_index,
                                                                           set(self.reported))
        aggregation_s = time.monotonic() - began
        for client_id, reason in outcome.excluded.items():
            log.warning("round %d: %s's update is left out: %s", round_index, client_id, reason)
        if outcome.new_global is None:
            log.error("round %d: no update could be aggregated; the global stays as it was", round_index)
        used = [upload for upload in uploads if upload.client_id not in outcome.excluded]
        row = {
            "round": round_index,
            "participants": len(used),
            "clients": sorted(upload.client_id for upload in used),
            "excluded": dict(sorted(outcome.excluded.items())),
            "duration_s": time.monotonic() - self._round_started,
            "aggregation_s": aggregation_s,
            "global_update_norm": step_norm,
            "metrics": capped(weighted_means([(upload.num_samples, capped(upload.metrics)) for upload in used])),
        }
        self.record = await self._durably(f"commit round {round_index}", self.store.commit_round, self.record,
                                          round_index, new_global, self.strategy.state_dict(), row)
        if self.metrics is not None:
            self.metrics.round_committed(row)
        for client in self.clients.values():
            if client.state != GONE:
                client.state = "idle"
        log.info("round %d committed: %s", round_index, _summary(row))
        self._notify()

    def _aggregate(self, round_index: int, reported: set[str]
                   ) -> tuple[list[SpilledUpload], Outcome, dict[str, Tensor], float]:
        """Off the event loop: the round's uploads, the aggregation's outcome, the global to commit
        (the old one when nothing aggregated) and the size of the step to it."""
        uploads = [upload for upload in self.store.uploads(round_index) if upload.client_id in reported]
        current = self.store.load_global(self.record.global_version)
        outcome = aggregate_safely(self.strategy, current, uploads)
        new_global = current if outcome.new_global is None else outcome.new_global
        return uploads, outcome, new_global, update_norm(current, new_global)

    async def _final_evaluation(self) -> None:
        self.phase = Phase.EVALUATING
        self.evaluations = {}
        self._round_started = time.monotonic()
        self._notify()
        deadline = self._round_started + self.recipe.round_timeout_s
        while time.monotonic() < deadline and not self.live() <= set(self.evaluations):
            await self._wait_change(deadline - time.monotonic())
        final = capped(weighted_means([(samples, capped(metrics)) for samples, metrics in self.evaluations.values()]))
        final["evaluated_clients"] = float(len(self.evaluations))
        self.record = await self._durably("commit the final evaluation", self.store.commit_final, self.record, final)
        self.phase = Phase.DONE
        log.info("run finished: %s", _summary(final))
        self._notify()

    async def _durably(self, what: str, write: Callable[..., RunRecord], *args: Any) -> RunRecord:
        """`write(*args)` in a worker thread, retried with backoff while the disk fails.

        Meanwhile the last commit stays as it was and the coordinator reports itself unhealthy.
        """
        delay = COMMIT_RETRY_FIRST_S
        while True:
            try:
                result = await asyncio.to_thread(write, *args)
            except OSError as error:
                self.healthy = False
                self.health_message = (f"cannot {what}: {error.strerror or error}; retrying every {delay:.0f}s "
                                       f"(the last commit, round {self.record.committed_round}, is intact)")
                log.error("%s", self.health_message)
                self._notify()
                await asyncio.sleep(delay)
                delay = min(2 * delay, COMMIT_RETRY_MAX_S)
                continue
            if not self.healthy:
                log.info("%s: the disk works again", what)
                self.healthy, self.health_message = True, ""
            return result

    # ---- status ------------------------------------------------------------------------------
    def eta_s(self) -> float:
        history = self.record.history
        if self.phase is Phase.DONE:
            return 0.0
        if not history:
            return -1.0
        mean_round = sum(row["duration_s"] for row in history) / len(history)
        return mean_round * (self.recipe.rounds - self.record.committed_round)

    def milestone(self) -> tuple[str, int, int, bool]:
        """What status watchers must see every change of (server/status_feed.py): phase, round, commit, health."""
        return self.phase.value, self.round, self.record.committed_round, self.healthy

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


def capped(metrics: dict[str, Any]) -> dict[str, float]:
    """The first METRICS_KEPT numeric entries of a metrics map by name (names up to METRIC_NAME_CHARS).

    Round rows and status keep no more, whatever maps the clients send.
    """
    numeric = ((key, float(value)) for key, value in metrics.items()
               if isinstance(value, (int, float)) and len(key) <= METRIC_NAME_CHARS)
    return dict(heapq.nsmallest(METRICS_KEPT, numeric))


def update_norm(old: dict[str, Tensor], new: dict[str, Tensor]) -> float:
    """Size of the committed global step, for watching oscillation: ||W_{t+1} - W_t||_F over all tensors."""
    return math.sqrt(sum(sum_of_squares(torch.sub(new_block, old_block))
                         for key in old for new_block, old_block in zip(blocks(new[key].contiguous()),
                                                                        blocks(old[key].contiguous()))))


def _summary(values: dict[str, Any]) -> str:
    """The float values of a round row (its client metrics included) or of the final metrics, for the log."""
    floats = {**{key: value for key, value in values.items() if isinstance(value, float)}, **values.get("metrics", {})}
    return ", ".join(f"{key}={value:.4g}" for key, value in floats.items())
