"""The LLaVA-format loader: good data, every malformed-entry case, and the train/val split."""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedcmp.client.data import CaptionExample, DataError, load_llava_json, split_train_val


def test_loads_folder_and_file(llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(5)
    from_folder = load_llava_json(folder)
    assert from_folder == load_llava_json(folder / "chat.json")
    assert [example.id for example in from_folder] == [f"scene-{index:05d}" for index in range(5)]
    first = from_folder[0]
    assert first.image_path == folder / "images" / "00000.png" and first.image_path.is_file()
    assert first.caption == "a small red square on black"


def test_image_folder_override(llava_folder: Callable[[int], Path], tmp_path: Path) -> None:
    folder = llava_folder(3)
    moved = tmp_path / "elsewhere"
    (folder / "images").rename(moved)
    with pytest.raises(DataError, match="image file not found"):
        load_llava_json(folder)
    assert load_llava_json(folder, image_folder=moved)[2].image_path == moved / "00002.png"


def test_integer_ids_become_strings(llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(2)
    entries = json.loads((folder / "chat.json").read_text())
    entries[0]["id"], entries[1]["id"] = 7, 8
    (folder / "chat.json").write_text(json.dumps(entries))
    assert [example.id for example in load_llava_json(folder)] == ["7", "8"]


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda entry: entry.__setitem__(key, value)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda entry: entry.pop(key)


def _set_turn(turn: int, value: Any) -> Callable[[dict], None]:
    return lambda entry: entry["conversations"][turn].__setitem__("value", value)


MALFORMED: dict[str, tuple[Callable[[dict], None], str]] = {
    "missing image": (_drop("image"), "missing or invalid 'image'"),
    "image not a string": (_set("image", 3), "missing or invalid 'image'"),
    "missing conversations": (_drop("conversations"), "missing or invalid 'conversations'"),
    "conversations not a list": (_set("conversations", "hi"), "missing or invalid 'conversations'"),
    "no <image> in human turn": (_set_turn(0, "Describe the image."), "no human turn containing <image>"),
    "no human turn": (lambda entry: entry["conversations"].pop(0), "no human turn containing <image>"),
    "no gpt turn": (lambda entry: entry["conversations"].pop(1), "no gpt turn"),
    "empty caption": (_set_turn(1, "   "), "empty caption"),
    "caption with <image>": (_set_turn(1, "a <image> caption"), "caption contains <image>"),
    "missing image file": (_set("image", "nope.png"), "image file not found"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_entry_is_named(case: str, llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(3)
    entries = json.loads((folder / "chat.json").read_text())
    mutate, problem = MALFORMED[case]
    mutate(entries[1])
    (folder / "chat.json").write_text(json.dumps(entries))
    with pytest.raises(DataError) as error:
        load_llava_json(folder)
    message = str(error.value)
    assert str(folder / "chat.json") in message
    assert "entry 1 (id 'scene-00001')" in message
    assert problem in message


@pytest.mark.parametrize(
    ("bad_entry", "problem"),
    [([1, 2], "entry 1: expected an object, got list"), ({"image": "x.png"}, "entry 1: missing or invalid 'id'")],
)
def test_entry_without_identity_is_named_by_index(
    bad_entry: Any, problem: str, llava_folder: Callable[[int], Path]
) -> None:
    folder = llava_folder(2)
    entries = json.loads((folder / "chat.json").read_text())
    entries[1] = bad_entry
    (folder / "chat.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=problem):
        load_llava_json(folder)


def test_duplicate_ids(llava_folder: Callable[[int], Path]) -> None:
    folder = llava_folder(3)
    entries = json.loads((folder / "chat.json").read_text())
    entries[2]["id"] = entries[0]["id"]
    (folder / "chat.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 2 \(id 'scene-00000'\): duplicate id \(first in entry 0\)"):
        load_llava_json(folder)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[{", "invalid JSON"),
        ('{"a": 1}', "expected a JSON list of examples, got dict"),
        ("[]", "the dataset is empty"),
    ],
)
def test_bad_file(text: str, problem: str, tmp_path: Path) -> None:
    (tmp_path / "chat.json").write_text(text)
    with pytest.raises(DataError, match=problem):
        load_llava_json(tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        load_llava_json(tmp_path)


def _examples(count: int) -> list[CaptionExample]:
    return [CaptionExample(f"ex{index}", Path(f"{index}.png"), f"c{index}") for index in range(count)]


def test_split_is_deterministic_partition_independent_of_order() -> None:
    examples = _examples(50)
    train, val = split_train_val(examples, 0.2, seed=3)
    assert len(val) == 10 and len(train) == 40
    assert sorted(example.id for example in train + val) == sorted(example.id for example in examples)
    assert train == [example for example in examples if example in train]  # input order kept
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    train_shuffled, val_shuffled = split_train_val(shuffled, 0.2, seed=3)
    assert {example.id for example in val_shuffled} == {example.id for example in val}
    assert {example.id for example in split_train_val(examples, 0.2, seed=4)[1]} != {example.id for example in val}


@pytest.mark.parametrize(("count", "fraction", "num_val"), [(2, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0)])
def test_split_sizes(count: int, fraction: float, num_val: int) -> None:
    train, val = split_train_val(_examples(count), fraction, seed=0)
    assert len(val) == num_val and len(train) == count - num_val
