"""Liveness in the round state machine: silent clients are gone, rounds close without them, never hang."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from fedcmp.common.codec import BlobLayout, decode_projector, encode_projector, sha256_hex
from fedcmp.server.liveness import GONE, ClientRecord, Progress, sweep, touch
from fedcmp.server.rounds import Coordinator, Phase

from .test_rounds import SHAPES, _chunks, act_as_client, make_coordinator

FAST = {"heartbeat_interval_s": 0.05, "client_timeout_s": 0.3}
GUARD_S = 30.0  # a hang guard only; the scenarios finish in about a second


class ManualClient:
    """A client whose every move the test makes; it stays alive only while `keep_alive` runs."""

    def __init__(self, coordinator: Coordinator, client_id: str, instance_id: str = "") -> None:
        self.coordinator = coordinator
        self.client_id = client_id
        verdict = coordinator.register(client_id, instance_id or f"{client_id}-process", dict(SHAPES), 10, 5)
        assert verdict.accepted, verdict.reason
        self.token = verdict.token
        self._pinger: asyncio.Task | None = None

    def call(self) -> ClientRecord:
        return self.coordinator.authenticate(self.client_id, self.token)

    def keep_alive(self) -> None:
        async def ping() -> None:
            while True:
                self.call()
                await asyncio.sleep(0.02)

        self._pinger = asyncio.create_task(ping())

    def die(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()

    async def train(self, expect_round: int, shift: float = 1.0, metrics: dict[str, float] | None = None) -> None:
        client = self.call()
        task = await self.coordinator.next_task(client, hold_s=0.05)
        assert (task.kind, task.round) == ("TRAIN", expect_round), task
        encoded = self.coordinator.global_blob(task.global_version)
        blob = encode_projector({k: v + shift for k, v in decode_projector(b"".join(encoded.chunks)).items()},
                                "float32")
        await self.coordinator.store.spill_upload(task.round, self.client_id, 10, metrics or {"train_loss": shift},
                                                  len(blob), sha256_hex(blob), _chunks(blob),
                                                  BlobLayout.of(SHAPES, "float32"))
        self.coordinator.upload_accepted(client, task.round)

    async def poll(self) -> str:
        return (await self.coordinator.next_task(self.call(), hold_s=0.05)).kind


async def until(condition, what: str) -> None:
    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(wait(), GUARD_S)
    except asyncio.TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def training(coordinator: Coordinator, *clients: ManualClient) -> AsyncIterator[asyncio.Task]:
    """The coordinator's run with `clients` kept alive, entered once round 1 trains; on leaving, the
    clients die and the run is cancelled if it is still going."""
    for client in clients:
        client.keep_alive()
    run = asyncio.create_task(coordinator.run())
    try:
        await until(lambda: coordinator.phase is Phase.TRAINING, "round 1")
        yield run
    finally:
        for client in clients:
            client.die()
        run.cancel()


def test_sweep_and_touch() -> None:
    client = ClientRecord("a", "p", 1, 1, "t", last_seen=0.0)
    assert sweep([client], now=0.5, timeout_s=1.0) == [] and client.state == "idle"
    assert sweep([client], now=2.0, timeout_s=1.0) == [client] and client.state == GONE
    assert sweep([client], now=3.0, timeout_s=1.0) == []  # gone once
    assert touch(client, 3.0) and client.state == "idle" and not touch(client, 3.1)


def test_a_client_that_dies_mid_round_is_gone_and_the_run_finishes_without_it(tmp_path) -> None:
    """The default quorum (1.0) no longer waits for a dead client, nor does the final evaluation."""
    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=1, round_timeout_s=600.0, **FAST)
        dead = ManualClient(coordinator, "b")
        run = asyncio.create_task(coordinator.run())
        alive = asyncio.create_task(act_as_client(coordinator, "a", 1.0, 10))
        await until(lambda: coordinator.phase is Phase.TRAINING, "round 1")
        assert (await coordinator.next_task(dead.call(), hold_s=0.05)).kind == "TRAIN"
        # b never calls again: it is gone after client_timeout_s, round 1 closes with a alone.
        await asyncio.wait_for(asyncio.gather(run, alive), GUARD_S)
        return coordinator

    coordinator = asyncio.run(scenario())
    assert coordinator.phase is Phase.DONE and coordinator.clients["b"].state == GONE
    assert coordinator.record.history[0]["clients"] == ["a"]
    assert coordinator.record.final_metrics["evaluated_clients"] == 1.0


def test_a_gone_client_is_not_selected_until_it_returns(tmp_path) -> None:
    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=3, min_clients=1, round_timeout_s=600.0, **FAST)
        a, b = ManualClient(coordinator, "a"), ManualClient(coordinator, "b")
        async with training(coordinator, a, b) as run:
            assert coordinator.selected == ["a", "b"]
            await a.train(1)
            b.die()
            await until(lambda: coordinator.round == 2 and coordinator.phase is Phase.TRAINING, "round 2")
            assert coordinator.selected == ["a"] and coordinator.clients["b"].state == GONE
            assert await b.poll() == "WAIT"  # back (its call revives it), but round 2 is under way without it
            assert coordinator.clients["b"].state != GONE
            b.keep_alive()
            await a.train(2)
            await until(lambda: coordinator.round == 3 and coordinator.phase is Phase.TRAINING, "round 3")
            assert coordinator.selected == ["a", "b"]
            await a.train(3)
            await b.train(3)
            await until(lambda: coordinator.phase is Phase.EVALUATING, "the final evaluation")
            for client in (a, b):
                task = await coordinator.next_task(client.call(), hold_s=0.05)
                assert coordinator.accept_evaluation(client.call(), task.global_version, 5, {"val_loss": 1.0}).accepted
            await asyncio.wait_for(run, GUARD_S)
        return coordinator

    history = asyncio.run(scenario()).record.history
    assert [row["clients"] for row in history] == [["a"], ["a"], ["a", "b"]]


def test_a_live_straggler_gets_one_more_timeout_then_the_round_closes_with_what_there_is(tmp_path, caplog) -> None:
    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=1, round_timeout_s=0.3, **FAST)
        a, b = ManualClient(coordinator, "a"), ManualClient(coordinator, "b")
        async with training(coordinator, a, b):  # b: alive, heartbeating, but never uploads
            await a.train(1)
            await until(lambda: coordinator.record.committed_round == 1, "round 1 to commit")
        return coordinator

    with caplog.at_level(logging.WARNING, logger="fedcmp.server"):
        coordinator = asyncio.run(scenario())
    assert coordinator.record.history[0]["clients"] == ["a"]
    assert "1 of 2 needed uploads" in caplog.text and "closing with what there is" in caplog.text


def test_a_round_without_any_upload_reopens_with_the_live_clients(tmp_path, caplog) -> None:
    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=1, min_clients=1, round_timeout_s=0.2, **FAST)
        a = ManualClient(coordinator, "a")
        async with training(coordinator, a):
            await until(lambda: "re-opening" in caplog.text, "round 1 to re-open")
            assert coordinator.round == 1 and coordinator.record.committed_round == 0
            await a.train(1)  # the re-opened round takes the upload and commits
            await until(lambda: coordinator.record.committed_round == 1, "round 1 to commit")
        return coordinator

    with caplog.at_level(logging.WARNING, logger="fedcmp.server"):
        assert asyncio.run(scenario()).record.history[0]["clients"] == ["a"]


def test_heartbeats_record_progress_and_the_eta_runs_on_the_coordinators_clock(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path)
    client = ManualClient(coordinator, "a").call()
    coordinator.heartbeat(client, Progress(round=1, step=3, total_steps=10, last_loss=2.5))
    started = client.progress.started
    assert client.progress == Progress(1, 3, 10, 2.5, started) and started > 0
    # 3 of 10 steps in 6 s: 7 steps to go at 2 s each
    assert client.progress.eta_s(started + 6.0) == pytest.approx(14.0)
    coordinator.heartbeat(client, Progress(round=1, step=5, total_steps=10, last_loss=2.0))
    assert client.progress.started == started  # the same task: its start stays
    assert client.progress.eta_s(started + 10.0) == pytest.approx(10.0)
    assert Progress(1, 0, 10).eta_s(started) == -1.0 and Progress(1, 3, 10).eta_s(started) == -1.0  # unknown


def test_cancelling_the_run_as_a_change_arrives_still_stops_it(tmp_path) -> None:
    """A cancel in the same loop step as a change must not be lost (Python 3.11's wait_for loses it)."""
    async def scenario() -> None:
        coordinator = make_coordinator(tmp_path, rounds=1, min_clients=1, **FAST)
        run = asyncio.create_task(coordinator.run())
        await until(lambda: coordinator.phase is Phase.WAITING, "the wait for clients")
        await asyncio.sleep(0.01)  # the run is parked in its wait for a change
        coordinator._notify()
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(run, GUARD_S)

    asyncio.run(scenario())
