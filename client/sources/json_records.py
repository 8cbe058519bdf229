"""LLaVA's JSON list and JSON Lines: one record per row, found again by its byte offset.

Opening scans the file once, streaming (a JSON list is decoded element by element with
`json.JSONDecoder.raw_decode` over a bounded buffer, JSON Lines line by line), and keeps only
each record's byte offset and length (12 bytes a row). `entry(row)` seeks and parses that one
record. Image paths are relative to the image folder: `images/` beside a LLaVA JSON file (its
usual layout), the data file's own folder for JSON Lines, or `--image-folder`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedcmp.client.sources.base import BadSample, Columns, DataError, Entry, file_stamp, parse_record

DEFAULT_JSON_NAME = "chat.json"
DEFAULT_IMAGE_FOLDER = "images"
READ_CHUNK_CHARS = 1 << 20


class JsonRecords:
    """Rows are JSON objects at known byte spans of one file."""

    def __init__(self, format: str, path: Path, spans: np.ndarray, columns: Columns, image_folder: Path) -> None:
        self.format = format
        self.location = path
        self.spans = spans  # [N, 2] int64: byte offset and length of each record
        self.columns = columns
        self.image_folder = image_folder
        self._file: BinaryIO | None = None
        self._pid = -1

    def __len__(self) -> int:
        return self.spans.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_pid": -1}

    def _where(self, row: int) -> str:
        return f"{self.location.name} {'entry' if self.format == 'llava-json' else 'record'} {row}"

    def entry(self, row: int) -> Entry:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.location, "rb"), os.getpid()
        offset, length = (int(value) for value in self.spans[row])
        self._file.seek(offset)
        try:
            record = json.loads(self._file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadSample(f"{self._where(row)}: invalid JSON: {error}") from error
        return parse_record(record, self.columns, row, self.image_folder, self._where(row))

    def image(self, row: int) -> Path:
        path = self.entry(row).image_path
        assert path is not None  # parse_record gives JSON string images as paths
        return path

    def stamp(self) -> str:
        return file_stamp([self.location])


def open_llava_json(path: Path, image_folder: Path | None, columns: Columns) -> JsonRecords:
    """A LLaVA pretraining JSON list (or a folder holding `chat.json`)."""
    json_path = path / DEFAULT_JSON_NAME if path.is_dir() else path
    images = image_folder if image_folder is not None else json_path.parent / DEFAULT_IMAGE_FOLDER
    return JsonRecords("llava-json", json_path, _list_spans(json_path), columns, images)


def open_json_lines(path: Path, image_folder: Path | None, columns: Columns) -> JsonRecords:
    """A JSON Lines file: one record per non-blank line."""
    spans = []
    try:
        with open(path, "rb") as file:
            offset = 0
            for line in file:
                if line.strip():
                    spans.append((offset, len(line)))
                offset += len(line)
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
    if not spans:
        raise DataError(f"{path}: the dataset is empty")
    images = image_folder if image_folder is not None else path.parent
    return JsonRecords("jsonl", path, np.array(spans, dtype=np.int64), columns, images)


def _list_spans(path: Path) -> np.ndarray:
    """Byte spans [N, 2] of the elements of the JSON list in `path`, read in bounded chunks."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int]] = []
    try:
        file = open(path, encoding="utf-8")
    except OSError as error:
        raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
    with file:
        buffer, position, byte_offset, at_end = "", 0, 0, False  # byte_offset: bytes before buffer[position]

        def skip(chars: str) -> None:  # move `position` past `chars`, reading more as needed
            nonlocal buffer, position, byte_offset, at_end
            while True:
                while position < len(buffer) and buffer[position] in chars:
                    byte_offset += len(buffer[position].encode())
                    position += 1
                if position < len(buffer) or at_end:
                    return
                buffer, position = file.read(READ_CHUNK_CHARS), 0
                at_end = buffer == ""

        try:
            skip(" \t\r\n")
            if buffer[position : position + 1] != "[":
                raise DataError(f"{path}: expected a JSON list of examples")
            position, byte_offset = position + 1, byte_offset + 1
            skip(" \t\r\n")
            while not at_end and buffer[position] != "]":
                while True:
                    try:
                        _, end = decoder.raw_decode(buffer, position)
                        break
                    except json.JSONDecodeError as error:
                        more = file.read(max(READ_CHUNK_CHARS, len(buffer)))
                        if not more:
                            raise DataError(f"{path}: invalid JSON near byte {byte_offset}: {error.msg}") from error
                        buffer, position = buffer[position:] + more, 0
                length = len(buffer[position:end].encode())
                spans.append((byte_offset, length))
                byte_offset, position = byte_offset + length, end
                if position > READ_CHUNK_CHARS:
                    buffer, position = buffer[position:], 0
                skip(" \t\r\n")
                if not at_end and buffer[position] == ",":
                    position, byte_offset = position + 1, byte_offset + 1
                    skip(" \t\r\n")
                elif not at_end and buffer[position] != "]":
                    raise DataError(f"{path}: invalid JSON near byte {byte_offset}: expected ',' or ']'")
            if at_end:
                raise DataError(f"{path}: invalid JSON: the list is not closed")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}: not UTF-8 text: {error}") from error
    if not spans:
        raise DataError(f"{path}: the dataset is empty")
    return np.array(spans, dtype=np.int64)
