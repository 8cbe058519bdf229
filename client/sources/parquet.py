"""Parquet files (one file or a folder of `*.parquet`), read one row group at a time with pyarrow.

Columns are configurable (`Columns`: id, image, caption; the id is optional). The image column
may hold the encoded bytes, a path (relative to the image folder, by default the data folder),
or a `{"bytes", "path"}` struct as Hugging Face `datasets` writes images. Only the row group
holding the requested row is in memory (one group cached per process): random access
reads a whole group, so for training without the feature cache keep row groups small.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fedcmp.client.sources.base import BadSample, Columns, DataError, Entry, file_stamp, image_cell, parse_record


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DataError("reading Parquet needs pyarrow: pip install 'fedcmp[formats]'") from error
    return pq


class ParquetSource:
    format = "parquet"

    def __init__(self, path: Path, image_folder: Path | None, columns: Columns) -> None:
        pq = _pyarrow_parquet()
        self.location = path
        self.files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
        if not self.files:
            raise DataError(f"{path}: no *.parquet files")
        self.columns = columns
        self.image_folder = image_folder if image_folder is not None else (path if path.is_dir() else path.parent)
        groups = []  # (file index, row group, rows)
        for file_index, file in enumerate(self.files):
            try:
                metadata = pq.ParquetFile(file)
            except Exception as error:  # pyarrow raises ArrowInvalid / OSError on a damaged file
                raise DataError(f"{file}: not a readable Parquet file: {error}") from error
            names = set(metadata.schema_arrow.names)
            missing = [name for name in (columns.image, columns.caption) if name not in names]
            if missing:
                raise DataError(f"{file}: no column {', '.join(map(repr, missing))}; columns are "
                                f"{', '.join(sorted(names))} (choose with --image-column / --caption-column)")
            self.read_columns = [name for name in (columns.id, columns.image, columns.caption) if name in names]
            groups += [(file_index, group, metadata.metadata.row_group(group).num_rows)
                       for group in range(metadata.num_row_groups)]
        self.groups = np.array([(f, g) for f, g, _ in groups], dtype=np.int64).reshape(-1, 2)  # [G, 2]
        self.group_ends = np.cumsum([rows for _, _, rows in groups], dtype=np.int64)  # [G]
        if len(self) == 0:
            raise DataError(f"{path}: the dataset is empty")
        self._cached: tuple[int, int, list[dict]] | None = None  # (pid, group, rows)

    def __len__(self) -> int:
        return int(self.group_ends[-1]) if len(self.group_ends) else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cached": None}

    def _record(self, row: int) -> dict:
        group = int(np.searchsorted(self.group_ends, row, side="right"))
        if self._cached is None or self._cached[:2] != (os.getpid(), group):
            file_index, group_in_file = (int(value) for value in self.groups[group])
            table = _pyarrow_parquet().ParquetFile(self.files[file_index]).read_row_group(
                group_in_file, columns=self.read_columns)
            self._cached = (os.getpid(), group, table.to_pylist())
        first = int(self.group_ends[group - 1]) if group else 0
        return self._cached[2][row - first]

    def _where(self, row: int) -> str:
        return f"{self.location.name} row {row}"

    def entry(self, row: int) -> Entry:
        return parse_record(self._record(row), self.columns, row, self.image_folder, self._where(row))

    def image(self, row: int) -> Path | bytes:
        record = self._record(row)
        entry = parse_record(record, self.columns, row, self.image_folder, self._where(row))
        return image_cell(record[self.columns.image], entry, self._where(row))

    def stamp(self) -> str:
        return file_stamp(self.files)
