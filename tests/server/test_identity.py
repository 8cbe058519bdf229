"""Backbone identity at registration: the first client (or the recipe's pins) fix it; others must match."""
from __future__ import annotations

from pathlib import Path

from fedcmp.common.codec import load_params_metadata
from fedcmp.common.projector import projector_shapes
from fedcmp.common.provenance import Backbones, ProjectorProvenance
from fedcmp.common.recipe import Recipe
from fedcmp.server.rounds import Coordinator
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
        recipe = Recipe(**recipe_fields)
        record = store.create(recipe.to_json(), recipe.strategy)
    return Coordinator(recipe, store, build_strategy(recipe.strategy, {}), record)


def test_the_first_client_fixes_the_backbones_and_others_must_match(tmp_path) -> None:
    coordinator = open_coordinator(tmp_path)
    assert coordinator.register("a", dict(SHAPES), 10, 1, SITE_A).accepted
    other_llm = Backbones("micro", "/models/llm", "a" * 64, "c" * 64)
    verdict = coordinator.register("b", dict(SHAPES), 10, 1, other_llm)
    assert not verdict.accepted
    assert "client b's LLM '/models/llm' has fingerprint cccccccccccc but the run's is bbbbbbbbbbbb" in verdict.reason
    assert "fixed by the first client" in verdict.reason
    assert coordinator.register("c", dict(SHAPES), 10, 1, Backbones("/local/vision", "/local/llm", "a" * 64,
                                                                    "b" * 64)).accepted  # same files elsewhere

    restarted = open_coordinator(tmp_path)  # the identity is committed with the run
    assert not restarted.register("b", dict(SHAPES), 10, 1, other_llm).accepted
    status = status_message(restarted)
    assert status.backbones.vision_fingerprint == "a" * 64 and status.backbones.llm == "micro"


def test_pinned_fingerprints_refuse_even_the_first_client(tmp_path) -> None:
    coordinator = open_coordinator(tmp_path, vision_fingerprint="d" * 64)
    verdict = coordinator.register("a", dict(SHAPES), 10, 1, SITE_A)
    assert not verdict.accepted and "vision tower 'micro' has fingerprint aaaaaaaaaaaa" in verdict.reason
    assert "run's is dddddddddddd (pinned by the recipe)" in verdict.reason
    assert not coordinator.record.projector_shapes  # a refused client fixes nothing
    pinned_site = Backbones("micro", "micro", "d" * 64, "e" * 64)
    assert coordinator.register("a", dict(SHAPES), 10, 1, pinned_site).accepted
    assert coordinator.backbones == pinned_site
    status = status_message(coordinator)
    assert status.clients[0].backbones.llm_fingerprint == "e" * 64


def test_a_client_without_fingerprints_is_refused(tmp_path) -> None:
    verdict = open_coordinator(tmp_path).register("a", dict(SHAPES), 10, 1, Backbones("micro", "micro", "", ""))
    assert not verdict.accepted and "sent no backbone fingerprints" in verdict.reason


def test_globals_carry_the_runs_provenance(tmp_path) -> None:
    coordinator = open_coordinator(tmp_path, strategy="fedavgm")
    assert coordinator.register("a", dict(SHAPES), 10, 1, SITE_A).accepted
    metadata = load_params_metadata(coordinator.store.global_path(0))
    provenance = ProjectorProvenance.from_metadata(metadata, "v0")
    assert provenance.backbones == SITE_A and provenance.strategy == "fedavgm" and provenance.round == 0
    assert (provenance.vision_hidden, provenance.text_hidden, provenance.projector_type) == (6, 8, "mlp2x_gelu")
    assert provenance == ProjectorProvenance.of(coordinator.recipe, SITE_A, 6, 8, 0)
    assert metadata["format"] == "pt"
