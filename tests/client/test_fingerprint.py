"""Backbone fingerprints: equal files agree, other weights or configs differ, the digest is cached."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedcmp.client import fingerprint as fingerprint_module
from fedcmp.client.fingerprint import FingerprintError, fingerprint_backbones, fingerprint_folder


def copy_of(folder: Path, destination: Path) -> Path:
    shutil.copytree(folder, destination)
    return destination


def test_a_copy_agrees_and_other_weights_or_config_differ(backbones, tmp_path) -> None:
    cache = tmp_path / "cache"
    original = fingerprint_folder(backbones.vision, cache)
    copy = copy_of(backbones.vision, tmp_path / "copy")
    assert fingerprint_folder(copy, cache) == original and len(original) == 64

    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.0"  # who saved it, not what it is
    (copy / "config.json").write_text(json.dumps(config))
    assert fingerprint_folder(copy, cache) == original

    retrained = copy_of(backbones.vision, tmp_path / "retrained")
    weights = load_file(retrained / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-6
    save_file(weights, retrained / "model.safetensors", metadata={"format": "pt"})
    assert fingerprint_folder(retrained, cache) != original

    patched = copy_of(backbones.vision, tmp_path / "patched")
    config = json.loads((patched / "config.json").read_text())
    config["patch_size"] = 4  # same weights, another patch count
    (patched / "config.json").write_text(json.dumps(config))
    assert fingerprint_folder(patched, cache) != original


def test_the_digest_is_cached_until_the_files_change(backbones, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    folder = copy_of(backbones.llm, tmp_path / "llm")
    first = fingerprint_folder(folder, cache)
    assert list((cache / "fingerprints").glob("*.json"))

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed again although unchanged")

    monkeypatch.setattr(fingerprint_module, "_sha256_file", no_hashing)
    assert fingerprint_folder(folder, cache) == first
    monkeypatch.undo()

    weights = load_file(folder / "model.safetensors")
    save_file({key: torch.zeros_like(value) for key, value in weights.items()}, folder / "model.safetensors")
    assert fingerprint_folder(folder, cache) != first


def test_backbones_carry_names_and_fingerprints(backbones, tmp_path) -> None:
    found = fingerprint_backbones(str(backbones.vision), str(backbones.llm), tmp_path)
    assert found.vision_model == str(backbones.vision) and found.llm == str(backbones.llm)
    assert found.vision_fingerprint == fingerprint_folder(backbones.vision, tmp_path)
    assert found.llm_fingerprint != found.vision_fingerprint


def test_what_cannot_be_fingerprinted_is_named(backbones, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FingerprintError, match="has no config.json"):
        fingerprint_folder(empty, tmp_path)
    (empty / "config.json").write_text("{}")
    with pytest.raises(FingerprintError, match="no \\*.safetensors or \\*.bin"):
        fingerprint_folder(empty, tmp_path)
    with pytest.raises(FingerprintError, match="neither a local folder nor in the Hugging Face cache"):
        fingerprint_backbones("no-such-org/no-such-model", str(backbones.llm), tmp_path)


def test_an_unwritable_cache_costs_only_a_rehash(backbones, tmp_path, caplog) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    assert fingerprint_folder(backbones.vision, not_a_folder) == fingerprint_folder(backbones.vision, tmp_path / "ok")
    assert "cannot cache the fingerprint" in caplog.text
