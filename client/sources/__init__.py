"""A site's data in the formats sites keep, behind one `open_source` that detects the format.

Formats: LLaVA's JSON list (`chat.json` + `images/`), JSON Lines, Parquet, WebDataset tar
shards and a Hugging Face `datasets` folder written by `save_to_disk`. Each reader is lazy: see
`fedcmp.client.sources.base` for the `Source` interface they share.
"""
from __future__ import annotations

from pathlib import Path

from fedcmp.client.sources.base import BadSample, Columns, DataError, Entry, Source
from fedcmp.client.sources.json_records import DEFAULT_JSON_NAME, open_json_lines, open_llava_json

FORMATS = ("llava-json", "jsonl", "parquet", "webdataset", "hf-datasets")

__all__ = ["FORMATS", "BadSample", "Columns", "DataError", "Entry", "Source", "detect_format", "open_source"]


def detect_format(path: Path) -> str:
    """The format of `path` from its name or, for a folder, from what it holds."""
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_file():
        name = path.name.lower()
        by_suffix = {".json": "llava-json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
                     ".tar": "webdataset"}
        for suffix, format in by_suffix.items():
            if name.endswith(suffix):
                return format
        if name.endswith((".tar.gz", ".tgz")):
            raise DataError(f"{path}: compressed tar shards cannot be read row by row; decompress them to .tar")
        raise DataError(f"{path}: unknown data format (expected .json, .jsonl, .parquet or .tar)")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "hf-datasets"
    if (path / DEFAULT_JSON_NAME).is_file():
        return "llava-json"
    for pattern, format in (("*.parquet", "parquet"), ("*.tar", "webdataset")):
        if any(path.glob(pattern)):
            return format
    raise DataError(f"{path}: no data found (expected {DEFAULT_JSON_NAME}, *.parquet, *.tar shards or a "
                    f"`datasets` folder saved with save_to_disk)")


def open_source(path: Path, format: str = "auto", image_folder: Path | None = None,
                columns: Columns = Columns()) -> Source:
    """The site's data at `path`, in `format` ("auto": detected)."""
    path = Path(path)
    format = detect_format(path) if format == "auto" else format
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if format == "llava-json":
        return open_llava_json(path, image_folder, columns)
    if format == "jsonl":
        return open_json_lines(path, image_folder, columns)
    if format == "parquet":
        from fedcmp.client.sources.parquet import ParquetSource  # pyarrow is an optional dependency

        return ParquetSource(path, image_folder, columns)
    if format == "webdataset":
        from fedcmp.client.sources.webdataset import WebDatasetSource

        return WebDatasetSource(path, columns)
    if format == "hf-datasets":
        from fedcmp.client.sources.hf_dataset import HfDatasetSource  # datasets is an optional dependency

        return HfDatasetSource(path, image_folder, columns)
    raise DataError(f"unknown data format {format!r}; known: {', '.join(FORMATS)}")
