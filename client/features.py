"""The frozen-feature room: where a split's vision features come from, behind one interface.

The trainer and the evaluation read features through `FeatureStore`: `len(store)`,
`store[indices]` (a slice or an index tensor -> float32 [b, P, vision_hidden]) and
`store.batches(index_batches)`, an iterator over many batches that a store may prefetch. They
never know where the rows come from:

- `DiskFeatures` (`feature_cache: disk`): computed once by `build_disk_cache` into a
  memory-mapped file under the cache dir, in the recipe's `feature_dtype` (bfloat16 by
  default: half of float32), keyed by `cache_key` (vision tower weights and preprocessing,
  feature layer, select strategy, dtype, the data's content digest). Only the rows a batch
  reads are in memory. The file is written in `<key>.partial/` with a progress record after
  every batch, so an interrupted encode resumes there, and renamed to `<key>/` only once
  complete: a crash never leaves a cache that a later start trusts.
- `LiveFeatures` (`feature_cache: off`): the vision tower runs on each batch, a torch
  `DataLoader`'s worker processes decoding and preprocessing the images ahead.

Both real modes round the tower's output to `feature_dtype`, so they feed the projector the
same numbers. `EncodedSplit` row-aligns a feature store with the tokenized captions;
`batches` yields `CaptionBatch`es, the one thing a training step consumes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedcmp.common.allocator import pin_mmap_threshold
from fedcmp.client.data import DataOptions, ScannedData, split_train_val
from fedcmp.client.sources import BadSample, DataError, Source
from fedcmp.client.sources.images import load_rgb
from fedcmp.common.codec import fsync_dir, write_atomic
from fedcmp.common.recipe import Recipe
from fedcmp.common.zoo import default_cache_dir

if TYPE_CHECKING:
    from fedcmp.client.model import ProjectorMLLM

log = logging.getLogger("fedcmp.client")

FEATURE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CACHE_FORMAT_VERSION = 1

Index = slice | Tensor


@runtime_checkable
class FeatureStore(Protocol):
    """Rows of frozen vision features, [N, P, vision_hidden]."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Index) -> Tensor:
        """float32 features [b, P, vision_hidden] of the rows `index` selects, in that order."""
        ...

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        """`self[rows]` for each rows of `index_batches`, in order (a store may prefetch ahead)."""
        ...


class FeatureView:
    """The rows `rows` of another store, renumbered 0..len(rows)-1 (a train or val split of a site's data)."""

    def __init__(self, base: FeatureStore, rows: Tensor) -> None:
        self.base = base
        self.rows = rows  # [n] long: row i of the view is row rows[i] of base

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: Index) -> Tensor:
        return self.base[self.rows[index]]

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        return self.base.batches([self.rows[rows] for rows in index_batches])


class ConcatFeatures:
    """Several stores one after the other (the simulator's pooled, centralized baseline)."""

    def __init__(self, parts: Sequence[FeatureStore]) -> None:
        self.parts = list(parts)
        self.ends = torch.tensor([len(part) for part in self.parts]).cumsum(0)  # [K] exclusive row ends

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.parts else 0

    def __getitem__(self, index: Index) -> Tensor:
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else index  # [b]
        part_of_row = torch.searchsorted(self.ends, rows, right=True)  # [b]
        starts = self.ends - torch.tensor([len(part) for part in self.parts])  # [K]
        pieces = {}
        for part in torch.unique(part_of_row).tolist():
            chosen = part_of_row == part
            pieces[part] = (chosen, self.parts[part][rows[chosen] - starts[part]])  # [b_k, P, H]
        first = next(iter(pieces.values()))[1]
        out = first.new_empty((rows.shape[0], *first.shape[1:]))  # [b, P, H]
        for chosen, features in pieces.values():
            out[chosen] = features
        return out

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        return (self[rows] for rows in index_batches)


class DiskFeatures:
    """A memory-mapped [N, P, vision_hidden] feature file; reading a batch maps in only its rows."""

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: str) -> None:
        self.path, self.shape, self.dtype = path, shape, dtype
        self.array = np.memmap(path, dtype=_numpy_storage(dtype), mode="r", shape=shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Index) -> Tensor:
        rows = np.ascontiguousarray(self.array[index if isinstance(index, slice) else index.numpy()])  # [b, P, H]
        if self.dtype != "float32":
            rows = rows.view(np.int16)  # torch reads half floats as int16 bits, then reinterprets them
        return torch.from_numpy(rows).view(FEATURE_DTYPES[self.dtype]).float()

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        return (self[rows] for rows in index_batches)


class PassRows:
    """A batch sampler whose batches are replaced before each pass over a persistent DataLoader."""

    def __init__(self) -> None:
        self.row_batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.row_batches)

    def __len__(self) -> int:
        return len(self.row_batches)


