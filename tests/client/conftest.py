"""Fixtures of the client tests: tiny random backbones, tiny LLaVA-format folders, recipes.

The backbones are random (seeded) CLIP-vision and Llama models saved with `save_pretrained`,
so they load through the same `from_pretrained` path as the micro zoo and real models.
"""
from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedcmp.common.recipe import Recipe

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ["square", "circle", "triangle"]
SIZES = ["small", "big"]
WORDS = ["a", "the", "on", "black", *COLORS, *SHAPES, *SIZES]
IMAGE_SIZE = 32
PATCH_SIZE = 8  # -> 16 patches, 17 tokens with CLS


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's
    spin-waiting makes every op wait for a scheduler tick (~15 ms); restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Backbones:
    vision: Path
    llm: Path


def _tokenizer(with_image_token: bool) -> PreTrainedTokenizerFast:
    specials = SPECIALS if with_image_token else [token for token in SPECIALS if token != "<image>"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    extra = {"additional_special_tokens": ["<image>"]} if with_image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", **extra
    )


def save_tiny_llm(folder: Path, with_image_token: bool = True) -> Path:
    tokenizer = _tokenizer(with_image_token)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_vision(folder: Path) -> Path:
    config = CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    torch.manual_seed(2)
    CLIPVisionModel(config).save_pretrained(folder)
    size = {"shortest_edge": IMAGE_SIZE}
    CLIPImageProcessorPil(size=size, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> Backbones:
    root = tmp_path_factory.mktemp("backbones")
    return Backbones(vision=save_tiny_vision(root / "vision"), llm=save_tiny_llm(root / "llm"))


@pytest.fixture(scope="session")
def llm_without_image_token(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LM whose tokenizer lacks <image>, as most real LMs."""
    return save_tiny_llm(tmp_path_factory.mktemp("llm-without-image"), with_image_token=False)


def scene(index: int) -> tuple[str, Image.Image]:
    """Caption and picture of the index-th synthetic scene (a coloured shape on black)."""
    color = list(COLORS)[index % len(COLORS)]
    shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
    size = SIZES[(index // (len(COLORS) * len(SHAPES))) % len(SIZES)]
    image = Image.new("RGB", (40, 40), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    extent = (12, 12, 28, 28) if size == "small" else (4, 4, 36, 36)
    if shape == "square":
        draw.rectangle(extent, fill=COLORS[color])
    elif shape == "circle":
        draw.ellipse(extent, fill=COLORS[color])
    else:
        left, top, right, bottom = extent
        draw.polygon([(left, bottom), (right, bottom), ((left + right) // 2, top)], fill=COLORS[color])
    return f"a {size} {color} {shape} on black", image


def write_llava_folder(folder: Path, count: int, start: int = 0) -> Path:
    """A LLaVA pretraining-format folder: `chat.json` + `images/`, scenes start .. start + count - 1."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for index in range(start, start + count):
        caption, image = scene(index)
        image.save(folder / "images" / f"{index:05d}.png")
        entries.append(
            {
                "id": f"scene-{index:05d}",
                "image": f"{index:05d}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    (folder / "chat.json").write_text(json.dumps(entries, indent=1))
    return folder


@pytest.fixture
def llava_folder(tmp_path: Path) -> Callable[[int], Path]:
    """Factory: a fresh LLaVA-format folder with `count` scenes."""

    def make(count: int, start: int = 0) -> Path:
        return write_llava_folder(tmp_path / f"data-{start}-{count}", count, start)

    return make


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared, read-only LLaVA-format folder with 16 scenes."""
    return write_llava_folder(tmp_path_factory.mktemp("scenes"), 16)


@pytest.fixture(scope="session")
def make_recipe(backbones: Backbones) -> Callable[..., Recipe]:
    """Factory: a recipe on the tiny backbones, small batches; keyword overrides on top."""

    def make(**overrides: object) -> Recipe:
        fields = {
            "vision_model": str(backbones.vision),
            "llm": str(backbones.llm),
            "batch_size": 4,
            "lr": 1e-2,
            "val_fraction": 0.25,
            "max_caption_tokens": 12,
            "seed": 0,
        }
        return Recipe(**(fields | overrides))

    return make


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(folder: Path, format: str, count: int) -> Path:
    """Scenes 0 .. count - 1 (ids, captions and pixels as `write_llava_folder`) in `format`; returns --data."""
    if format == "llava-json":
        return write_llava_folder(folder, count)
    folder.mkdir(parents=True)
    records = [(f"scene-{index:05d}", *scene(index)) for index in range(count)]
    if format == "jsonl":
        (folder / "images").mkdir()
        lines = []
        for example_id, caption, image in records:
            image.save(folder / "images" / f"{example_id}.png")
            lines.append(json.dumps({"id": example_id, "image": f"images/{example_id}.png", "caption": caption}))
        (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
        return folder / "data.jsonl"
    if format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        half = count // 2
        for part, chunk in enumerate((records[:half], records[half:])):  # two files of several row groups
            table = pa.table({"key": [r[0] for r in chunk], "jpg": [png_bytes(r[2]) for r in chunk],
                              "txt": [r[1] for r in chunk]})
            pq.write_table(table, folder / f"part-{part}.parquet", row_group_size=3)
        return folder
    if format == "webdataset":
        half = count // 2
        for part, chunk in enumerate((records[:half], records[half:])):
            with tarfile.open(folder / f"shard-{part:04d}.tar", "w") as tar:
                for position, (example_id, caption, image) in enumerate(chunk):
                    text = json.dumps({"caption": caption}) if position % 2 else caption
                    for name, data in ((f"{example_id}.png", png_bytes(image)),
                                       (f"{example_id}.{'json' if position % 2 else 'txt'}", text.encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        return folder
    if format == "hf-datasets":
        import datasets

        dataset = datasets.Dataset.from_dict({"id": [r[0] for r in records], "caption": [r[1] for r in records],
                                              "image": [{"bytes": png_bytes(r[2]), "path": None} for r in records]})
        dataset.cast_column("image", datasets.Image()).save_to_disk(str(folder))
        return folder
    raise ValueError(format)
