"""Backbone identity at registration: the recipe's pins, or the majority when round 1 opens, fix it."""
from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from fedcmp.common.codec import load_params_metadata
from fedcmp.common.projector import projector_shapes
from fedcmp.common.provenance import Backbones, ProjectorProvenance
from fedcmp.common.recipe import Recipe
from fedcmp.server.rounds import Coordinator, Phase
from fedcmp.server.service import status_message
from fedcmp.server.store import RunStore
from fedcmp.server.strategies import build_strategy

SHAPES = projector_shapes("mlp2x_gelu", vision_hidden=6, text_hidden=8)
SITE_A = Backbones("micro", "micro", "a" * 64, "b" * 64)


def open_coordinator(state: Path, **recipe_fields) -> Coordinator:
    """A coordinator on `state`, resuming the run it holds (as a restart would)."""
    store = RunStore(state)
    if store.has_run():
        recipe, record = Recipe.from_json(store.load_recipe_json()), store.load()
    else:
        recipe = Recipe(**{"min_clients": 1, **recipe_fields})
        record = store.create(recipe.to_json(), recipe.strategy)
    return Coordinator(recipe, store, build_strategy(recipe.strategy, {}), record)


def open_round_one(coordinator: Coordinator) -> None:
    """Run the coordinator until round 1 opens (which fixes the run's projector and backbones)."""
    async def until_training() -> None:
        run = asyncio.create_task(coordinator.run())
        while coordinator.phase is not Phase.TRAINING:
            await asyncio.sleep(0.01)
        run.cancel()

    asyncio.run(until_training())


def commit_round_one(coordinator: Coordinator) -> None:
    params = coordinator.store.load_global(0)
    row = {"round": 1, "participants": 1, "duration_s": 1.0, "metrics": {}}
    coordinator.store.commit_round(coordinator.record, 1, params, {}, row)


def test_the_majority_fixes_the_backbones_and_others_must_match(tmp_path) -> None:
    coordinator = open_coordinator(tmp_path)
    other_llm = Backbones("micro", "/models/llm", "a" * 64, "c" * 64)
    assert coordinator.register("b", "pb", dict(SHAPES), 10, 1, other_llm).accepted  # first, but alone
    assert coordinator.register("a", "pa", dict(SHAPES), 10, 1, SITE_A).accepted
    assert coordinator.register("c", "pc", dict(SHAPES), 10, 1, Backbones("/local/vision", "/local/llm", "a" * 64,
                                                                          "b" * 64)).accepted  # same files elsewhere
    open_round_one(coordinator)
    assert sorted(coordinator.clients) == ["a", "c"] and coordinator.backbones == SITE_A
    verdict = coordinator.register("b", "pb", dict(SHAPES), 10, 1, other_llm)
    assert not verdict.accepted
    assert "client b's LLM '/models/llm' has fingerprint cccccccccccc but the run's is bbbbbbbbbbbb" in verdict.reason
    assert "chosen when round 1 opened" in verdict.reason

    commit_round_one(coordinator)
    restarted = open_coordinator(tmp_path)  # after a commit the identity is the run's for good
    assert not restarted.register("b", "pb", dict(SHAPES), 10, 1, other_llm).accepted
    status = status_message(restarted)
    assert status.backbones.vision_fingerprint == "a" * 64 and status.backbones.llm == "micro"


def test_pinned_fingerprints_refuse_even_the_first_client(tmp_path) -> None:
    coordinator = open_coordinator(tmp_path, vision_fingerprint="d" * 64)
    verdict = coordinator.register("a", "pa", dict(SHAPES), 10, 1, SITE_A)
    assert not verdict.accepted and "vision tower 'micro' has fingerprint aaaaaaaaaaaa" in verdict.reason
    assert "run's is dddddddddddd (pinned by the recipe)" in verdict.reason
    assert not coordinator.record.projector_shapes  # a refused client fixes nothing
    pinned_site = Backbones("micro", "micro", "d" * 64, "e" * 64)
    assert coordinator.register("a", "pa", dict(SHAPES), 10, 1, pinned_site).accepted
    open_round_one(coordinator)
    assert coordinator.backbones == pinned_site
    status = status_message(coordinator)
    assert status.clients[0].backbones.llm_fingerprint == "e" * 64


def test_a_client_without_fingerprints_is_refused(tmp_path) -> None:
    verdict = open_coordinator(tmp_path).register("a", "pa", dict(SHAPES), 10, 1, Backbones("micro", "micro", "", ""))
    assert not verdict.accepted and "sent no backbone fingerprints" in verdict.reason


def test_globals_carry_the_runs_provenance(tmp_path) -> None:
    coordinator = open_coordinator(tmp_path, strategy="fedavgm")
    assert coordinator.register("a", "pa", dict(SHAPES), 10, 1, SITE_A).accepted
    open_round_one(coordinator)
    metadata = load_params_metadata(coordinator.store.global_path(0))
    provenance = ProjectorProvenance.from_metadata(metadata, "v0")
    assert provenance.backbones == SITE_A and provenance.strategy == "fedavgm" and provenance.round == 0
    assert (provenance.vision_hidden, provenance.text_hidden, provenance.projector_type) == (6, 8, "mlp2x_gelu")
    assert provenance == ProjectorProvenance.of(coordinator.recipe, SITE_A, 6, 8, 0)
    assert metadata["format"] == "pt"
    assert all(torch.isfinite(tensor).all() for tensor in coordinator.store.load_global(0).values())