class LiveFeatures:
    """The vision tower run on each batch of a source's rows (no cache); workers decode images ahead.

    With workers, one DataLoader keeps its worker processes for the store's life (a round's pass
    does not pay for starting them); each `batches` call is a new pass over it and ends the
    previous one, so reading an earlier call's iterator after a newer call is refused."""

    def __init__(self, model: ProjectorMLLM, source: Source, dtype: str, workers: int) -> None:
        self.model, self.source, self.dtype, self.workers = model, source, dtype, workers
        self._pass_rows = PassRows()
        self._loader: DataLoader | None = None  # made at the first pass with workers
        self._passes = 0  # passes begun over the loader

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: Index) -> Tensor:
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else index
        return next(self._features(pixel_batches(self.source, self.model.image_processor, [rows], workers=0)))

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        if self.workers == 0:
            return self._features(pixel_batches(self.source, self.model.image_processor, index_batches, workers=0))
        if self._loader is None:
            self._loader = DataLoader(PixelDataset(self.source, self.model.image_processor),
                                      batch_sampler=self._pass_rows, num_workers=self.workers,
                                      collate_fn=_collate, persistent_workers=True)
        self._pass_rows.row_batches = [list(map(int, rows)) for rows in index_batches]
        self._passes += 1
        return self._features(self._pass(iter(self._loader), self._passes))

    def _pass(self, pixels: Iterator[PixelBatch], this_pass: int) -> Iterator[PixelBatch]:
        """The loader's batches while pass `this_pass` is the newest (checked before each is taken)."""
        while this_pass == self._passes:
            batch = next(pixels, None)
            if batch is None:
                return
            yield batch
        raise RuntimeError("a feature pass was read after a newer pass over the same store began")

    def _features(self, pixels: Iterator[PixelBatch]) -> Iterator[Tensor]:
        for _, features, bad in encode_pixels(self.model, pixels, self.dtype):
            if bad:
                raise DataError(f"an image changed since the data was checked: {bad[0][1]}")
            yield features.float()


class PixelDataset(Dataset):
    """Source row -> (row, preprocessed pixels [3, H, W] and the image's (width, height), or why it is bad)."""

    def __init__(self, source: Source, image_processor: object) -> None:
        self.source, self.image_processor = source, image_processor

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, row: int) -> tuple[int, Tensor | str, tuple[int, int]]:
        where = f"{self.source.location.name} row {row}"
        try:
            picture = load_rgb(self.source.image(row), where)
        except BadSample as error:
            return row, str(error), (0, 0)
        pixels = self.image_processor(images=[picture], return_tensors="pt")["pixel_values"][0]  # [3, H, W]
        return row, pixels, picture.size


@dataclass
class PixelBatch:
    rows: list[int]  # the good rows, in batch order
    pixel_values: Tensor | None  # [b, 3, H, W], None when every row of the batch is bad
    sizes: list[tuple[int, int]]  # (width, height) of each good row's image
    bad: list[tuple[int, str]]  # (row, reason) of the rows whose image is unusable


def _collate(items: list[tuple[int, Tensor | str, tuple[int, int]]]) -> PixelBatch:
    good = [(row, pixels, size) for row, pixels, size in items if isinstance(pixels, Tensor)]
    return PixelBatch([row for row, _, _ in good], torch.stack([p for _, p, _ in good]) if good else None,
                      [size for _, _, size in good], [(row, str(reason)) for row, reason, _ in items
                                                      if not isinstance(reason, Tensor)])


def pixel_batches(source: Source, image_processor: object, row_batches: Sequence[Tensor | list[int]],
                  workers: int) -> Iterator[PixelBatch]:
    """Decoded, preprocessed images of each batch of source rows, `workers` processes decoding ahead."""
    loader = DataLoader(PixelDataset(source, image_processor), batch_sampler=[list(map(int, b)) for b in row_batches],
                        num_workers=workers, collate_fn=_collate)
    return iter(loader)


def encode_pixels(model: ProjectorMLLM, pixels: Iterable[PixelBatch], dtype: str
                  ) -> Iterator[tuple[list[int], Tensor, list[tuple[int, str]]]]:
    """(good rows, their features [b, P, H] in `dtype` on CPU, bad rows with reasons) per pixel batch."""
    empty = torch.empty(0, model.num_image_tokens, model.vision_hidden, dtype=FEATURE_DTYPES[dtype])
    for batch in pixels:
        if batch.pixel_values is None:
            yield [], empty, batch.bad
            continue
        features = model.image_features(batch.pixel_values)  # [b, P, H]
        yield batch.rows, features.to("cpu", FEATURE_DTYPES[dtype]), batch.bad


