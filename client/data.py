"""A client's private data: LLaVA pretraining-format captions, validated, and its train/val split.

The format is LLaVA's `blip_laion_cc_sbu_558k.json` layout: a JSON list of
`{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": caption}]}`
with `image` relative to an image folder (by default `images/` beside the JSON file). Every
problem is reported as a `DataError` naming the file, the entry (index and id) and what is wrong.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

IMAGE_TOKEN = "<image>"
DEFAULT_JSON_NAME = "chat.json"
DEFAULT_IMAGE_FOLDER = "images"


class DataError(ValueError):
    """Client data that cannot be used; the message names the file, the entry and the problem."""


@dataclass(frozen=True)
class CaptionExample:
    id: str
    image_path: Path
    caption: str


def load_llava_json(path: Path, image_folder: Path | None = None) -> list[CaptionExample]:
    """Read and validate a LLaVA pretraining-format file (or a folder holding `chat.json`)."""
    json_path = Path(path)
    if json_path.is_dir():
        json_path = json_path / DEFAULT_JSON_NAME
    images = Path(image_folder) if image_folder is not None else json_path.parent / DEFAULT_IMAGE_FOLDER

    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DataError(f"{json_path}: cannot read: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise DataError(f"{json_path}: not UTF-8 text: {error}") from error
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise DataError(f"{json_path}: invalid JSON: {error.msg} at {where}") from error
    if not isinstance(entries, list):
        raise DataError(f"{json_path}: expected a JSON list of examples, got {type(entries).__name__}")
    if not entries:
        raise DataError(f"{json_path}: the dataset is empty")

    examples: list[CaptionExample] = []
    first_index_of: dict[str, int] = {}
    for index, entry in enumerate(entries):
        example = _parse_entry(entry, index, json_path, images)
        if example.id in first_index_of:
            first = first_index_of[example.id]
            raise DataError(f"{json_path}: entry {index} (id {example.id!r}): duplicate id (first in entry {first})")
        first_index_of[example.id] = index
        examples.append(example)
    return examples


def _parse_entry(entry: Any, index: int, json_path: Path, images: Path) -> CaptionExample:
    if not isinstance(entry, dict):
        raise DataError(f"{json_path}: entry {index}: expected an object, got {type(entry).__name__}")
    raw_id = entry.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
        raise DataError(f"{json_path}: entry {index}: missing or invalid 'id' (a non-empty string or integer)")
    example_id = str(raw_id)

    def fail(problem: str) -> DataError:
        return DataError(f"{json_path}: entry {index} (id {example_id!r}): {problem}")

    image = entry.get("image")
    if not isinstance(image, str) or not image:
        raise fail("missing or invalid 'image' (a path relative to the image folder)")
    conversations = entry.get("conversations")
    if not isinstance(conversations, list):
        raise fail("missing or invalid 'conversations' (a list of turns)")
    turns = [turn for turn in conversations if isinstance(turn, dict) and isinstance(turn.get("value"), str)]
    if not any(turn.get("from") == "human" and IMAGE_TOKEN in turn["value"] for turn in turns):
        raise fail(f"no human turn containing {IMAGE_TOKEN}")
    gpt_turns = [turn for turn in turns if turn.get("from") == "gpt"]
    if not gpt_turns:
        raise fail("no gpt turn (the caption)")
    caption = gpt_turns[0]["value"].strip()
    if not caption:
        raise fail("empty caption")
    if IMAGE_TOKEN in caption:
        raise fail(f"the caption contains {IMAGE_TOKEN}")
    image_path = images / image
    if not image_path.is_file():
        raise fail(f"image file not found: {image_path}")
    return CaptionExample(id=example_id, image_path=image_path, caption=caption)


def split_train_val(
    examples: Sequence[CaptionExample], val_fraction: float, seed: int
) -> tuple[list[CaptionExample], list[CaptionExample]]:
    """Deterministic train/val split: the examples with the smallest hash(seed, id) go to val.

    Membership depends only on (seed, ids), not on list order; each split keeps the input order.
    With `val_fraction > 0` and at least two examples, val holds round(val_fraction * n) examples,
    at least one, and train is never empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = len(examples)
    num_val = 0
    if val_fraction > 0 and count >= 2:
        num_val = min(max(1, round(val_fraction * count)), count - 1)
    by_hash = sorted(examples, key=lambda example: (_split_hash(seed, example.id), example.id))
    val_ids = {example.id for example in by_hash[:num_val]}
    train = [example for example in examples if example.id not in val_ids]
    val = [example for example in examples if example.id in val_ids]
    return train, val


def _split_hash(seed: int, example_id: str) -> bytes:
    return hashlib.sha256(f"fedcmp-split:{seed}:{example_id}".encode()).digest()
