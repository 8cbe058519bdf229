"""Projector metadata: what `to_metadata` writes, `from_metadata` reads back or names what is wrong."""
from __future__ import annotations

import pytest

from fedcmp.common.provenance import Backbones, ProjectorProvenance, ProvenanceError, recipe_sha256
from fedcmp.common.recipe import Recipe

BACKBONES = Backbones("micro", "micro", "a" * 64, "b" * 64)


def test_metadata_round_trips_and_names_every_field() -> None:
    provenance = ProjectorProvenance.of(Recipe(strategy="fedcmp", vision_feature_layer=-1), BACKBONES, 64, 128, 7)
    metadata = provenance.to_metadata()
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["fedcmp.round"] == "7" and metadata["fedcmp.vision_feature_layer"] == "-1"
    assert metadata["fedcmp.template"] == "plain" and metadata["fedcmp.strategy"] == "fedcmp"
    assert ProjectorProvenance.from_metadata(metadata, "file") == provenance


def test_missing_or_malformed_metadata_is_named() -> None:
    metadata = ProjectorProvenance.of(Recipe(), BACKBONES, 64, 128, 1).to_metadata()
    with pytest.raises(ProvenanceError, match="file carries no fedcmp metadata 'fedcmp.round'"):
        ProjectorProvenance.from_metadata({k: v for k, v in metadata.items() if k != "fedcmp.round"}, "file")
    with pytest.raises(ProvenanceError, match="fedcmp.text_hidden='wide' is not an integer"):
        ProjectorProvenance.from_metadata({**metadata, "fedcmp.text_hidden": "wide"}, "file")
    with pytest.raises(ProvenanceError, match="carries no fedcmp metadata"):
        ProjectorProvenance.from_metadata(None, "file")


def test_the_recipe_hash_follows_the_recipe() -> None:
    assert recipe_sha256(Recipe()) == recipe_sha256(Recipe.from_json(Recipe().to_json()))
    assert recipe_sha256(Recipe()) != recipe_sha256(Recipe(lr=0.1))
