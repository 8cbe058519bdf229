"""What every data source gives: entries (id, caption, image) by row number, read lazily.

A `Source` is a random-access view over a site's files: `len(source)` rows, `source.entry(row)`
for a row's id, caption and image location, `source.image(row)` for its encoded image (a file
path or the bytes the container holds). Reading one row never loads the whole dataset; a source
keeps at most a compact index (offsets, row-group bounds) and one bounded window of data.

A row that cannot be used (no caption, no image, a malformed record) raises `BadSample`, which
the caller skips or turns into a failure; a dataset that cannot be read at all raises
`DataError`. Sources are pickled into DataLoader workers: open files are reopened lazily in
each process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

IMAGE_TOKEN = "<image>"


class DataError(ValueError):
    """Client data that cannot be used; the message names the file, the entry and the problem."""


class BadSample(ValueError):
    """One unusable row; the message says which and why."""


@dataclass(frozen=True)
class Columns:
    """Where a record keeps its fields (JSON Lines, Parquet, `datasets`); LLaVA's conversations are also understood."""

    id: str = "id"
    image: str = "image"
    caption: str = "caption"


@dataclass(frozen=True)
class Entry:
    id: str
    caption: str
    image_path: Path | None  # the image file, or None when the source holds the image bytes itself


class Source(Protocol):
    format: str
    location: Path

    def __len__(self) -> int: ...

    def entry(self, row: int) -> Entry:
        """Id, caption and image location of `row`; raises BadSample for an unusable record."""
        ...

    def image(self, row: int) -> Path | bytes:
        """The encoded image of `row` (a file or its bytes); raises BadSample when it is missing."""
        ...

    def stamp(self) -> str:
        """Identity of the files the source reads (path, size, mtime): changes when they change."""
        ...


def file_stamp(paths: list[Path]) -> str:
    """`path:size:mtime_ns` of each file, one per line."""
    lines = []
    for path in paths:
        status = os.stat(path)
        lines.append(f"{path.resolve()}:{status.st_size}:{status.st_mtime_ns}")
    return "\n".join(lines)


def parse_record(record: Any, columns: Columns, row: int, image_folder: Path | None, where: str) -> Entry:
    """An Entry from a mapping in LLaVA's layout (`conversations`) or with a caption column.

    The id defaults to the row number when the record has no id field. An image given as a
    string is a path relative to `image_folder`; a `{"bytes", "path"}` struct (as `datasets`
    writes images) or raw bytes mean the source holds the image itself.
    """
    if not isinstance(record, dict):
        raise BadSample(f"{where}: expected an object, got {type(record).__name__}")
    raw_id = record.get(columns.id, row)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
        raise BadSample(f"{where}: invalid {columns.id!r} (a non-empty string or integer)")
    where = f"{where} (id {str(raw_id)!r})"
    caption = _caption(record, columns, where)
    image = record.get(columns.image)
    if isinstance(image, str) and image:
        folder = image_folder if image_folder is not None else Path(".")
        return Entry(str(raw_id), caption, folder / image)
    if isinstance(image, (bytes, bytearray)) and image:
        return Entry(str(raw_id), caption, None)
    if isinstance(image, dict) and (image.get("bytes") or image.get("path")):
        path = None if image.get("bytes") else Path(image["path"])
        if path is not None and not path.is_absolute() and image_folder is not None:
            path = image_folder / path
        return Entry(str(raw_id), caption, path)
    raise BadSample(f"{where}: missing or invalid {columns.image!r} (an image path or bytes)")


def image_cell(cell: Any, entry: Entry, where: str) -> Path | bytes:
    """The image of a record whose image column is `cell` (see `parse_record`)."""
    if entry.image_path is not None:
        return entry.image_path
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise BadSample(f"{where}: no image bytes")
    return bytes(data)


def _caption(record: dict, columns: Columns, where: str) -> str:
    conversations = record.get("conversations")
    if columns.caption in record or conversations is None:
        caption = record.get(columns.caption)
        if not isinstance(caption, str):
            raise BadSample(f"{where}: missing or invalid {columns.caption!r} (the caption text)")
    else:
        if not isinstance(conversations, list):
            raise BadSample(f"{where}: invalid 'conversations' (a list of turns)")
        turns = [turn for turn in conversations if isinstance(turn, dict) and isinstance(turn.get("value"), str)]
        if not any(turn.get("from") == "human" and IMAGE_TOKEN in turn["value"] for turn in turns):
            raise BadSample(f"{where}: no human turn containing {IMAGE_TOKEN}")
        gpt_turns = [turn for turn in turns if turn.get("from") == "gpt"]
        if not gpt_turns:
            raise BadSample(f"{where}: no gpt turn (the caption)")
        caption = gpt_turns[0]["value"]
    caption = caption.strip()
    if not caption:
        raise BadSample(f"{where}: empty caption")
    if IMAGE_TOKEN in caption:
        raise BadSample(f"{where}: the caption contains {IMAGE_TOKEN}")
    return caption
