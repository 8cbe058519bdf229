"""Fingerprints of the frozen backbones: what proves two sites load the same vision tower and LM.

A fingerprint is the sha256 of a checkpoint folder's `config.json` (canonical JSON, without the
keys that only record who saved it) followed by the sha256 of each weight file, in name order.
It depends on the files, not on how they are loaded: a bfloat16 CUDA client and a float32 CPU
client of the same checkpoint agree. Hashing gigabytes takes a while, so the digest is cached
under `<cache dir>/fingerprints/` and reused while the weight files keep their size and mtime.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from fedcmp.common.codec import write_atomic
from fedcmp.common.provenance import Backbones

log = logging.getLogger("fedcmp.client")

# config.json keys that say who saved a checkpoint, not what it is.
VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
BLOCK_BYTES = 8 * 1024 * 1024


class FingerprintError(ValueError):
    """A backbone that cannot be fingerprinted (no local files, no config, no weights)."""


def checkpoint_folder(name_or_path: str, kind: Literal["vision", "llm"], cache_dir: Path | None = None) -> Path:
    """The local folder holding a backbone: a path as is, "micro" in the zoo, a hub id in the Hugging Face cache."""
    from fedcmp.common.zoo import resolve_backbone  # imported here: it imports transformers' vision classes

    resolved = resolve_backbone(name_or_path, kind, cache_dir)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download  # only hub ids need it

    try:
        return Path(snapshot_download(resolved, local_files_only=True, cache_dir=cache_dir))
    except Exception as error:  # huggingface_hub raises several kinds for "not in the cache"
        raise FingerprintError(f"cannot fingerprint {kind} backbone {name_or_path!r}: it is neither a local folder "
                               f"nor in the Hugging Face cache ({error})") from error


def fingerprint_folder(folder: Path, cache_dir: Path | None = None) -> str:
    """The fingerprint of the checkpoint in `folder` (hex sha256), from the cache when its weights are unchanged."""
    folder = folder.resolve()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FingerprintError(f"cannot fingerprint {folder}: it has no config.json")
    weights = sorted({path for pattern in WEIGHT_PATTERNS for path in folder.glob(pattern)})
    if not weights:
        raise FingerprintError(f"cannot fingerprint {folder}: it holds no *.safetensors or *.bin weight files")
    stamp = {path.name: [path.stat().st_size, path.stat().st_mtime_ns] for path in [config_file, *weights]}
    cache_file = _cache_root(cache_dir) / "fingerprints" / f"{_sha256_text(str(folder))[:24]}.json"
    cached = _read_cache(cache_file)
    if cached.get("folder") == str(folder) and cached.get("stamp") == stamp:
        return cached["fingerprint"]
    log.info("fingerprinting %s (%d weight files; cached afterwards)", folder, len(weights))
    digest = hashlib.sha256(_canonical_config(config_file).encode())
    for path in weights:
        digest.update(f"\n{path.name} {_sha256_file(path)}".encode())
    fingerprint = digest.hexdigest()
    try:
        write_atomic(cache_file, json.dumps({"folder": str(folder), "stamp": stamp, "fingerprint": fingerprint}).encode())
    except OSError as error:  # a read-only cache (e.g. a read-only container filesystem) only costs a re-hash
        log.warning("cannot cache the fingerprint of %s in %s: %s", folder, cache_file.parent, error.strerror or error)
    return fingerprint


def fingerprint_backbones(vision_model: str, llm: str, cache_dir: Path | None = None) -> Backbones:
    """Names and fingerprints of a vision tower and an LM, as a client announces them."""
    return Backbones(
        vision_model=vision_model, llm=llm,
        vision_fingerprint=fingerprint_folder(checkpoint_folder(vision_model, "vision", cache_dir), cache_dir),
        llm_fingerprint=fingerprint_folder(checkpoint_folder(llm, "llm", cache_dir), cache_dir))


def _cache_root(cache_dir: Path | None) -> Path:
    from fedcmp.common.zoo import default_cache_dir  # imported here: the zoo module imports transformers

    return cache_dir or default_cache_dir()


def _canonical_config(config_file: Path) -> str:
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise FingerprintError(f"{config_file} is not valid JSON: {error}") from error
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return json.dumps(config, sort_keys=True, separators=(",", ":"))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read_cache(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
