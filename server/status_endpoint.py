"""A status port off the coordinator's event loop: GetStatus and WatchStatus from snapshots, in a thread.

Every call the coordinator serves shares its one event loop, so under a round's burst of
transfers and polls a status call waits in the loop's queue behind them (docs/decisions.md:
builds take a few ms, the wait up to hundreds). With `fedcmp-server --status-port`, a second
gRPC server in a thread of its own, with its own event loop, answers from the latest snapshot
that the coordinator's loop publishes every `REFRESH_S`, so an operator's call costs the
coordinator nothing and waits for nothing but the snapshot handover:

- `GetStatus`: the latest snapshot;
- `WatchStatus` (`fedcmp-status --watch`): the latest snapshot at once, then each published one
  that differs from the last sent in more than the clock (uptime, ETAs, seconds since a client's
  last call), until a DONE one. So a watcher sees the changes of the main port's stream at the
  snapshots' pace: a state that lasts less than `REFRESH_S` may fall between two snapshots.

It takes the main port's TLS credentials and bearer tokens (an operator's token, unless
`--public-status`); other methods answer UNIMPLEMENTED there.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import grpc

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.server.security import BearerTokenInterceptor
from fedcmp.server.status_feed import newest_until_done

REFRESH_S = 0.2  # the coordinator's loop publishes a snapshot this often: the staleness of an answer
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name


def clockless(snapshot: pb.Status) -> bytes:
    """The snapshot's content less what only the clock moves: uptime, ETAs, seconds since a client's last call."""
    content = pb.Status()
    content.CopyFrom(snapshot)
    content.ClearField("uptime_s")
    content.ClearField("eta_s")
    for client in content.clients:
        client.ClearField("last_seen_s")
        client.ClearField("eta_s")
    return content.SerializeToString(deterministic=True)


class StatusEndpoint:
    """GetStatus on its own port, served by a thread and event loop of its own from `publish`ed snapshots."""

    def __init__(self, bind: str, credentials: grpc.ServerCredentials | None = None,
                 tokens: dict[str, str] | None = None, public_status: bool = False) -> None:
        self._bind, self._credentials = bind, credentials
        self._interceptors = (BearerTokenInterceptor(tokens, public_status),) if tokens is not None else ()
        self._snapshot = pb.Status()  # replaced whole by publish(), never changed in place
        # What WatchStatus streams, kept by the endpoint's loop only: the newest snapshot whose
        # content changed, its version, and an event set when a newer one comes.
        self._watched, self._watched_content, self._version = pb.Status(), None, 0
        self._watched_content: bytes | None
        self._watchers = 0
        self._changed: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedcmp-status", daemon=True)
        self.port = 0

    def publish(self, snapshot: pb.Status) -> None:
        """Make `snapshot` what GetStatus answers (called from the coordinator's loop: one reference
        swap, and while anyone watches, a wake-up of the endpoint's loop to compare it)."""
        self._snapshot = snapshot
        if self._watchers:
            self._loop.call_soon_threadsafe(self._take_snapshot)

    def start(self) -> int:
        """Bind and serve in the endpoint's thread; returns the bound port (ValueError if it cannot bind)."""
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self.port

    def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop).result(timeout=grace_s + 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    async def _start(self) -> int:
        self._changed = asyncio.Event()
        self._server = grpc.aio.server(interceptors=self._interceptors)
        handlers = {
            "GetStatus": grpc.unary_unary_rpc_method_handler(self._get_status,
                                                             request_deserializer=pb.StatusRequest.FromString,
                                                             response_serializer=pb.Status.SerializeToString),
            "WatchStatus": grpc.unary_stream_rpc_method_handler(self._watch_status,
                                                                request_deserializer=pb.StatusRequest.FromString,
                                                                response_serializer=pb.Status.SerializeToString),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        try:
            port = (self._server.add_secure_port(self._bind, self._credentials) if self._credentials
                    else self._server.add_insecure_port(self._bind))
        except RuntimeError as error:  # grpc: "Failed to bind to address ..."
            raise ValueError(f"cannot serve status on {self._bind}: {error}") from error
        await self._server.start()
        return port

    async def _get_status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.Status:
        return self._snapshot

    def _take_snapshot(self) -> None:
        """On the endpoint's loop: the published snapshot becomes the watched one if its content changed."""
        snapshot = self._snapshot
        content = clockless(snapshot)
        if content != self._watched_content:
            self._watched, self._watched_content = snapshot, content
            self._version += 1
            self._changed.set()
            self._changed = asyncio.Event()

    async def _watch_status(self, request: pb.StatusRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Status]:
        """The latest snapshot now, then each one whose content changed, until a DONE one."""
        self._watchers += 1
        try:
            self._take_snapshot()
            async for snapshot in newest_until_done(lambda: (self._version, self._watched), self._next_change):
                yield snapshot
        finally:
            self._watchers -= 1

    async def _next_change(self) -> bool:
        await self._changed.wait()
        return True  # snapshots come until the endpoint stops


async def publish_status(endpoint: StatusEndpoint, build: Callable[[], pb.Status], refresh_s: float = REFRESH_S) -> None:
    """On the coordinator's loop: a fresh snapshot for `endpoint` every `refresh_s`, until cancelled."""
    while True:
        endpoint.publish(build())
        await asyncio.sleep(refresh_s)
