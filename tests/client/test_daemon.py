"""The daemon's registration (instance id, waiting out a live holder of its id) and its heartbeat thread."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from fedcmp.client import daemon as daemon_module
from fedcmp.client.daemon import ClientDaemon, ConnectionSettings, CoordinatorLink, RegistrationRefused
from fedcmp.client.heartbeat import Heartbeat
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe
from fedcmp.common.wire import coordinator_pb2 as pb


class FakeStub:
    def __init__(self, replies: list[pb.RegisterReply]) -> None:
        self.replies = replies
        self.requests: list[pb.RegisterRequest] = []

    def Register(self, request: pb.RegisterRequest, metadata=()) -> pb.RegisterReply:
        self.requests.append(request)
        return self.replies.pop(0)


def daemon_with(replies: list[pb.RegisterReply], budget_s: float, monkeypatch) -> tuple[ClientDaemon, FakeStub, list]:
    link = CoordinatorLink(ConnectionSettings("127.0.0.1:1", reconnect_budget_s=budget_s))
    link.stub = FakeStub(replies)
    daemon = ClientDaemon(link, "site")
    daemon.session = SimpleNamespace(num_train_samples=10, num_val_samples=2, recipe=Recipe(),
                                     signature=lambda: {"linear_1.weight": (8, 6)})
    daemon.backbones = Backbones("micro", "micro", "a" * 64, "b" * 64)
    slept: list[float] = []
    monkeypatch.setattr(daemon_module.time, "sleep", slept.append)
    return daemon, link.stub, slept


IN_USE = pb.RegisterReply(accepted=False, reason="client id 'site' is in use ... --client-id NAME", retry_after_s=2.0)


def test_registration_waits_while_a_live_process_holds_the_id(monkeypatch) -> None:
    daemon, stub, slept = daemon_with([IN_USE, pb.RegisterReply(accepted=True, session_token="t")], 60.0, monkeypatch)
    daemon.register()
    assert daemon.token == "t" and slept == [2.0]
    first, second = stub.requests
    assert first.instance_id == second.instance_id == daemon.instance_id and len(daemon.instance_id) == 16


def test_registration_gives_up_with_the_coordinators_advice_past_its_budget(monkeypatch) -> None:
    daemon, _, slept = daemon_with([IN_USE], 1.0, monkeypatch)
    with pytest.raises(RegistrationRefused, match="--client-id"):
        daemon.register()
    assert slept == []


def test_two_daemons_have_different_instance_ids() -> None:
    link = CoordinatorLink(ConnectionSettings("127.0.0.1:1"))
    assert ClientDaemon(link, "a").instance_id != ClientDaemon(link, "a").instance_id


def test_heartbeat_beats_at_once_then_every_interval_with_the_latest_progress() -> None:
    beats: list[tuple[int, float]] = []
    third = threading.Event()

    def beat(step: int, loss: float) -> None:
        beats.append((step, loss))
        if len(beats) >= 3:
            third.set()

    with Heartbeat(beat, 0.01) as heartbeat:
        heartbeat.progress(5, 1.25)
        assert third.wait(10.0)
    count = len(beats)
    assert beats[0][0] in (0, 5) and beats[-1] == (5, 1.25)
    third.clear()
    assert not third.wait(0.05) and len(beats) == count  # the thread stopped with the block
