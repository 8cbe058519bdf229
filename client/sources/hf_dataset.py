"""A Hugging Face `datasets` folder written by `save_to_disk`, opened memory-mapped with `datasets`.

`load_from_disk` maps the Arrow files, so rows are read on demand and the data never enters
anonymous memory. A `DatasetDict` folder contributes its `train` split (or its only split).
Image columns of type `Image` are read undecoded (`{"bytes", "path"}`); columns are
configurable as for Parquet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fedcmp.client.sources.base import Columns, DataError, Entry, file_stamp, image_cell, parse_record


class HfDatasetSource:
    format = "hf-datasets"

    def __init__(self, path: Path, image_folder: Path | None, columns: Columns) -> None:
        try:
            import datasets
        except ImportError as error:
            raise DataError("reading a `datasets` folder needs datasets: pip install 'fedcmp[formats]'") from error
        self.location = path
        self.columns = columns
        self.image_folder = image_folder if image_folder is not None else path
        try:
            loaded: Any = datasets.load_from_disk(str(path))
        except Exception as error:  # datasets raises FileNotFoundError / ValueError on damaged folders
            raise DataError(f"{path}: not a readable `datasets` folder: {error}") from error
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if "train" not in loaded and len(splits) != 1:
                raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)} and none named 'train'")
            loaded = loaded["train" if "train" in loaded else splits[0]]
        missing = [name for name in (columns.image, columns.caption) if name not in loaded.column_names]
        if missing:
            raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; columns are "
                            f"{', '.join(loaded.column_names)} (choose with --image-column / --caption-column)")
        if isinstance(loaded.features[columns.image], datasets.Image):
            loaded = loaded.cast_column(columns.image, datasets.Image(decode=False))
        self.dataset = loaded
        if len(self) == 0:
            raise DataError(f"{path}: the dataset is empty")

    def __len__(self) -> int:
        return len(self.dataset)

    def _where(self, row: int) -> str:
        return f"{self.location.name} row {row}"

    def entry(self, row: int) -> Entry:
        return parse_record(self.dataset[row], self.columns, row, self.image_folder, self._where(row))

    def image(self, row: int) -> Path | bytes:
        record = self.dataset[row]
        entry = parse_record(record, self.columns, row, self.image_folder, self._where(row))
        return image_cell(record[self.columns.image], entry, self._where(row))

    def stamp(self) -> str:
        return file_stamp([Path(item["filename"]) for item in self.dataset.cache_files])