def open_features(model: ProjectorMLLM, recipe: Recipe, scanned: ScannedData, options: DataOptions = DataOptions(),
                  cache_dir: Path | None = None, show_progress: bool = False) -> EncodedSplit:
    """The usable rows of `scanned` with their features (cached on disk or live, per `recipe.feature_cache`)
    and tokenized captions. Rows whose image cannot be decoded join the bad samples (policy and cap apply)."""
    pin_mmap_threshold()  # encoding thousands of batches must not grow the heap (common/allocator.py)
    source, dtype = scanned.source, recipe.feature_dtype
    store: FeatureStore
    if recipe.feature_cache == "disk":
        root = options.feature_cache_dir or (cache_dir or default_cache_dir()) / "features"
        key = cache_key(model, dtype, scanned.content_digest)
        store, bad_images = build_disk_cache(model, source, scanned.rows, dtype, root, key, recipe.batch_size,
                                             options.workers, show_progress)
    else:
        store = LiveFeatures(model, source, dtype, options.workers)
        bad_images = scan_images(source, model.image_processor, scanned.rows, recipe.batch_size, options.workers).bad
    for row, reason in sorted(bad_images.items()):
        scanned.bad.add(row, reason)
    scanned.bad.check(len(source))
    usable = scanned.drop(list(bad_images))
    if not usable.ids:
        raise DataError(f"{source.location}: no usable samples")
    caption_ids, caption_mask = model.tokenize_captions(usable.captions)  # [N, L], [N, L]
    return EncodedSplit(usable.ids, FeatureView(store, torch.from_numpy(usable.rows)), caption_ids, caption_mask)


def split_session_data(whole: EncodedSplit, recipe: Recipe) -> tuple[EncodedSplit, EncodedSplit]:
    """The deterministic (train, val) split of a site's encoded data (see `split_train_val`)."""
    train, val = split_train_val(whole.ids, recipe.val_fraction, recipe.seed)
    return whole.take(torch.tensor(train, dtype=torch.long)), whole.take(torch.tensor(val, dtype=torch.long))


@dataclass
class ImageReport:
    bad: dict[int, str]  # source row -> why its image is unusable
    sizes: list[tuple[int, int]]  # (width, height) of every good image


def scan_images(source: Source, image_processor: object, rows: np.ndarray, batch_size: int,
                workers: int) -> ImageReport:
    """Decode (and preprocess) the images of `rows` once, without the tower: which are bad, and their sizes."""
    report = ImageReport({}, [])
    row_batches = [rows[start : start + batch_size].tolist() for start in range(0, len(rows), batch_size)]
    for batch in pixel_batches(source, image_processor, row_batches, workers):
        report.bad.update(batch.bad)
        report.sizes += batch.sizes
    return report


