"""The gRPC face of the coordinator: translates `Coordinator` calls to and from fedcmp.v1 messages.

Runs on grpc.aio. Sessions are checked on every call; blobs stream in CHUNK_BYTES chunks both
ways; uploads are spilled to disk chunk by chunk, never held whole in memory. The event loop only
moves bytes: an upload's header is judged here, its chunks are hashed, checked and written on the
store's I/O pool, and a download sends the global's BlobChunk messages, serialized once per version. WatchStatus
streams share one status build per burst of changes (server/status_feed.py).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fedcmp.common.codec import BlobIntegrityError, BlobLayout
from fedcmp.common.constants import MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from fedcmp.common.provenance import Backbones
from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc
from fedcmp.common.framing import parse_upload_message
from fedcmp.server.liveness import ClientRecord, Progress
from fedcmp.server.rounds import Coordinator, SessionError, TaskSpec, capped
from fedcmp.server.security import BearerTokenInterceptor, bearer_token, token_owner
from fedcmp.server.status_feed import StatusFeed
from fedcmp.server.store import UploadStorageError
from fedcmp.server.upload_rules import upload_header_problem

log = logging.getLogger("fedcmp.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
# Methods whose replies are serialized once and sent to every caller: a download's BlobChunks are
# built per global version, not per client (two copies of the projector less per download).
PRESERIALIZED = frozenset({"DownloadProjector"})
# Methods whose requests are read by hand: an upload's chunks are views of the received bytes.
VIEWED = {"UploadUpdate": parse_upload_message}

# Each stream's HTTP/2 receive window, fixed (gRPC's bandwidth-delay probing is off). With probing,
# gRPC grows the window of an upload whose chunks arrive faster than the I/O pool checks and writes
# them, and the server parks that much per stream: 16 concurrent uploads of the 84 MB 7B projector
# peaked at 19 projectors of anonymous memory above the server's start, against 7.4 with 4 MiB
# (docs/decisions.md). One stream's throughput is at most window / round-trip time (40 MB/s at
# 100 ms); `fedcmp-server --stream-window-mib` raises it for long, fat links.
STREAM_WINDOW_BYTES = 4 * 1024 * 1024
# Status stays far below fedcmp-status's 4 MiB receive limit, whatever the clients send or how many register.
STATUS_CLIENTS = 1000  # clients (and selected / reported / excluded ids) listed
STATUS_ROUNDS = 200  # most recent rounds in the history
STATUS_TEXT = 200  # characters of an exclusion reason


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator, tokens: dict[str, str] | None = None) -> None:
        self.coordinator = coordinator
        self.tokens = tokens  # bearer token -> client id, when --auth-tokens is on
        self.status_feed = StatusFeed(coordinator.watch, lambda: status_message(coordinator), coordinator.milestone)

    async def _session(self, client_id: str, token: str, context: grpc.aio.ServicerContext) -> ClientRecord:
        try:
            return self.coordinator.authenticate(client_id, token)
        except SessionError as error:
            # Not UNAUTHENTICATED (that means bad credentials): the client's cure is to register again.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
            raise  # abort raises; this keeps type checkers informed

    async def GetRecipe(self, request: pb.RecipeRequest, context: grpc.aio.ServicerContext) -> pb.RecipeReply:
        return pb.RecipeReply(recipe_json=self.coordinator.recipe.to_json(), protocol_version=PROTOCOL_VERSION)

    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        if request.protocol_version != PROTOCOL_VERSION:
            return pb.RegisterReply(accepted=False, reason=f"protocol version {request.protocol_version} is not "
                                                           f"supported; the coordinator speaks {PROTOCOL_VERSION}")
        if self.tokens is not None:
            owner = token_owner(self.tokens, bearer_token(context.invocation_metadata()))
            if owner != request.client_id:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"this bearer token does not belong to client {request.client_id!r}")
        shapes = {spec.name: tuple(spec.shape) for spec in request.projector}
        backbones = Backbones(request.vision_model, request.llm, request.vision_fingerprint, request.llm_fingerprint)
        verdict = self.coordinator.register(request.client_id, request.instance_id, shapes, request.num_samples,
                                            request.num_eval_samples, backbones)
        if not verdict.accepted:
            log.warning("refused %r: %s", request.client_id, verdict.reason)
        return pb.RegisterReply(accepted=verdict.accepted, reason=verdict.reason, session_token=verdict.token,
                                recipe_json=self.coordinator.recipe.to_json() if verdict.accepted else "",
                                retry_after_s=verdict.retry_after_s)

    async def PollTask(self, request: pb.PollTaskRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        client = await self._session(request.client_id, request.session_token, context)
        return task_message(await self.coordinator.next_task(client))

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatAck:
        client = await self._session(request.client_id, request.session_token, context)
        self.coordinator.heartbeat(client, Progress(round=request.round, step=request.step,
                                                    total_steps=request.total_steps, last_loss=request.last_loss))
        return pb.HeartbeatAck()

    async def DownloadProjector(self, request: pb.DownloadRequest,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await self._session(request.client_id, request.session_token, context)
        loop = asyncio.get_running_loop()
        try:  # the first download of a version encodes it, on the I/O pool
            encoded = await loop.run_in_executor(self.coordinator.store.io_pool, self.coordinator.global_blob,
                                                 request.global_version)
        except LookupError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
            raise  # abort raises; this keeps type checkers informed
        for message in encoded.messages:  # serialized BlobChunks (see PRESERIALIZED)
            yield message

    async def UploadUpdate(self, request_iterator: AsyncIterator[pb.UploadMessage | memoryview],
                           context: grpc.aio.ServicerContext) -> pb.UploadAck:
        """Messages come from `parse_upload_message`: a chunk is a view of its received bytes."""
        first = await anext(aiter(request_iterator), None)
        if not isinstance(first, pb.UploadMessage) or not first.HasField("header"):
            return pb.UploadAck(accepted=False, reason="an upload must start with a header message")
        header = first.header
        client = await self._session(header.client_id, header.session_token, context)
        verdict = self.coordinator.check_upload(client, header.round, header.global_version)
        if verdict is not None:
            self._count_upload("duplicate" if verdict.duplicate else "refused")
            return pb.UploadAck(accepted=verdict.accepted, reason=verdict.reason, duplicate=verdict.duplicate)

        recipe = self.coordinator.recipe
        metrics = dict(header.metrics)
        problem = upload_header_problem(header.num_samples, metrics, recipe.local_steps_for(client.num_samples),
                                        recipe.batch_size)
        if problem:
            log.warning("refused the upload of %s for round %d: %s", client.client_id, header.round, problem)
            self._count_upload("refused")
            self.coordinator.upload_refused(client, header.round, problem)
            return pb.UploadAck(accepted=False, reason=f"upload refused: {problem}")

        async def chunks() -> AsyncIterator[bytes | memoryview]:
            async for message in request_iterator:
                if isinstance(message, memoryview):
                    yield message
                elif message.HasField("chunk"):  # a chunk that protobuf parsed (it came with more fields)
                    yield message.chunk
                else:
                    raise BlobIntegrityError("a second header arrived in the middle of an upload")

        layout = BlobLayout.of(self.coordinator.record.projector_shapes, recipe.wire_dtype)
        try:
            spilled = await self.coordinator.store.spill_upload(header.round, client.client_id, header.num_samples,
                                                                metrics, header.size, header.sha256, chunks(), layout)
        except BlobIntegrityError as error:
            log.warning("rejected upload of %s for round %d: %s", client.client_id, header.round, error)
            self._count_upload("corrupt")
            self.coordinator.upload_refused(client, header.round, str(error))
            return pb.UploadAck(accepted=False, reason=f"upload rejected: {error}")
        except UploadStorageError as error:
            log.error("could not store the upload of %s for round %d: %s", client.client_id, header.round, error)
            self._count_upload("storage_error")
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED if full else grpc.StatusCode.UNAVAILABLE,
                                f"{error}; nothing was kept, retry later")
            raise  # abort raises; this keeps type checkers informed
        if spilled is None:  # another stream of this (client, round) published first
            self._count_upload("duplicate")
            return pb.UploadAck(accepted=True, reason="already received", duplicate=True)
        self.coordinator.upload_accepted(client, header.round)
        self._count_upload("accepted", header.size)
        return pb.UploadAck(accepted=True)

    def _count_upload(self, outcome: str, size: int = 0) -> None:
        if self.coordinator.metrics is not None:
            self.coordinator.metrics.uploads.labels(outcome=outcome).inc()
            self.coordinator.metrics.upload_bytes.inc(size)

    async def ReportEvaluation(self, request: pb.EvaluationReport,
                               context: grpc.aio.ServicerContext) -> pb.EvaluationAck:
        client = await self._session(request.client_id, request.session_token, context)
        verdict = self.coordinator.accept_evaluation(client, request.global_version, request.num_samples,
                                                     dict(request.metrics))
        return pb.EvaluationAck(accepted=verdict.accepted, reason=verdict.reason)

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.Status:
        return status_message(self.coordinator)

    async def WatchStatus(self, request: pb.StatusRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Status]:
        async for snapshot in self.status_feed.watch():
            yield snapshot


def task_message(task: TaskSpec) -> pb.Task:
    return pb.Task(kind=pb.Task.Kind.Value(task.kind), round=task.round, global_version=task.global_version,
                   local_steps=task.local_steps, retry_after_s=task.retry_after_s,
                   message=task.message)


def status_message(coordinator: Coordinator) -> pb.Status:
    """The run as operators see it, bounded in size whatever the clients did (STATUS_* caps)."""
    now = time.monotonic()
    record = coordinator.record
    clients = sorted(coordinator.clients.values(), key=lambda c: c.client_id)
    return pb.Status(
        phase=coordinator.phase.value,
        round=coordinator.round,
        total_rounds=coordinator.recipe.rounds,
        global_version=record.global_version,
        strategy=coordinator.strategy.name,
        clients=[pb.ClientInfo(client_id=c.client_id, num_samples=c.num_samples, state=c.state,
                               last_seen_s=now - c.last_seen, backbones=backbones_message(c.backbones),
                               round=c.progress.round, step=c.progress.step, total_steps=c.progress.total_steps,
                               last_loss=c.progress.last_loss, eta_s=c.progress.eta_s(now))
                 for c in clients[:STATUS_CLIENTS]],
        clients_total=len(clients),
        selected=coordinator.selected[:STATUS_CLIENTS],
        reported=sorted(coordinator.reported)[:STATUS_CLIENTS],
        history=[round_message(row) for row in record.history[-STATUS_ROUNDS:]],
        eta_s=coordinator.eta_s(),
        uptime_s=now - coordinator.started,
        final_metrics=capped(record.final_metrics),
        backbones=backbones_message(coordinator.backbones),
        healthy=coordinator.healthy,
        health_message=coordinator.health_message,
    )


def round_message(row: dict[str, Any]) -> pb.RoundMetrics:
    """A committed round's row: server fields, client metric means (under "metrics"; capped), exclusions."""
    timings = {key: float(row[key]) for key in ("aggregation_s", "global_update_norm") if key in row}
    return pb.RoundMetrics(round=row["round"], participants=row["participants"], duration_s=row["duration_s"],
                           metrics={**capped(row.get("metrics", {})), **timings},
                           excluded={client_id: reason[:STATUS_TEXT] for client_id, reason
                                     in list(row.get("excluded", {}).items())[:STATUS_CLIENTS]})


