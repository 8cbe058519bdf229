"""WebDataset tar shards: `{key}.jpg` (or png, webp...) with `{key}.txt` or `{key}.json` captions.

A WebDataset reader streams shards in order; training needs rows in any order, so this source
indexes the shards instead: opening walks each tar's headers once (stdlib `tarfile`, no data
read) and keeps each sample's byte offsets and sizes; a row is then two seeks. Shards must be
uncompressed tars (as WebDataset recommends for images): a `.tar.gz` cannot be seeked.
The key (the member path up to the first dot of its name) is the example id; a `.json`
caption is its `caption` (or `text`) field.
"""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedcmp.client.sources.base import BadSample, Columns, DataError, Entry, file_stamp

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
CAPTION_EXTENSIONS = ("txt", "json")


class WebDatasetSource:
    format = "webdataset"

    def __init__(self, path: Path, columns: Columns) -> None:
        self.location = path
        self.shards = sorted(path.glob("*.tar")) if path.is_dir() else [path]
        if not self.shards:
            raise DataError(f"{path}: no *.tar shards")
        self.columns = columns
        keys: list[str] = []
        members: list[tuple[int, int, int, int, int, int]] = []  # shard, image offset/size, caption offset/size, json
        for shard_index, shard in enumerate(self.shards):
            for key, parts in _samples(shard):
                image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), (-1, 0))
                caption_ext = next((ext for ext in CAPTION_EXTENSIONS if ext in parts), None)
                caption = parts[caption_ext] if caption_ext else (-1, 0)
                keys.append(key)
                members.append((shard_index, *image, *caption, int(caption_ext == "json")))
        if not keys:
            raise DataError(f"{path}: the shards hold no samples")
        self.keys = keys
        self.members = np.array(members, dtype=np.int64)  # [N, 6]
        self._files: dict[int, BinaryIO] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}, "_pid": -1}

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")
        self._files[shard].seek(offset)
        return self._files[shard].read(size)

    def _where(self, row: int) -> str:
        return f"{self.shards[int(self.members[row, 0])].name} sample {self.keys[row]!r}"

    def entry(self, row: int) -> Entry:
        shard, image_offset, _, caption_offset, caption_size, is_json = (int(v) for v in self.members[row])
        if image_offset < 0:
            raise BadSample(f"{self._where(row)}: no image member ({', '.join(IMAGE_EXTENSIONS)})")
        if caption_offset < 0:
            raise BadSample(f"{self._where(row)}: no caption member (.txt or .json)")
        raw = self._read(shard, caption_offset, caption_size)
        try:
            text = raw.decode("utf-8")
            caption = json.loads(text) if is_json else text
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadSample(f"{self._where(row)}: unreadable caption: {error}") from error
        if is_json:
            caption = caption.get(self.columns.caption, caption.get("text")) if isinstance(caption, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise BadSample(f"{self._where(row)}: empty caption")
        return Entry(self.keys[row], caption.strip(), None)

    def image(self, row: int) -> bytes:
        shard, image_offset, image_size = (int(v) for v in self.members[row, :3])
        if image_offset < 0:
            raise BadSample(f"{self._where(row)}: no image member")
        return self._read(shard, image_offset, image_size)

    def stamp(self) -> str:
        return file_stamp(self.shards)


def _samples(shard: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {extension: (data offset, size)}) of each sample of `shard`, in tar order."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, dot, extension = name.partition(".")
                if not dot:
                    continue
                key = f"{folder}/{stem}" if folder else stem
                samples.setdefault(key, {})[extension.lower()] = (member.offset_data, member.size)
    except tarfile.ReadError as error:
        raise DataError(f"{shard}: not an uncompressed tar shard ({error}); decompress .tar.gz shards first") from error
    except OSError as error:
        raise DataError(f"{shard}: cannot read: {error.strerror or error}") from error
    return list(samples.items())
