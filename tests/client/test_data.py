"""Scanning a site's data: the LLaVA JSON layout, every malformed-entry case, the bad-sample policy and cap,
and the train/val split."""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedcmp.client.data import DataError, DataOptions, scan_data, split_train_val

LENIENT = DataOptions(max_bad_fraction=1.0)


def test_scans_folder_and_file(llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(5)
    scanned = scan_data(folder)
    assert scanned.ids == scan_data(folder / "chat.json").ids == [f"scene-{index:05d}" for index in range(5)]
    assert scanned.rows.tolist() == [0, 1, 2, 3, 4] and not scanned.bad.rows
    assert scanned.captions[0] == "a small red square on black"
    assert scanned.source.image(0) == folder / "images" / "00000.png"


def test_image_folder_override(llava_folder: Callable[[int], Path], tmp_path: Path) -> None:
    folder = llava_folder(3)
    moved = tmp_path / "elsewhere"
    (folder / "images").rename(moved)
    with pytest.raises(DataError, match="3 of 3 samples are bad.*image file not found"):
        scan_data(folder)
    assert scan_data(folder, DataOptions(image_folder=moved)).source.image(2) == moved / "00002.png"


def test_integer_ids_become_strings(llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(2)
    entries = json.loads((folder / "chat.json").read_text())
    entries[0]["id"], entries[1]["id"] = 7, 8
    (folder / "chat.json").write_text(json.dumps(entries))
    assert scan_data(folder).ids == ["7", "8"]


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda entry: entry.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda entry: entry.pop(key)


def _set_turn(turn: int, value: Any) -> Callable[[dict], None]:
    return lambda entry: entry["conversations"][turn].__setitem__("value", value)


MALFORMED: dict[str, tuple[Callable[[dict], None], str]] = {
    "missing image": (_drop("image"), "missing or invalid 'image'"),
    "image not a string": (_set("image", 3), "missing or invalid 'image'"),
    "missing conversations": (_drop("conversations"), "missing or invalid 'caption'"),
    "conversations not a list": (_set("conversations", "hi"), "invalid 'conversations'"),
    "no <image> in human turn": (_set_turn(0, "Describe the image."), "no human turn containing <image>"),
    "no human turn": (lambda entry: entry["conversations"].pop(0), "no human turn containing <image>"),
    "no gpt turn": (lambda entry: entry["conversations"].pop(1), "no gpt turn"),
    "empty caption": (_set_turn(1, "   "), "empty caption"),
    "caption with <image>": (_set_turn(1, "a <image> caption"), "caption contains <image>"),
    "missing image file": (_set("image", "nope.png"), "image file not found"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_entry_is_skipped_and_named(case: str, llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(3)
    entries = json.loads((folder / "chat.json").read_text())
    mutate, problem = MALFORMED[case]
    mutate(entries[1])
    (folder / "chat.json").write_text(json.dumps(entries))
    scanned = scan_data(folder, LENIENT)
    assert scanned.ids == ["scene-00000", "scene-00002"] and scanned.rows.tolist() == [0, 2]
    (reason,) = scanned.bad.rows.values()
    assert problem in reason and "scene-00001" in reason
    with pytest.raises(DataError, match="bad sample: .*" + problem.replace("<", ".").replace(">", ".")):
        scan_data(folder, DataOptions(on_bad_sample="fail"))


def test_bad_fraction_cap(llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(10)
    entries = json.loads((folder / "chat.json").read_text())
    entries[4]["conversations"][1]["value"] = ""
    (folder / "chat.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"1 of 10 samples are bad \(10.0%\), more than the 1.0% allowed.*empty caption"):
        scan_data(folder)
    assert len(scan_data(folder, DataOptions(max_bad_fraction=0.1)).ids) == 9


@pytest.mark.parametrize(
    ("bad_entry", "problem"),
    [([1, 2], "entry 1: expected an object, got list"), ({"id": "", "image": "x.png"}, "entry 1: invalid 'id'")],
)
def test_entry_without_identity_is_named_by_index(
    bad_entry: Any, problem: str, llava_folder: Callable[[int], Path]
) -> None:
    folder = llava_folder(2)
    entries = json.loads((folder / "chat.json").read_text())
    entries[1] = bad_entry
    (folder / "chat.json").write_text(json.dumps(entries))
    assert problem in scan_data(folder, LENIENT).bad.rows[1]


def test_duplicate_ids(llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(3)
    entries = json.loads((folder / "chat.json").read_text())
    entries[2]["id"] = entries[0]["id"]
    (folder / "chat.json").write_text(json.dumps(entries))
    assert scan_data(folder, LENIENT).bad.rows == {2: "row 2: duplicate id 'scene-00000' (first in row 0)"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[{", "invalid JSON"),
        ('[{"id": 1} {"id": 2}]', "invalid JSON"),
        ('{"a": 1}', "expected a JSON list of examples"),
        ("[]", "the dataset is empty"),
        ("[1, 2", "the list is not closed"),
    ],
)
def test_bad_file(text: str, problem: str, tmp_path: Path) -> None:
    (tmp_path / "chat.json").write_text(text)
    with pytest.raises(DataError, match=problem):
        scan_data(tmp_path)


def test_missing_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data found"):
        scan_data(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        scan_data(tmp_path / "nope.json")


def test_split_is_deterministic_partition_independent_of_order() -> None:
    ids = [f"ex{index}" for index in range(50)]
    train, val = split_train_val(ids, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(train + val) == list(range(50)) and train == sorted(train) and val == sorted(val)
    shuffled = ids[:]
    random.Random(0).shuffle(shuffled)
    _, val_shuffled = split_train_val(shuffled, 0.2, seed=3)
    assert {shuffled[i] for i in val_shuffled} == {ids[i] for i in val}
    assert set(split_train_val(ids, 0.2, seed=4)[1]) != set(val)


@pytest.mark.parametrize(("count", "fraction", "num_val"), [(2, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0)])
def test_split_sizes(count: int, fraction: float, num_val: int) -> None:
    train, val = split_train_val([f"ex{index}" for index in range(count)], fraction, seed=0)
    assert len(val) == num_val and len(train) == count - num_val
