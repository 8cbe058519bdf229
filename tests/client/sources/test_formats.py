"""Every format reader gives the same rows, lazily, with its own errors named; detection picks the reader."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedcmp.client.sources import FORMATS, BadSample, Columns, DataError, detect_format, open_source
from fedcmp.client.sources import json_records
from fedcmp.client.sources.images import load_rgb
from tests.client.conftest import scene, write_dataset

COLUMNS = {"parquet": Columns(id="key", image="jpg", caption="txt")}
COUNT = 6


def _open(path: Path, format: str = "auto"):
    return open_source(path, format, columns=COLUMNS.get(detect_format(path), Columns()))


@pytest.mark.parametrize("format", FORMATS)
def test_each_format_reads_the_same_rows(format: str, tmp_path: Path) -> None:
    data = write_dataset(tmp_path / format, format, COUNT)
    assert detect_format(data) == format
    source = _open(data)
    assert (source.format, len(source)) == (format, COUNT)
    for row in (4, 0, 5):  # random access
        entry = source.entry(row)
        caption, picture = scene(row)
        assert (entry.id, entry.caption) == (f"scene-{row:05d}", caption)
        decoded = load_rgb(source.image(row), "test")
        assert np.array_equal(np.asarray(decoded), np.asarray(picture))
    clone = pickle.loads(pickle.dumps(source))  # as DataLoader workers receive it
    assert clone.entry(3) == source.entry(3)


def test_json_list_scan_survives_chunk_boundaries_and_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"id": f"é{index}", "image": "x.png", "caption": "naïve café " * index + "ok"} for index in range(1, 30)]
    (tmp_path / "chat.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    monkeypatch.setattr(json_records, "READ_CHUNK_CHARS", 37)  # records straddle many buffer refills
    source = open_source(tmp_path / "chat.json")
    assert [source.entry(row).id for row in range(len(source))] == [record["id"] for record in records]
    assert source.entry(28).caption == records[28]["caption"]


def test_jsonl_bad_line_is_one_bad_sample(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "jsonl", "jsonl", 3)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0], "{broken", "", lines[2]]) + "\n")
    source = open_source(data)
    assert len(source) == 3  # the blank line is not a record
    with pytest.raises(BadSample, match="data.jsonl record 1: invalid JSON"):
        source.entry(1)
    assert source.entry(2).id == "scene-00002"


def test_parquet_columns_are_checked(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "parquet", "parquet", 4)
    with pytest.raises(DataError, match=r"no column 'image', 'caption'; columns are jpg, key, txt"):
        open_source(data)


def test_parquet_image_paths_resolve_against_the_folder(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    caption, picture = scene(1)
    picture.save(tmp_path / "one.png")
    pq.write_table(pa.table({"image": ["one.png"], "caption": [caption]}), tmp_path / "data.parquet")
    source = open_source(tmp_path / "data.parquet")
    assert source.entry(0).id == "0" and source.image(0) == tmp_path / "one.png"  # no id column: the row number


def test_webdataset_sample_without_caption_or_image(tmp_path: Path) -> None:
    import tarfile

    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in (("a.png", b"x"), ("b.txt", b"a caption"), ("c.png", b"x"), ("c.txt", b"  ")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = open_source(tmp_path / "shard.tar")
    assert len(source) == 3
    for row, problem in ((0, "no caption member"), (1, "no image member"), (2, "empty caption")):
        with pytest.raises(BadSample, match=problem):
            source.entry(row)


def test_compressed_shards_and_unknown_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "shard.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match="decompress them"):
        open_source(tmp_path / "shard.tar.gz")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown data format"):
        open_source(tmp_path / "data.csv")
    (tmp_path / "broken.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(DataError, match="not an uncompressed tar shard"):
        open_source(tmp_path / "broken.tar")


def test_hf_datasets_dict_uses_train(tmp_path: Path) -> None:
    import datasets

    caption, picture = scene(2)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    split = datasets.Dataset.from_dict({"caption": [caption], "image": [{"bytes": buffer.getvalue(), "path": None}]})
    datasets.DatasetDict({"train": split.cast_column("image", datasets.Image()),
                          "test": split}).save_to_disk(str(tmp_path / "dd"))
    source = open_source(tmp_path / "dd")
    assert source.format == "hf-datasets" and source.entry(0).caption == caption
    assert isinstance(load_rgb(source.image(0), "t"), Image.Image)
