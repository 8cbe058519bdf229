"""The client daemon's loop: recipe -> register -> long-poll tasks -> download / train / upload -> DONE.

Talks to the coordinator over synchronous gRPC (training blocks anyway). Every call survives a
coordinator that is briefly away: UNAVAILABLE is retried with capped exponential backoff, and a
FAILED_PRECONDITION answer (the coordinator restarted and forgot our session) re-registers. Uploads
are idempotent per (client, round), so a retried upload never counts twice. A refused upload (the
coordinator judged its header or contents) is not sent again: the daemon polls for its next task,
and should the coordinator hand out the refused task again, it waits with capped exponential
backoff before training it (`RefusalBackoff`). While a task runs,
a heartbeat thread reports progress (client/heartbeat.py). Each daemon process registers with
a random instance id, so the coordinator can tell its restart from a second process using
the same client id (that one is refused until the first has been silent for client_timeout_s).
"""
from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
from torch import Tensor

from fedcmp.client.heartbeat import Heartbeat
from fedcmp.client.progress import TrainingProgress
from fedcmp.common.codec import decode_projector, joined_chunks, parts_digest, projector_parts, receive_blob
from fedcmp.common.constants import (MAX_MESSAGE_BYTES, PROTOCOL_VERSION, RECONNECT_BASE_S, RECONNECT_BUDGET_S,
                                     RECONNECT_MAX_S)
from fedcmp.common.framing import parse_blob_chunk
from fedcmp.common.provenance import Backbones, ProjectorProvenance
from fedcmp.common.recipe import Recipe
from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("fedcmp.client")

T = TypeVar("T")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
POLL_DEADLINE_S = 60.0
DOWNLOAD_METHOD = f"/{pb.DESCRIPTOR.services_by_name['Coordinator'].full_name}/DownloadProjector"


class RegistrationRefused(RuntimeError):
    """The coordinator refused this client (shapes, credentials); the message is the coordinator's reason."""


class CoordinatorUnreachable(RuntimeError):
    """No answer within the reconnect budget."""


@dataclass
class ConnectionSettings:
    target: str
    credentials: grpc.ChannelCredentials | None = None
    call_metadata: tuple[tuple[str, str], ...] = ()
    reconnect_budget_s: float = RECONNECT_BUDGET_S


