"""The round state machine without gRPC: registration checks, tasks, a full run to DONE, resume."""
from __future__ import annotations

import asyncio
import math

import pytest
import torch

from fedcmp.common.codec import BlobLayout, decode_projector, encode_projector, iter_chunks, sha256_hex
from fedcmp.common.projector import projector_shapes
from fedcmp.common.recipe import Recipe
from fedcmp.server.cli import restore_strategy
from fedcmp.server import rounds
from fedcmp.server.rounds import Coordinator, Phase, SessionError
from fedcmp.server.store import RunStore
from fedcmp.server.strategies import build_strategy

SHAPES = projector_shapes("mlp2x_gelu", vision_hidden=6, text_hidden=8)


def make_coordinator(tmp_path, **recipe_fields) -> Coordinator:
    recipe = Recipe(**{"rounds": 2, "min_clients": 2, "round_timeout_s": 30.0, **recipe_fields})
    store = RunStore(tmp_path)
    record = store.load() if store.has_run() else store.create(recipe.to_json(), recipe.strategy)
    strategy = build_strategy(recipe.strategy, recipe.strategy_params)
    restore_strategy(strategy, store, record)
    return Coordinator(recipe, store, strategy, record)


async def _chunks(blob: bytes):
    for chunk in iter_chunks(blob, 64):
        yield bytes(chunk)


async def act_as_client(coordinator: Coordinator, client_id: str, shift: float, num_samples: int) -> list[str]:
    """Register, then answer tasks like a client whose training adds `shift` to every weight."""
    verdict = coordinator.register(client_id, f"{client_id}-process", dict(SHAPES), num_samples, 5)
    assert verdict.accepted, verdict.reason
    client = coordinator.authenticate(client_id, verdict.token)
    kinds = []
    while True:
        task = await coordinator.next_task(client, hold_s=0.5)
        kinds.append(task.kind)
        if task.kind == "DONE":
            return kinds
        if task.kind == "TRAIN":
            encoded = coordinator.global_blob(task.global_version)
            trained = {k: v + shift for k, v in decode_projector(b"".join(encoded.chunks)).items()}
            blob = encode_projector(trained, "float32")
            assert coordinator.check_upload(client, task.round, task.global_version) is None
            await coordinator.store.spill_upload(task.round, client_id, num_samples,
                                                 {"train_loss": shift, "val_loss": 1.0 / task.round}, len(blob),
                                                 sha256_hex(blob), _chunks(blob), BlobLayout.of(SHAPES, "float32"))
            coordinator.upload_accepted(client, task.round)
        elif task.kind == "EVALUATE":
            assert coordinator.accept_evaluation(client, task.global_version, 5, {"val_loss": 0.1}).accepted