def backbones_message(backbones: Backbones | None) -> pb.Backbones | None:
    return pb.Backbones(**asdict(backbones)) if backbones is not None else None


_HANDLER_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler,
                  (False, True): grpc.unary_stream_rpc_method_handler,
                  (True, False): grpc.stream_unary_rpc_method_handler,
                  (True, True): grpc.stream_stream_rpc_method_handler}


def _as_is(message: bytes) -> bytes:
    return message


def add_coordinator_service(server: grpc.aio.Server, servicer: CoordinatorService) -> None:
    """Register the fedcmp.v1.Coordinator methods as the generated code does, except that the
    methods in PRESERIALIZED answer with messages already serialized (the store's `EncodedGlobal`)
    and those in VIEWED read their requests with their own parser."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["Coordinator"].methods:
        request, reply = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=VIEWED.get(method.name, request.FromString),
                                     response_serializer=_as_is if method.name in PRESERIALIZED
                                     else reply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def build_server(coordinator: Coordinator, bind: str, credentials: grpc.ServerCredentials | None = None,
                 tokens: dict[str, str] | None = None, public_status: bool = False,
                 stream_window_bytes: int = STREAM_WINDOW_BYTES) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the Coordinator, health and reflection services, bound to `bind`.

    With `credentials` it serves TLS (mutual TLS when they require client certificates); with
    `tokens` every call but health needs a bearer token: a client's, or for status and reflection
    an operator's unless `public_status`. Each stream's HTTP/2 receive window is fixed at
    `stream_window_bytes` (see STREAM_WINDOW_BYTES).
    """
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", stream_window_bytes)]
    interceptors = (BearerTokenInterceptor(tokens, public_status),) if tokens is not None else ()
    server = grpc.aio.server(options=options, interceptors=interceptors)
    add_coordinator_service(server, CoordinatorService(coordinator, tokens))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(bind, credentials) if credentials else server.add_insecure_port(bind)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    return server, port
