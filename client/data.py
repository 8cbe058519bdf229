"""A client's private data: the source scanned once, its bad samples accounted for, its train/val split.

`scan_data` opens the site's data in whichever format it is kept (`fedcmp.client.sources`),
reads every row's id, caption and image location (never the image pixels), and keeps what the
session needs: the usable rows, their ids and captions, and a digest of the rows' content (the
image files' size and mtime, the container files' stamp) that keys the feature cache. It needs
no model and no coordinator, so a client validates its data before contacting anyone.

Bad samples (unreadable records, empty captions, missing or undecodable images, duplicate
ids) are skipped and counted by `BadSamples`, or end the run under `--on-bad-sample fail`; more
than `max_bad_fraction` of the rows bad ends it too. The first few reasons are logged.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fedcmp.client.sources import Columns, Source, open_source
from fedcmp.client.sources.base import IMAGE_TOKEN, BadSample, DataError

__all__ = ["IMAGE_TOKEN", "BadSamples", "DataError", "DataOptions", "ScannedData", "scan_data", "split_train_val"]

log = logging.getLogger("fedcmp.client")

BadSamplePolicy = Literal["skip", "fail"]
FIRST_REASONS = 5  # how many bad-sample reasons the log and the report keep


@dataclass(frozen=True)
class DataOptions:
    """How a site's data is read: format, image folder, columns, bad samples, feature cache folder, decoding workers."""

    format: str = "auto"
    image_folder: Path | None = None
    columns: Columns = Columns()
    on_bad_sample: BadSamplePolicy = "skip"
    max_bad_fraction: float = 0.01
    feature_cache_dir: Path | None = None  # default: <cache dir>/features
    workers: int = 2  # DataLoader processes decoding images


@dataclass
class BadSamples:
    """Skipped rows: their count and the first few reasons; enforces the policy and the cap."""

    policy: BadSamplePolicy = "skip"
    max_fraction: float = 0.01
    rows: dict[int, str] = field(default_factory=dict)  # source row -> reason

    def add(self, row: int, reason: str) -> None:
        if self.policy == "fail":
            raise DataError(f"bad sample: {reason} (--on-bad-sample fail)")
        if len(self.rows) < FIRST_REASONS:
            log.warning("skipping a bad sample: %s", reason)
        self.rows[row] = reason

    def first_reasons(self) -> list[str]:
        return [self.rows[row] for row in sorted(self.rows)[:FIRST_REASONS]]

    def check(self, total: int) -> None:
        """Refuse the data when more than `max_fraction` of its `total` rows are bad."""
        if len(self.rows) > self.max_fraction * total:
            raise DataError(
                f"{len(self.rows)} of {total} samples are bad ({len(self.rows) / total:.1%}), more than the "
                f"{self.max_fraction:.1%} allowed (--max-bad-fraction); first: {'; '.join(self.first_reasons())}")
        if self.rows:
            log.warning("skipped %d bad samples of %d", len(self.rows), total)


@dataclass
class ScannedData:
    """The usable rows of a source: source row numbers, ids and captions, aligned."""

    source: Source
    rows: np.ndarray  # [n] int64, increasing source row numbers
    ids: list[str]
    captions: list[str]
    content_digest: str  # changes when any row's id, caption or image (file stamp) changes
    bad: BadSamples

    def drop(self, rows: Sequence[int]) -> ScannedData:
        """The same scan without the source rows `rows` (found bad later, when their images were decoded)."""
        unwanted = set(rows)
        keep = [index for index, row in enumerate(self.rows.tolist()) if row not in unwanted]
        return ScannedData(self.source, self.rows[keep], [self.ids[i] for i in keep],
                           [self.captions[i] for i in keep], self.content_digest, self.bad)


def scan_data(path: Path, options: DataOptions = DataOptions()) -> ScannedData:
    """Open `path` and read every row's record (not its image); bad rows are skipped or fatal per `options`."""
    source = open_source(path, options.format, options.image_folder, options.columns)
    bad = BadSamples(options.on_bad_sample, options.max_bad_fraction)
    digest = hashlib.sha256(f"{source.format}\n{source.stamp()}\n".encode())
    rows: list[int] = []
    ids: list[str] = []
    captions: list[str] = []
    first_row_of: dict[str, int] = {}
    for row in range(len(source)):
        try:
            entry = source.entry(row)
            if entry.id in first_row_of:
                raise BadSample(f"row {row}: duplicate id {entry.id!r} (first in row {first_row_of[entry.id]})")
            image_stamp = ""
            if entry.image_path is not None:
                try:
                    status = os.stat(entry.image_path)
                except OSError as error:
                    raise BadSample(f"{entry.id!r}: image file not found: {entry.image_path}") from error
                image_stamp = f"{entry.image_path}:{status.st_size}:{status.st_mtime_ns}"
        except BadSample as error:
            bad.add(row, str(error))
            digest.update(f"{row}\tbad\n".encode())
            continue
        first_row_of[entry.id] = row
        digest.update(f"{row}\t{entry.id}\t{entry.caption}\t{image_stamp}\n".encode())
        rows.append(row)
        ids.append(entry.id)
        captions.append(entry.caption)
    bad.check(len(source))
    if not rows:
        raise DataError(f"{path}: no usable samples")
    return ScannedData(source, np.array(rows, dtype=np.int64), ids, captions, digest.hexdigest(), bad)


def split_train_val(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of `ids`: the positions with the smallest hash(seed, id) go to val.

    Returns (train positions, val positions), each increasing. Membership depends only on
    (seed, ids), not on their order. With `val_fraction > 0` and at least two ids, val holds
    round(val_fraction * n) positions, at least one, and train is never empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = len(ids)
    num_val = 0
    if val_fraction > 0 and count >= 2:
        num_val = min(max(1, round(val_fraction * count)), count - 1)
    by_hash = sorted(range(count), key=lambda position: (_split_hash(seed, ids[position]), ids[position]))
    val = sorted(by_hash[:num_val])
    val_set = set(val)
    return [position for position in range(count) if position not in val_set], val


def _split_hash(seed: int, example_id: str) -> bytes:
    return hashlib.sha256(f"fedcmp-split:{seed}:{example_id}".encode()).digest()