def test_a_run_goes_to_done_with_fedavg_of_the_uploads(tmp_path, monkeypatch) -> None:
    releases = []  # (committed round, encoded global held?) when the server handed its free memory back
    encoded_at_commit = []  # whether the store still held an encoded global once the round was aggregated

    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path)
        monkeypatch.setattr(rounds, "release_free_memory", lambda: releases.append(
            (RunStore(tmp_path).load().committed_round, coordinator.store._encoded is not None)))
        commit_round = coordinator.store.commit_round
        monkeypatch.setattr(coordinator.store, "commit_round", lambda *args: (
            encoded_at_commit.append(coordinator.store._encoded is not None), commit_round(*args))[1])
        run = asyncio.create_task(coordinator.run())
        kinds = await asyncio.gather(act_as_client(coordinator, "a", 1.0, 10),
                                     act_as_client(coordinator, "b", 4.0, 30))
        await run
        assert all(k.count("TRAIN") == 2 and k.count("EVALUATE") == 1 and k[-1] == "DONE" for k in kinds)
        return coordinator

    coordinator = asyncio.run(scenario())
    # before each aggregation, once the round's transfers are over and the encoded global is dropped
    assert coordinator.phase is Phase.DONE and releases == [(0, False), (1, False)]
    assert encoded_at_commit == [False, False]  # the round's downloads were over: their projector was not kept
    record = RunStore(tmp_path).load()
    assert record.done and record.committed_round == 2
    start = coordinator.store.load_global(1)
    end = coordinator.store.load_global(2)
    # FedAvg of shifts 1 and 4 weighted 10:30 -> each round moves every weight by 3.25.
    assert torch.allclose(end["linear_1.bias"] - start["linear_1.bias"], torch.full((8,), 3.25))
    first = record.history[0]
    assert first["participants"] == 2 and first["clients"] == ["a", "b"]
    step = math.sqrt(sum(float((end[key] - start[key]).double().square().sum()) for key in end))
    assert record.history[1]["global_update_norm"] == pytest.approx(step, rel=1e-5)  # every weight moved 3.25
    assert first["metrics"]["train_loss"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
    assert record.final_metrics["val_loss"] == pytest.approx(0.1)


def test_held_polls_look_again_on_milestones_not_on_every_change(tmp_path) -> None:
    async def scenario() -> tuple[int, list[str]]:
        coordinator = make_coordinator(tmp_path, min_clients=40)
        looks = 0
        task_for = coordinator._task_for

        def counting(client):  # how often held polls look for a task
            nonlocal looks
            looks += 1
            return task_for(client)

        coordinator._task_for = counting
        run = asyncio.create_task(coordinator.run())
        await asyncio.sleep(0.05)  # the run waits for clients
        waiting = []
        for index in range(20):
            verdict = coordinator.register(f"w{index:02d}", f"w{index}", dict(SHAPES), 10, 1)
            waiting.append(asyncio.create_task(coordinator.next_task(
                coordinator.authenticate(f"w{index:02d}", verdict.token), hold_s=30.0)))
        await asyncio.sleep(0.05)  # every poll is held now
        for index in range(19):  # 19 more registrations: changes, but no milestone
            coordinator.register(f"x{index:02d}", f"x{index}", dict(SHAPES), 10, 1)
            await asyncio.sleep(0)
        looks_before_the_round = looks
        coordinator.register("last", "last", dict(SHAPES), 10, 1)  # the 40th: round 1 opens, a milestone
        kinds = [task.kind for task in await asyncio.wait_for(asyncio.gather(*waiting), timeout=10)]
        run.cancel()
        return looks_before_the_round, kinds

    looks, kinds = asyncio.run(scenario())
    assert looks <= 20  # each held poll looked once when it came; 20 x 19 = 380 if every change woke them all
    assert kinds == ["TRAIN"] * 20  # the milestone woke every held poll at once


def test_a_mismatched_projector_is_refused_naming_both_shapes(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path, vision_hidden=6, text_hidden=8)  # widths pinned: the shape is fixed
    assert coordinator.register("first", "p1", dict(SHAPES), 10, 1).accepted
    other = projector_shapes("mlp2x_gelu", vision_hidden=12, text_hidden=8)
    verdict = coordinator.register("second", "p2", other, 10, 1)
    assert not verdict.accepted
    assert "linear_1.weight[8x6]" in verdict.reason and "linear_1.weight[8x12]" in verdict.reason


def test_the_first_client_must_match_the_recipes_projector_type(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path, projector_type="linear")
    verdict = coordinator.register("first", "p1", dict(SHAPES), 10, 1)
    assert not verdict.accepted and "linear projector has linear_1.bias[8], linear_1.weight[8x6]" in verdict.reason


@pytest.mark.parametrize("client_id, samples, message", [
    ("../x", 10, "not allowed"), ("ok\n", 10, "not allowed"), ("ok", 0, "needs at least 1")])
def test_bad_registrations(tmp_path, client_id, samples, message) -> None:
    verdict = make_coordinator(tmp_path).register(client_id, "p1", dict(SHAPES), samples, 1)
    assert not verdict.accepted and message in verdict.reason


def test_stale_tokens_are_rejected(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path)
    verdict = coordinator.register("a", "p1", dict(SHAPES), 10, 1)
    coordinator.register("a", "p1", dict(SHAPES), 10, 1)  # the client lost its session: the old token is void
    with pytest.raises(SessionError, match="register again"):
        coordinator.authenticate("a", verdict.token)


def test_resume_continues_at_the_next_round(tmp_path) -> None:
    async def one_round() -> None:
        coordinator = make_coordinator(tmp_path, rounds=1)
        run = asyncio.create_task(coordinator.run())
        await asyncio.gather(act_as_client(coordinator, "a", 1.0, 10), act_as_client(coordinator, "b", 1.0, 10))
        await run

    asyncio.run(one_round())

    async def resumed() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=3)
        assert coordinator.phase is Phase.WAITING
        run = asyncio.create_task(coordinator.run())
        kinds = await asyncio.gather(act_as_client(coordinator, "a", 1.0, 10), act_as_client(coordinator, "b", 1.0, 10))
        await run
        assert [k.count("TRAIN") for k in kinds] == [2, 2]  # rounds 2 and 3 only
        return coordinator

    coordinator = asyncio.run(resumed())
    assert [row["round"] for row in coordinator.record.history] == [1, 2, 3]


def test_uploads_outside_the_open_round_are_refused(tmp_path) -> None:
    coordinator = make_coordinator(tmp_path)
    verdict = coordinator.register("a", "p1", dict(SHAPES), 10, 1)
    client = coordinator.authenticate("a", verdict.token)
    refusal = coordinator.check_upload(client, 1, 0)
    assert refusal is not None and not refusal.accepted and "not open" in refusal.reason


def test_prometheus_metrics_follow_the_run(tmp_path) -> None:
    from prometheus_client import generate_latest

    from fedcmp.server.metrics import CoordinatorMetrics

    async def scenario() -> CoordinatorMetrics:
        coordinator = make_coordinator(tmp_path, rounds=1)
        coordinator.metrics = CoordinatorMetrics()
        run = asyncio.create_task(coordinator.run())
        await asyncio.gather(act_as_client(coordinator, "a", 1.0, 10), act_as_client(coordinator, "b", 2.0, 10))
        await run
        return coordinator.metrics

    text = generate_latest(asyncio.run(scenario()).registry).decode()
    assert 'fedcmp_phase{phase="DONE"} 1.0' in text and 'fedcmp_phase{phase="TRAINING"} 0.0' in text
    assert "fedcmp_round 1.0" in text and "fedcmp_registered_clients 2.0" in text
    assert "fedcmp_aggregation_seconds_count 1.0" in text and "fedcmp_train_loss 1.5" in text
