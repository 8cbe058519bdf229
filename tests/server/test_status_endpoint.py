"""The status port: GetStatus from published snapshots, in a thread that needs nothing of the coordinator's loop."""
from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc
from fedcmp.server.status_endpoint import StatusEndpoint, publish_status

OPERATOR_TOKEN = "operator-token-" + "o" * 16


@pytest.fixture
def endpoint():
    started: list[StatusEndpoint] = []

    def start(**options) -> tuple[StatusEndpoint, pb_grpc.CoordinatorStub]:
        served = StatusEndpoint("127.0.0.1:0", **options)
        port = served.start()
        started.append(served)
        return served, pb_grpc.CoordinatorStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

    yield start
    for served in started:
        served.stop()


def test_status_is_answered_while_the_coordinators_loop_is_blocked(endpoint) -> None:
    served, stub = endpoint()
    served.publish(pb.Status(phase="TRAINING", round=3, clients_total=256))
    answers: list[pb.Status] = []
    answered = threading.Event()

    def operator() -> None:
        answers.append(stub.GetStatus(pb.StatusRequest(), timeout=30))
        answered.set()

    async def coordinator_loop_blocked_until_answered() -> None:
        threading.Thread(target=operator).start()
        assert answered.wait(timeout=60)  # blocks this loop: an answer that needed it would never come

    asyncio.run(coordinator_loop_blocked_until_answered())
    assert answers == [pb.Status(phase="TRAINING", round=3, clients_total=256)]


def test_only_the_status_methods_are_served_there(endpoint) -> None:
    _, stub = endpoint()
    with pytest.raises(grpc.RpcError) as refused:
        stub.Heartbeat(pb.HeartbeatRequest(), timeout=30)
    assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED


def test_a_watcher_gets_each_change_but_not_the_clocks_and_its_stream_ends_at_done(endpoint) -> None:
    served, stub = endpoint()
    client = pb.ClientInfo(client_id="site-a", state="training", last_seen_s=0.1, eta_s=9.0)
    served.publish(pb.Status(phase="TRAINING", round=1, uptime_s=1.0, clients=[client]))
    stream = stub.WatchStatus(pb.StatusRequest(), timeout=60)
    first = next(stream)  # at once, without waiting for a publish
    assert (first.phase, first.round, first.uptime_s) == ("TRAINING", 1, 1.0)
    later = pb.ClientInfo(client_id="site-a", state="training", last_seen_s=0.3, eta_s=8.5)
    served.publish(pb.Status(phase="TRAINING", round=1, uptime_s=1.2, eta_s=30.0, clients=[later]))  # the clock only
    # The endpoint's loop runs its callbacks in order: once this one ran, it has compared that snapshot.
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), served._loop).result(timeout=30)
    served.publish(pb.Status(phase="AGGREGATING", round=1, uptime_s=1.4, clients=[later]))
    assert next(stream).phase == "AGGREGATING"  # the clock-only snapshot was not sent
    served.publish(pb.Status(phase="DONE", round=1, uptime_s=1.6))
    assert next(stream).phase == "DONE"
    assert list(stream) == []  # ended after DONE


def test_a_watcher_that_joins_later_gets_the_latest_snapshot_at_once(endpoint) -> None:
    served, stub = endpoint()
    served.publish(pb.Status(phase="TRAINING", round=2))
    assert next(stub.WatchStatus(pb.StatusRequest(), timeout=60)).round == 2
    served.publish(pb.Status(phase="TRAINING", round=3))
    assert next(stub.WatchStatus(pb.StatusRequest(), timeout=60)).round == 3


def test_tokens_guard_the_status_port_as_they_guard_the_main_one(endpoint) -> None:
    _, stub = endpoint(tokens={OPERATOR_TOKEN: "operator:alice", "client-token-" + "c" * 16: "a"})
    with pytest.raises(grpc.RpcError) as anonymous:
        stub.GetStatus(pb.StatusRequest(), timeout=30)
    assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as client:
        stub.GetStatus(pb.StatusRequest(), timeout=30, metadata=(("authorization", "Bearer client-token-" + "c" * 16),))
    assert "operator's bearer token" in client.value.details()
    assert stub.GetStatus(pb.StatusRequest(), timeout=30,
                          metadata=(("authorization", f"Bearer {OPERATOR_TOKEN}"),)) == pb.Status()
    _, public = endpoint(tokens={OPERATOR_TOKEN: "operator:alice"}, public_status=True)
    assert public.GetStatus(pb.StatusRequest(), timeout=30) == pb.Status()


def test_a_port_in_use_is_refused_with_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        blocked = StatusEndpoint(f"127.0.0.1:{port}")
        with pytest.raises(ValueError, match=f"cannot serve status on 127.0.0.1:{port}"):
            blocked.start()
        blocked.stop()


def test_the_coordinators_loop_publishes_a_fresh_snapshot_each_refresh() -> None:
    published: list[pb.Status] = []
    builds = iter(range(1, 1000))

    class Recorder:
        def publish(self, snapshot: pb.Status) -> None:
            published.append(snapshot)

    async def three_refreshes() -> None:
        publisher = asyncio.create_task(publish_status(Recorder(), lambda: pb.Status(round=next(builds)), 0.0))
        while len(published) < 3:
            await asyncio.sleep(0)
        publisher.cancel()

    asyncio.run(three_refreshes())
    assert [snapshot.round for snapshot in published[:3]] == [1, 2, 3]