class CoordinatorLink:
    """A channel to the coordinator plus the retry policy every call goes through."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if settings.credentials is not None:
            self.channel = grpc.secure_channel(settings.target, settings.credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(settings.target, options=options)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        # DownloadProjector read by hand: each reply is (a view of the chunk's bytes, the rest of the BlobChunk)
        self.download_chunks = self.channel.unary_stream(
            DOWNLOAD_METHOD, request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=parse_blob_chunk)

    def call(self, what: str, attempt: Callable[[], T], on_lost_session: Callable[[], None] | None = None) -> T:
        """Run `attempt` until it succeeds, backing off while the coordinator is unreachable."""
        delay = RECONNECT_BASE_S
        give_up_at = time.monotonic() + self.settings.reconnect_budget_s
        while True:
            try:
                return attempt()
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.FAILED_PRECONDITION and on_lost_session is not None:
                    log.warning("%s: %s; registering again", what, error.details())
                    on_lost_session()
                    continue
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise RegistrationRefused(f"{what}: {error.details()}") from error
                if code not in RETRYABLE:
                    raise
                if time.monotonic() >= give_up_at:
                    raise CoordinatorUnreachable(
                        f"{what}: coordinator {self.settings.target} unreachable for "
                        f"{self.settings.reconnect_budget_s:.0f}s ({code.name}: {error.details()})") from error
                log.warning("%s: coordinator unavailable (%s); retrying in %.1fs", what, code.name, delay)
                time.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, RECONNECT_MAX_S)

    def close(self) -> None:
        self.channel.close()


@dataclass
class RefusalBackoff:
    """How long to wait before training a task whose upload the coordinator refused: 0 for a new task;
    for the same (round, global version) again, `first_s` doubling with each refusal up to `max_s`."""

    first_s: float = RECONNECT_BASE_S
    max_s: float = RECONNECT_MAX_S
    task: tuple[int, int] | None = None
    refusals: int = 0

    def refused(self, task: pb.Task) -> None:
        key = (task.round, task.global_version)
        self.refusals = self.refusals + 1 if key == self.task else 1
        self.task = key

    def delay_s(self, task: pb.Task) -> float:
        if (task.round, task.global_version) != self.task:
            return 0.0
        return min(self.first_s * 2 ** (self.refusals - 1), self.max_s)


class ClientDaemon:
    """One client's participation in one run. `fetch_recipe` first, then `run` with a loaded session."""

    def __init__(self, link: CoordinatorLink, client_id: str, progress: TrainingProgress | None = None) -> None:
        self.link = link
        self.client_id = client_id
        self.instance_id = secrets.token_hex(8)  # this process; a restart gets a new one
        self.progress = progress or TrainingProgress(interval_s=30.0)
        self.token = ""
        self.refusals = RefusalBackoff()
        self._global: tuple[int, dict[str, Tensor]] | None = None
        self.session = None  # the LocalSession, set by run()
        self.backbones: Backbones | None = None  # what the session loaded, set by run()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return self.link.settings.call_metadata

    def fetch_recipe(self) -> Recipe:
        reply = self.link.call("GetRecipe", lambda: self.link.stub.GetRecipe(
            pb.RecipeRequest(client_id=self.client_id), metadata=self._metadata()))
        return Recipe.from_json(reply.recipe_json)

    def register(self) -> None:
        """Register, waiting (up to the reconnect budget) while another live process holds our id."""
        session = self.session
        request = pb.RegisterRequest(
            client_id=self.client_id, num_samples=session.num_train_samples, num_eval_samples=session.num_val_samples,
            projector=[pb.TensorSpec(name=name, shape=list(shape)) for name, shape in session.signature().items()],
            vision_model=self.backbones.vision_model, llm=self.backbones.llm,
            vision_fingerprint=self.backbones.vision_fingerprint, llm_fingerprint=self.backbones.llm_fingerprint,
            protocol_version=PROTOCOL_VERSION, instance_id=self.instance_id)
        give_up_at = time.monotonic() + self.link.settings.reconnect_budget_s
        while True:
            reply = self.link.call("Register", lambda: self.link.stub.Register(request, metadata=self._metadata()))
            if reply.accepted or reply.retry_after_s <= 0 or time.monotonic() + reply.retry_after_s > give_up_at:
                break
            log.warning("not registered yet: %s; retrying in %.0fs", reply.reason, reply.retry_after_s)
            time.sleep(reply.retry_after_s)
        if not reply.accepted:
            raise RegistrationRefused(reply.reason)
        self.token = reply.session_token
        log.info("registered %s with %d training / %d held-out samples", self.client_id,
                 session.num_train_samples, session.num_val_samples)

    def run(self, session, backbones: Backbones) -> None:  # session: fedcmp.client.trainer.LocalSession
        """Register with the session's backbones and serve tasks until the coordinator says DONE."""
        self.session = session
        self.backbones = backbones
        self.register()
        while True:
            task = self.link.call("PollTask", lambda: self.link.stub.PollTask(
                pb.PollTaskRequest(client_id=self.client_id, session_token=self.token),
                timeout=POLL_DEADLINE_S, metadata=self._metadata()), on_lost_session=self.register)
            kind = pb.Task.Kind.Name(task.kind)
            if kind == "DONE":
                log.info("coordinator says DONE: %s", task.message)
                return
            if kind == "WAIT":
                time.sleep(task.retry_after_s)
            elif kind == "TRAIN":
                if delay := self.refusals.delay_s(task):
                    log.warning("round %d: the coordinator hands out the task it refused the upload of; "
                                "training it again in %.1fs", task.round, delay)
                    time.sleep(delay)
                with self.heartbeat(task) as heartbeat:
                    self.train(task, heartbeat)
            elif kind == "EVALUATE":
                with self.heartbeat(task):
                    self.evaluate(task)
            else:
                raise RuntimeError(f"coordinator sent an unknown task kind {task.kind}")

    def heartbeat(self, task: pb.Task) -> Heartbeat:
        """A heartbeat for the duration of `task` (download, work, upload)."""
        def beat(step: int, loss: float) -> None:
            request = pb.HeartbeatRequest(client_id=self.client_id, session_token=self.token, round=task.round,
                                          step=step, total_steps=task.local_steps, last_loss=loss)
            try:
                self.link.stub.Heartbeat(request, timeout=interval, metadata=self._metadata())
            except grpc.RpcError as error:  # the task's own calls retry; a lost heartbeat only delays news
                log.debug("heartbeat failed: %s %s", error.code().name, error.details())

        interval = self.session.recipe.heartbeat_interval_s
        return Heartbeat(beat, interval)

    def download(self, version: int) -> dict[str, Tensor]:
        if self._global is not None and self._global[0] == version:
            return self._global[1]

        def attempt() -> bytearray:
            stream = self.link.download_chunks(
                pb.DownloadRequest(client_id=self.client_id, session_token=self.token, global_version=version),
                metadata=self._metadata())
            first_data, first = next(stream)
            chunks = (data for data, _ in _prepend((first_data, first), stream))
            return receive_blob(chunks, first.total_size, first.sha256)

        params = decode_projector(self.link.call(f"DownloadProjector v{version}", attempt,
                                              on_lost_session=self.register))
        self._global = (version, params)
        return params

    def train(self, task: pb.Task, heartbeat: Heartbeat) -> None:
        global_params = self.download(task.global_version)
        before = self.session.evaluate(global_params)
        log.info("round %d: global v%d held-out loss %.4f; training %d steps", task.round, task.global_version,
                 before["val_loss"], task.local_steps)
        self.progress.begin(task.round, task.local_steps)

        def on_step(done: int, loss: float) -> None:
            heartbeat.progress(done, loss)
            self.progress.step(done, loss)

        params, metrics = self.session.train_round(global_params, task.round - 1, task.local_steps, on_step=on_step)
        self.upload(task, params, {**metrics, **before, **self.session.data_metrics()})

    def upload(self, task: pb.Task, params: dict[str, Tensor], metrics: dict[str, float]) -> None:
        model = self.session.model
        provenance = ProjectorProvenance.of(self.session.recipe, self.backbones, model.vision_hidden, model.text_hidden,
                                            task.round)
        parts = projector_parts(params, self.session.recipe.wire_dtype, provenance.to_metadata())  # views, no blob
        size, digest = parts_digest(parts)
        samples = int(metrics.get("samples", self.session.num_train_samples))

        def messages() -> Iterator[pb.UploadMessage]:
            yield pb.UploadMessage(header=pb.UploadHeader(
                client_id=self.client_id, session_token=self.token, round=task.round,
                global_version=task.global_version, num_samples=samples, metrics=metrics, size=size,
                sha256=digest))
            for chunk in joined_chunks(parts):
                yield pb.UploadMessage(chunk=chunk)

        ack = self.link.call(f"UploadUpdate round {task.round}",
                             lambda: self.link.stub.UploadUpdate(messages(), metadata=self._metadata()),
                             on_lost_session=self.register)
        if ack.accepted:
            self.progress.uploaded()
            log.info("round %d: upload %s (%d bytes)", task.round, "already there" if ack.duplicate else "accepted",
                     size)
        else:  # a refusal is for what the upload holds: sending it again cannot help
            self.refusals.refused(task)
            log.warning("round %d: upload refused: %s", task.round, ack.reason)

    def evaluate(self, task: pb.Task) -> None:
        metrics = self.session.evaluate(self.download(task.global_version))
        log.info("final evaluation of global v%d: held-out loss %.4f", task.global_version, metrics["val_loss"])
        report = pb.EvaluationReport(client_id=self.client_id, session_token=self.token,
                                     global_version=task.global_version, num_samples=self.session.num_val_samples,
                                     metrics=metrics)
        ack = self.link.call("ReportEvaluation", lambda: self.link.stub.ReportEvaluation(
            report, metadata=self._metadata()), on_lost_session=self.register)
        if not ack.accepted:
            log.warning("evaluation refused: %s", ack.reason)


def _prepend(first: T, rest: Iterator[T]) -> Iterator[T]:
    yield first
    yield from rest