def tower_digest(model: ProjectorMLLM) -> str:
    """sha256 of the vision tower's weights (names, dtypes, shapes, bytes) and of the image preprocessing."""
    digest = hashlib.sha256(model.image_processor.to_json_string().encode())
    for name, tensor in sorted(model.llava.model.vision_tower.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(model: ProjectorMLLM, dtype: str, content_digest: str) -> str:
    """What the cached features depend on: tower weights and preprocessing, layer, selection, dtype, data."""
    config = model.llava.config
    parts = {"version": CACHE_FORMAT_VERSION, "tower": tower_digest(model), "layer": config.vision_feature_layer,
             "select": config.vision_feature_select_strategy, "dtype": dtype, "data": content_digest}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def build_disk_cache(model: ProjectorMLLM, source: Source, rows: np.ndarray, dtype: str, cache_root: Path,
                     key: str, batch_size: int, workers: int, show_progress: bool = False
                     ) -> tuple[DiskFeatures, dict[int, str]]:
    """The features of the source rows `rows`, from `<cache_root>/<key>/` or encoded into it.

    Returns the store (all source rows; rows not in `rows` stay zero) and the rows whose image
    turned out bad, with reasons. An interrupted encode resumes at its last recorded batch.
    """
    shape = (len(source), model.num_image_tokens, model.vision_hidden)
    final = cache_root / key
    cached = _open_complete(final, shape, dtype)
    if cached is not None:
        return cached
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per key; others wait, then find it complete
        cached = _open_complete(final, shape, dtype)
        if cached is not None:
            return cached
        partial = cache_root / f"{key}.partial"
        done, bad = _resume_point(partial, shape, dtype)
        if done == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
            np.memmap(partial / "features.bin", dtype=_numpy_storage(dtype), mode="w+", shape=shape).flush()
        table = np.memmap(partial / "features.bin", dtype=_numpy_storage(dtype), mode="r+", shape=shape)
        todo = rows[done:]
        if done:
            log.info("resuming an interrupted feature encode at %d of %d images", done, len(rows))
        row_batches = [todo[start : start + batch_size].tolist() for start in range(0, len(todo), batch_size)]
        encoded = encode_pixels(model, pixel_batches(source, model.image_processor, row_batches, workers), dtype)
        for row_batch, (good, features, bad_rows) in tqdm(zip(row_batches, encoded), total=len(row_batches),
                                                         desc="encoding images", unit="batch",
                                                         disable=None if show_progress else True):
            if good:
                table[np.array(good)] = _storage_bits(features)
            bad.update(bad_rows)
            done += len(row_batch)
            table.flush()  # msync: the rows are on disk before the progress record says so
            _write_json(partial / "progress.json", {"done": done, "bad": bad})
        del table
        _fsync(partial / "features.bin")
        _write_json(partial / "manifest.json", {"version": CACHE_FORMAT_VERSION, "shape": list(shape),
                                                "dtype": dtype, "bad": bad})
        (partial / "progress.json").unlink()
        shutil.rmtree(final, ignore_errors=True)  # an unusable leftover (another format version, a torn copy)
        os.replace(partial, final)  # atomic: the cache is complete or absent
        fsync_dir(cache_root)
    return DiskFeatures(final / "features.bin", shape, dtype), bad


def _open_complete(folder: Path, shape: tuple[int, int, int], dtype: str) -> tuple[DiskFeatures, dict[int, str]] | None:
    manifest = _read_json(folder / "manifest.json")
    expected_bytes = int(np.prod(shape)) * np.dtype(_numpy_storage(dtype)).itemsize
    if (manifest is None or manifest.get("version") != CACHE_FORMAT_VERSION or manifest.get("shape") != list(shape)
            or manifest.get("dtype") != dtype or _size(folder / "features.bin") != expected_bytes):
        return None
    return DiskFeatures(folder / "features.bin", shape, dtype), {int(row): why for row, why in manifest["bad"].items()}


def _resume_point(partial: Path, shape: tuple[int, int, int], dtype: str) -> tuple[int, dict[int, str]]:
    """How many of the rows to encode an interrupted run finished (0: start afresh), and its bad rows."""
    progress = _read_json(partial / "progress.json")
    expected_bytes = int(np.prod(shape)) * np.dtype(_numpy_storage(dtype)).itemsize
    if progress is None or _size(partial / "features.bin") != expected_bytes:
        return 0, {}
    return int(progress["done"]), {int(row): why for row, why in progress["bad"].items()}


def _numpy_storage(dtype: str) -> type:
    return np.float32 if dtype == "float32" else np.uint16  # numpy has no bfloat16: half floats travel as bits


def _storage_bits(features: Tensor) -> np.ndarray:
    """`features` as the numpy array the file stores: float32 as is, half floats as their uint16 bits."""
    if features.dtype == torch.float32:
        return features.numpy()
    return features.view(torch.int16).numpy().view(np.uint16)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    write_atomic(path, json.dumps(value).encode())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


@dataclass(frozen=True)
class CaptionBatch:
    """What one training or evaluation step consumes."""

    features: Tensor  # [B, P, vision_hidden] float32
    caption_ids: Tensor  # [B, L] long
    caption_mask: Tensor  # [B, L] long


@dataclass
class EncodedSplit:
    """A split's example ids, feature rows and tokenized captions, row-aligned."""

    ids: list[str]
    features: FeatureStore  # [N, P, vision_hidden]
    caption_ids: Tensor  # [N, L]
    caption_mask: Tensor  # [N, L]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: Tensor) -> EncodedSplit:
        """The split of the rows `rows` ([n] long), in that order."""
        return EncodedSplit([self.ids[row] for row in rows.tolist()], FeatureView(self.features, rows),
                            self.caption_ids[rows], self.caption_mask[rows])

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[CaptionBatch]:
        """One CaptionBatch per rows of `index_batches` ([B] long each), in order."""
        features = self.features.batches(index_batches)
        for rows, batch_features in zip(index_batches, features):
            yield CaptionBatch(batch_features, self.caption_ids[rows], self.caption_mask[rows])


def concat_splits(splits: Sequence[EncodedSplit]) -> EncodedSplit:
    """One split holding the rows of all `splits` (captions right-padded to the longest)."""
    width = max(split.caption_ids.shape[1] for split in splits)

    def padded(tensor: Tensor) -> Tensor:  # [N, L] -> [N, width]
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))

    return EncodedSplit([row for split in splits for row in split.ids], ConcatFeatures([s.features for s in splits]),
                        torch.cat([padded(s.caption_ids) for s in splits]),
                        torch.cat([padded(s.caption_mask) for s in splits]))
