"""Admission: one live process per client id, the max_clients cap, and projector shapes no bogus client can fix."""
from __future__ import annotations

import asyncio
import time

import pytest

from fedcmp.common.projector import init_projector_params, projector_shapes
from fedcmp.server.admission import ID_ADVICE, majority, offer_refusal
from fedcmp.server.rounds import Coordinator, Phase, SessionError
from fedcmp.server.store import RunStore

from .test_liveness import FAST, GUARD_S
from .test_rounds import SHAPES, act_as_client, make_coordinator

BOGUS = projector_shapes("mlp2x_gelu", vision_hidden=64, text_hidden=64)


def age(coordinator: Coordinator, client_id: str, seconds: float) -> None:
    coordinator.clients[client_id].last_seen = time.monotonic() - seconds


def test_a_second_live_process_cannot_take_an_id_but_a_restart_can(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path, client_timeout_s=60.0)
    first = coordinator.register("site", "process-1", dict(SHAPES), 10, 1)
    assert coordinator.register("site", "process-1", dict(SHAPES), 10, 1).accepted  # the same process again
    second = coordinator.register("site", "process-2", dict(SHAPES), 10, 1)
    assert not second.accepted and ID_ADVICE in second.reason and "--client-id" in second.reason
    assert 1.0 <= second.retry_after_s <= 60.0
    age(coordinator, "site", 61.0)  # the first process has gone silent: a restart takes the id back
    restarted = coordinator.register("site", "process-2", dict(SHAPES), 10, 1)
    assert restarted.accepted
    with pytest.raises(SessionError):
        coordinator.authenticate("site", first.token)


def test_max_clients_caps_live_clients_and_a_gone_one_makes_room(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path, max_clients=2, client_timeout_s=60.0)
    assert coordinator.register("a", "pa", dict(SHAPES), 10, 1).accepted
    assert coordinator.register("b", "pb", dict(SHAPES), 10, 1).accepted
    full = coordinator.register("c", "pc", dict(SHAPES), 10, 1)
    assert not full.accepted and "at most 2 clients" in full.reason
    assert coordinator.register("a", "pa", dict(SHAPES), 10, 1).accepted  # a registered id is not a newcomer
    age(coordinator, "b", 61.0)
    assert coordinator.register("c", "pc", dict(SHAPES), 10, 1).accepted
    assert sorted(coordinator.clients) == ["a", "c"]


def test_a_projector_over_the_size_cap_is_refused(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path, max_projector_params=100)
    verdict = coordinator.register("a", "pa", dict(SHAPES), 10, 1)
    assert not verdict.accepted and "at most 100 (recipe max_projector_params)" in verdict.reason


def test_offers_that_are_not_the_recipes_projector_type() -> None:
    from fedcmp.common.recipe import Recipe

    assert "is not a mlp2x_gelu projector" in offer_refusal(Recipe(), "x", {"w": (3, 3)}, None)
    assert "is not a mlp2x_gelu projector" in offer_refusal(Recipe(), "x", {"linear_1.weight": (0, 4)}, None)
    assert offer_refusal(Recipe(), "x", dict(SHAPES), None) == ""


def test_the_majority_signature_wins_then_the_earliest() -> None:
    from fedcmp.common.provenance import Backbones
    from fedcmp.server.liveness import ClientRecord

    site, forged = Backbones("micro", "micro", "a" * 64, "b" * 64), Backbones("micro", "micro", "f" * 64, "b" * 64)
    records = [ClientRecord(name, name, 1, 1, "t", 0.0, shapes=shapes, backbones=backbones)
               for name, shapes, backbones in (("evil", BOGUS, site), ("forger", dict(SHAPES), forged),
                                               ("a", dict(SHAPES), site), ("b", dict(SHAPES), site))]
    assert majority(records).client_id == "a"  # same shape as the forger, but the forger's fingerprints differ
    assert majority(records[:2]).client_id == "evil"
    assert majority([]) is None


def test_a_bogus_first_registrant_does_not_lock_out_the_real_clients(tmp_path) -> None:
    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=1, **FAST)
        evil = coordinator.register("evil", "pe", dict(BOGUS), 10, 1)
        assert evil.accepted  # nothing is fixed by registering first
        run = asyncio.create_task(coordinator.run())
        await asyncio.wait_for(asyncio.gather(act_as_client(coordinator, "a", 1.0, 10),
                                              act_as_client(coordinator, "b", 1.0, 10), run), GUARD_S)
        with pytest.raises(SessionError):
            coordinator.authenticate("evil", evil.token)  # dropped when round 1 fixed the real shape
        again = coordinator.register("evil", "pe", dict(BOGUS), 10, 1)
        assert not again.accepted and "projector shape mismatch" in again.reason
        return coordinator

    coordinator = asyncio.run(scenario())
    assert coordinator.record.projector_shapes == {key: list(shape) for key, shape in SHAPES.items()}


def test_a_shape_recorded_before_the_first_commit_is_chosen_again_on_resume(tmp_path) -> None:
    """A run that recorded a bogus shape (as the first registrant fixed it before) resumes for the real clients."""
    first = make_coordinator(tmp_path)
    bogus_v0 = init_projector_params("mlp2x_gelu", 64, 64, 0)
    first.store.commit_initial_global(first.record, bogus_v0)

    async def resumed() -> None:
        coordinator = make_coordinator(tmp_path, rounds=1, **FAST)
        assert coordinator.shapes is None
        run = asyncio.create_task(coordinator.run())
        await asyncio.wait_for(asyncio.gather(act_as_client(coordinator, "a", 1.0, 10),
                                              act_as_client(coordinator, "b", 1.0, 10), run), GUARD_S)

    asyncio.run(resumed())
    record = RunStore(tmp_path).load()
    assert record.done and record.projector_shapes["linear_1.weight"] == list(SHAPES["linear_1.weight"])


def test_pinned_widths_fix_the_shape_before_anyone_registers(tmp_path) -> None:
    async def scenario() -> None:
        coordinator = make_coordinator(tmp_path, rounds=1, vision_hidden=6, text_hidden=8, **FAST)
        run = asyncio.create_task(coordinator.run())
        assert coordinator.phase is Phase.WAITING and not coordinator.clients
        refused = coordinator.register("evil", "pe", dict(BOGUS), 10, 1)
        assert not refused.accepted and "projector shape mismatch" in refused.reason
        await asyncio.wait_for(asyncio.gather(act_as_client(coordinator, "a", 1.0, 10),
                                              act_as_client(coordinator, "b", 1.0, 10), run), GUARD_S)

    asyncio.run(scenario())
