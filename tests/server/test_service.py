"""The coordinator's status and health: bounded in size, server fields apart from client metrics,
unhealthy (not dead) while commits fail, and readable only by operators when tokens are on."""
from __future__ import annotations

import asyncio
import errno

import grpc
import pytest

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.wire import coordinator_pb2_grpc as pb_grpc
from fedcmp.server import rounds
from fedcmp.server.liveness import Progress
from fedcmp.server.rounds import Coordinator
from fedcmp.server.service import build_server, status_message
from fedcmp.server.status_cli import render

from .test_liveness import FAST, GUARD_S, ManualClient, training, until
from .test_rounds import SHAPES, make_coordinator

STATUS_RECEIVE_LIMIT = 4 * 1024 * 1024  # grpc's default, which fedcmp-status uses


def test_status_stays_under_the_receive_limit_whatever_clients_do(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path)
    for index in range(32_000):
        assert coordinator.register(f"c{index:05d}-{'x' * 100}", "p", dict(SHAPES), 1, 1).accepted
    huge = {f"metric_{index:05d}": 1.0 for index in range(70_000)}
    row = {"round": 1, "participants": 1, "clients": [], "excluded": {"c": "r" * 10_000}, "duration_s": 1.0,
           "aggregation_s": 0.1, "global_update_norm": 0.0, "metrics": huge}
    coordinator.record.history = [{**row, "metrics": {"train_loss": 1.0}}] * 299 + [row]
    coordinator.record.final_metrics = huge
    status = status_message(coordinator)
    assert status.ByteSize() < STATUS_RECEIVE_LIMIT / 4
    assert status.clients_total == 32_000 and len(status.clients) == 1000 and len(status.history) == 200
    assert "clients (32000, first 1000 shown)" in render(status)


def test_status_shows_a_training_clients_progress_and_eta(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path)
    client = ManualClient(coordinator, "a").call()
    client.state = "training"
    coordinator.heartbeat(client, Progress(round=1, step=12, total_steps=40, last_loss=2.3117))
    client.progress.started -= 24.0  # 12 steps in 24 s: 28 to go at 2 s each
    info = status_message(coordinator).clients[0]
    assert (info.step, info.total_steps) == (12, 40) and 56.0 <= info.eta_s < 57.0
    assert "step 12/40 loss 2.3117 eta 56s" in render(status_message(coordinator))


def test_client_metric_names_never_overwrite_the_servers_round_fields(tmp_path) -> None:
    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=1, min_clients=1, **FAST)
        client = ManualClient(coordinator, "a")
        async with training(coordinator, client):
            await client.train(1, metrics={"round": 99.0, "participants": -1.0, "duration_s": 1e9, "clients": 3.0})
            await until(lambda: coordinator.record.committed_round == 1, "round 1 to commit")
        return coordinator

    coordinator = asyncio.run(scenario())
    row = coordinator.record.history[0]
    assert (row["round"], row["participants"], row["clients"]) == (1, 1, ["a"]) and row["duration_s"] < 1e9
    assert row["metrics"] == {"round": 99.0, "participants": -1.0, "duration_s": 1e9, "clients": 3.0}
    message = status_message(coordinator).history[0]
    assert (message.round, message.participants) == (1, 1) and message.metrics["round"] == 99.0


def test_a_failing_disk_makes_the_coordinator_unhealthy_not_dead(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rounds, "COMMIT_RETRY_FIRST_S", 0.01)
    failures = []

    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=1, min_clients=1, **FAST)
        commit = coordinator.store.commit_round

        def full_disk(*args):
            if len(failures) < 3:
                failures.append(status_message(coordinator).health_message)
                raise OSError(errno.ENOSPC, "No space left on device")
            return commit(*args)

        coordinator.store.commit_round = full_disk
        client = ManualClient(coordinator, "a")
        async with training(coordinator, client):
            await client.train(1)
            await until(lambda: not coordinator.healthy, "the coordinator to report the disk")
            status = status_message(coordinator)
            assert not status.healthy and "No space left on device" in status.health_message
            assert "UNHEALTHY: cannot commit round 1" in render(status)
            assert coordinator.record.committed_round == 0  # the last commit stays
            await until(lambda: coordinator.record.committed_round == 1, "the retried commit")
            assert coordinator.healthy and status_message(coordinator).health_message == ""
        return coordinator

    asyncio.run(scenario())
    assert len(failures) == 3


OPERATOR = "operator-token-" + "o" * 16
CLIENT = "client-token-" + "c" * 16


@pytest.mark.parametrize("public_status", [False, True])
def test_status_needs_an_operator_token_unless_public(tmp_path, public_status) -> None:
    async def scenario() -> dict[str, grpc.StatusCode]:
        coordinator = make_coordinator(tmp_path)
        tokens = {OPERATOR: "operator:alice", CLIENT: "a"}
        server, port = build_server(coordinator, "127.0.0.1:0", tokens=tokens, public_status=public_status)
        await server.start()
        outcomes = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                for name, token in (("none", ""), ("client", CLIENT), ("operator", OPERATOR)):
                    metadata = (("authorization", f"Bearer {token}"),) if token else ()
                    try:
                        await stub.GetStatus(pb.StatusRequest(), metadata=metadata, timeout=GUARD_S)
                        outcomes[name] = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as error:
                        outcomes[name] = error.code()
                try:  # an operator token is no client token
                    await stub.PollTask(pb.PollTaskRequest(client_id="a"), timeout=GUARD_S,
                                        metadata=(("authorization", f"Bearer {OPERATOR}"),))
                    outcomes["operator polls"] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as error:
                    outcomes["operator polls"] = error.code()
        finally:
            await server.stop(None)
        return outcomes

    outcomes = asyncio.run(scenario())
    refused = grpc.StatusCode.OK if public_status else grpc.StatusCode.UNAUTHENTICATED
    assert outcomes == {"none": refused, "client": refused, "operator": grpc.StatusCode.OK,
                        "operator polls": grpc.StatusCode.UNAUTHENTICATED}
