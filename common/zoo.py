"""The ``micro`` model zoo: a tiny CLIP vision tower and a tiny Llama LM, pretrained here.

Both backbones are pretrained offline, deterministically, on the project's synthetic scenes
and captions (``fedcmp.common.synthetic``), with other seeds and other handwritten digits than
the federated datasets use, and saved with ``save_pretrained`` so that they load through the
same ``from_pretrained`` path as real checkpoints:

    <cache>/micro-v{ZOO_VERSION}/vision/   CLIPVisionModel + CLIPImageProcessor (32x32, mean = std = 0.5)
    <cache>/micro-v{ZOO_VERSION}/llm/      LlamaForCausalLM + tokenizer (byte-level BPE, no unknown token)
    <cache>/micro-v{ZOO_VERSION}/zoo.json  manifest: version, seeds, configs, pretraining metrics, weight hashes

Each version has its own directory, so processes running different versions of fedcmp can share
one cache without rebuilding each other's zoo.

Vision tower: supervised attribute heads (domain, category, colour, position, size, texture)
on the mean patch token of the last two layers, plus a per-patch head (which colour of object,
or background, covers this patch) so that LLaVA's default features — the patch tokens of the
penultimate layer — carry colour, shape and position.

LM: a causal LM over captions, with a byte-level BPE tokenizer trained on the caption language
(every text is representable: there is no unknown token; corpus words are single tokens). Each
training sequence follows LLaVA's ``plain`` template, ``<s> prefix caption \n`` with the caption
and separator supervised, where the prefix (0-16 input embeddings, where LLaVA puts the image)
holds random vectors or, for half the rows, the noisy embeddings of the scene's attribute words
among random vectors. The
LM thus tolerates a prefix of foreign embeddings and has learnt to read one: a projector can
steer it, but only images tell *which* caption is right, which is what federated training
of the projector has to learn.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import Tensor, nn
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedcmp.common import synthetic as syn

log = logging.getLogger(__name__)

ZOO_VERSION = 2  # bump when anything below changes the built models; each version has its own directory
ZOO_DIRECTORY = f"micro-v{ZOO_VERSION}"  # under the cache dir
ZOO_STREAM = 0x200  # numpy seed-sequence prefix of all zoo data (datagen uses another one)
VISION_SEED = 0
LM_SEED = 1
IMAGE_SIZE = 32
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
MAX_PREFIX = 16  # longest embedding prefix the LM sees in pretraining (= patches per image)
SEPARATOR = "\n"  # LLaVA's `plain` template ends every caption with it (fedcmp.client.template)
TOKENIZER_VOCAB = 512  # upper bound: BPE merges stop once every corpus word is one token
TOKENIZER_SPECIALS: tuple[str, ...] = (syn.PAD, syn.BOS, syn.EOS, syn.IMAGE)  # no <unk>: bytes cover all

VISION_CONFIG = dict(
    image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=256,
    num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
)  # fmt: skip
LM_CONFIG = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
)  # fmt: skip
VISION_STEPS, VISION_BATCH, VISION_LR = 1000, 128, 4e-3
LM_STEPS, LM_BATCH, LM_LR = 600, 64, 4e-3
# One thread: these models are too small to gain much from two, and on a busy 2-core machine
# two OpenMP threads spin-waiting on each other ran 15-30x slower than one (measured).
BUILD_THREADS = 1


def default_cache_dir() -> Path:
    """``$FEDCMP_CACHE`` if set, else ``~/.cache/fedcmp`` (read at call time)."""
    return Path(os.environ.get("FEDCMP_CACHE") or Path.home() / ".cache" / "fedcmp").expanduser()


DEFAULT_CACHE_DIR: Path = default_cache_dir()


@dataclass(frozen=True)
class MicroZoo:
    """Where a built micro zoo lives."""

    root: Path
    vision_path: Path
    llm_path: Path

    @classmethod
    def at(cls, root: Path) -> MicroZoo:
        return cls(root=root, vision_path=root / "vision", llm_path=root / "llm")

    def manifest(self) -> dict:
        return json.loads((self.root / "zoo.json").read_text())


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by the tests to measure the zoo)
# ---------------------------------------------------------------------------------------------


def zoo_rng(*stream: int) -> np.random.Generator:
    """A numpy generator on the zoo's own seed streams (never those of the federated data)."""
    return np.random.default_rng([ZOO_STREAM, *stream])


def pixel_values(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float, normalised as the saved image processor does."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def attribute_labels(scenes: Sequence[syn.Scene]) -> dict[str, np.ndarray]:
    """Integer class labels (N,) of each scene attribute the vision tower is taught."""
    return {
        "domain": np.array([syn.DOMAINS.index(s.domain) for s in scenes]),
        "category": np.array([syn.CATEGORIES.index(s.category) for s in scenes]),
        "colour": np.array([list(syn.COLOURS).index(s.colour) for s in scenes]),
        "position": np.array([syn.POSITIONS.index(s.position) for s in scenes]),
        "size": np.array([syn.SIZES.index(s.size) for s in scenes]),
        "texture": np.array([0 if s.texture is None else 1 + syn.TEXTURES.index(s.texture) for s in scenes]),
    }


ATTRIBUTE_CLASSES = {
    "domain": len(syn.DOMAINS), "category": len(syn.CATEGORIES), "colour": len(syn.COLOURS),
    "position": len(syn.POSITIONS), "size": len(syn.SIZES), "texture": 1 + len(syn.TEXTURES),
}  # fmt: skip


def scene_batch(
    rng: np.random.Generator, n: int, image_size: int = IMAGE_SIZE
) -> tuple[list[syn.Scene], np.ndarray, np.ndarray]:
    """n zoo scenes with their images (n, H, W, 3) uint8 and coverages (n, H, W) float32."""
    scenes = [syn.sample_scene(rng, digit_pool="zoo") for _ in range(n)]
    rendered = [syn.render_with_mask(s, image_size) for s in scenes]
    return scenes, np.stack([r[0] for r in rendered]), np.stack([r[1] for r in rendered])


@torch.no_grad()
def vision_features(model: CLIPVisionModel, images: np.ndarray, layer: int = -2, batch_size: int = 256) -> Tensor:
    """Mean patch token (N, hidden) of hidden layer ``layer`` (LLaVA's default is -2)."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        hidden = model(pixel_values=pixel_values(images[i : i + batch_size]), output_hidden_states=True).hidden_states
        out.append(hidden[layer][:, 1:, :].mean(dim=1))  # (B, 1 + P, D) -> drop CLS -> (B, D)
    return torch.cat(out)


def linear_readout(features: Tensor, labels: dict[str, np.ndarray], n_train: int) -> dict[str, float]:
    """Test accuracy of a logistic-regression readout of each attribute from frozen features
    (first ``n_train`` rows train it, the rest test it)."""
    x = features.numpy()
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    accuracy = {}
    with threadpool_limits(1):  # tiny problems; BLAS threads only contend on a busy machine
        for name, y in labels.items():
            clf = LogisticRegression(max_iter=500).fit(x[:n_train], y[:n_train])
            accuracy[name] = float(clf.score(x[n_train:], y[n_train:]))
    return accuracy


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on every caption of the synthetic language; ``<s>`` is prepended (as
    Llama's). Words are split GPT-2 style with a leading space, the first one included, so a word
    is the same token wherever it stands."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in TOKENIZER_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted({text for *_, text in syn.all_scene_captions()}), trainer)
    bos_id = tok.token_to_id(syn.BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{syn.BOS} $A", pair=f"{syn.BOS} $A {syn.BOS} $B", special_tokens=[(syn.BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=syn.BOS,
        eos_token=syn.EOS,
        pad_token=syn.PAD,
        extra_special_tokens={"image_token": syn.IMAGE},
        model_max_length=LM_CONFIG["max_position_embeddings"],
    )


def max_caption_tokens(tokenizer: PreTrainedTokenizerFast) -> int:
    """Supervised tokens (caption + separator) of the longest caption of the synthetic language."""
    texts = sorted({text + SEPARATOR for *_, text in syn.all_scene_captions()})
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run a block on ``n`` intra-op CPU threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Vision tower
# ---------------------------------------------------------------------------------------------


class _VisionHeads(nn.Module):
    """Pretraining heads (discarded after pretraining) on the last two hidden layers."""

    LAYERS = (-2, -1)

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.pooled = nn.ModuleList(
            nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in ATTRIBUTE_CLASSES.items()})
            for _ in self.LAYERS
        )
        # per patch: background (0) or the colour of the object covering it (1..C)
        self.patch = nn.ModuleList(nn.Linear(hidden, 1 + len(syn.COLOURS)) for _ in self.LAYERS)

    def loss(
        self, hidden_states: tuple[Tensor, ...], labels: dict[str, Tensor], patch_labels: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """hidden_states: each (B, 1 + P, D); labels: each (B,); patch_labels (B, P).
        Returns the summed loss and the last layer's pooled logits per attribute."""
        total = torch.zeros(())
        logits_last: dict[str, Tensor] = {}
        for pooled_heads, patch_head, layer in zip(self.pooled, self.patch, self.LAYERS):
            patches = hidden_states[layer][:, 1:, :]  # (B, P, D)
            pooled = patches.mean(dim=1)  # (B, D)
            for name, head in pooled_heads.items():
                logits_last[name] = head(pooled)  # (B, classes)
                total = total + F.cross_entropy(logits_last[name], labels[name])
            patch_logits = patch_head(patches)  # (B, P, 1 + C)
            total = total + F.cross_entropy(patch_logits.flatten(0, 1), patch_labels.flatten())
        return total, logits_last


def _patch_labels(scenes: Sequence[syn.Scene], coverage: np.ndarray, patch: int) -> np.ndarray:
    """(N, H, W) coverage -> (N, P) labels: 1 + colour index where the object covers > 15%."""
    n, h, w = coverage.shape
    per_patch = coverage.reshape(n, h // patch, patch, w // patch, patch).mean(axis=(2, 4)).reshape(n, -1)
    colour = np.array([1 + list(syn.COLOURS).index(s.colour) for s in scenes])
    return np.where(per_patch > 0.15, colour[:, None], 0)


def pretrain_vision(
    seed: int = VISION_SEED, steps: int = VISION_STEPS, n_train: int = 12000, n_eval: int = 1000
) -> tuple[CLIPVisionModel, dict]:
    """Pretrain the micro vision tower; returns it and its held-out head accuracies."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**VISION_CONFIG)
    model = CLIPVisionModel(config)
    heads = _VisionHeads(config.hidden_size)
    scenes, images, coverage = scene_batch(zoo_rng(1, seed), n_train + n_eval)
    x = pixel_values(images)  # (N, 3, H, W)
    labels = {k: torch.from_numpy(v) for k, v in attribute_labels(scenes).items()}
    patch_labels = torch.from_numpy(_patch_labels(scenes, coverage, config.patch_size))  # (N, P)

    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=VISION_LR, weight_decay=0.01)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n_train, (VISION_BATCH,), generator=order)
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, VISION_LR)
        hidden = model(pixel_values=x[idx], output_hidden_states=True).hidden_states
        loss, _ = heads.loss(hidden, {k: v[idx] for k, v in labels.items()}, patch_labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    model.eval()
    with torch.no_grad():
        idx = torch.arange(n_train, n_train + n_eval)
        hidden = model(pixel_values=x[idx], output_hidden_states=True).hidden_states
        loss, logits = heads.loss(hidden, {k: v[idx] for k, v in labels.items()}, patch_labels[idx])
    metrics = {
        "steps": steps,
        "eval_loss": float(loss),
        "head_accuracy": {k: float((lg.argmax(-1) == labels[k][idx]).float().mean()) for k, lg in logits.items()},
    }
    return model, metrics


# ---------------------------------------------------------------------------------------------
# Language model
# ---------------------------------------------------------------------------------------------

PrefixKind = Literal["none", "noise", "tags"]


def caption_batch(rng: np.random.Generator, n: int) -> tuple[list[syn.Scene], list[str]]:
    """n zoo captions of random scenes, each in a uniformly drawn (style, template)."""
    scenes = [syn.sample_scene(rng, digit_pool="zoo") for _ in range(n)]
    picks = rng.integers(len(syn.TEMPLATES), size=n)
    return scenes, [syn.caption(s, *syn.TEMPLATES[p]) for s, p in zip(scenes, picks)]


def _lm_batch(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    scenes: Sequence[syn.Scene],
    captions: Sequence[str],
    prefix_len: int,
    tags_rows: Tensor,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Build ``<s> prefix caption \\n <pad>...`` (LLaVA's ``plain`` template) as input embeddings.

    Prefix rows in ``tags_rows`` (bool (B,)) hold the noisy embeddings of the tokens of the
    scene's tag words (a random subset when the prefix is short) at random slots; every other
    prefix slot is a random vector at the embeddings' scale. Padding is on the right, so causal
    attention needs no mask. Returns inputs_embeds (B, T, D) and labels (B, T) (caption + separator only).
    """
    embed = model.get_input_embeddings()
    enc = tokenizer([c + SEPARATOR for c in captions], add_special_tokens=False, padding=True, return_tensors="pt")
    ids, text_mask = enc["input_ids"], enc["attention_mask"]  # (B, L)
    b, d, k = ids.shape[0], embed.embedding_dim, prefix_len
    scale = embed.weight.detach().std()
    head_ids = torch.full((b, 1), tokenizer.bos_token_id, dtype=torch.long)  # (B, 1)
    prefix = torch.randn(b, k, d, generator=gen) * scale  # (B, K, D)

    words = sorted({word for s in scenes for word in s.tags()})
    # a caption word's ids as it stands inside a caption (one id for every corpus word)
    word_ids = dict(zip(words, tokenizer(words, add_special_tokens=False)["input_ids"]))
    tag_lists = [[t for word in s.tags() for t in word_ids[word]] for s in scenes]
    width = max(len(t) for t in tag_lists)
    tags = torch.tensor([t + [-1] * (width - len(t)) for t in tag_lists])  # (B, W), -1 = none
    order = torch.rand(b, width, generator=gen).masked_fill(tags < 0, 2.0).argsort(dim=1)
    tags = tags.gather(1, order)  # (B, W): each row's tags shuffled to the front
    slots = torch.rand(b, k, generator=gen).argsort(dim=1)  # (B, K): a random slot per tag
    for j in range(min(k, width)):
        rows = torch.nonzero(tags_rows & (tags[:, j] >= 0)).flatten()  # (R,)
        noise = torch.randn(len(rows), d, generator=gen) * 0.3 * scale  # (R, D)
        prefix[rows, slots[rows, j]] = embed(tags[rows, j]) + noise

    inputs = torch.cat([embed(head_ids), prefix, embed(ids)], dim=1)  # (B, T = 1 + K + L, D)
    ignored = torch.full((b, 1 + k), -100, dtype=torch.long)
    labels = torch.cat([ignored, ids.masked_fill(text_mask == 0, -100)], dim=1)  # (B, T)
    return inputs, labels


@torch.no_grad()
def caption_perplexity(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    scenes: Sequence[syn.Scene],
    captions: Sequence[str],
    prefix: PrefixKind,
    seed: int = 0,
) -> float:
    """Per-token perplexity of ``captions`` (+ separator) after ``<s>`` and a 16-slot prefix of
    nothing, random vectors, or the scene's tag embeddings among random vectors."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    nll, count = 0.0, 0
    for i in range(0, len(captions), 256):
        sc, cap = scenes[i : i + 256], captions[i : i + 256]
        tags_rows = torch.full((len(cap),), prefix == "tags")
        k = 0 if prefix == "none" else MAX_PREFIX
        inputs, labels = _lm_batch(model, tokenizer, sc, cap, k, tags_rows, gen)
        logits = model(inputs_embeds=inputs).logits  # (B, T, V)
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"))
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(nll / count)


def pretrain_lm(
    tokenizer: PreTrainedTokenizerFast, seed: int = LM_SEED, steps: int = LM_STEPS, n_eval: int = 1000
) -> tuple[LlamaForCausalLM, dict]:
    """Pretrain the micro LM on zoo captions; returns it and held-out perplexities before/after."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LM_CONFIG,
    )
    model = LlamaForCausalLM(config)
    eval_scenes, eval_captions = caption_batch(zoo_rng(2, seed, 1), n_eval)

    def perplexities() -> dict[str, float]:
        kinds: tuple[PrefixKind, ...] = ("none", "noise", "tags")
        return {p: caption_perplexity(model, tokenizer, eval_scenes, eval_captions, p) for p in kinds}

    before = perplexities()
    rng = zoo_rng(2, seed, 0)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LM_LR, weight_decay=0.01)
    model.train()
    for step in range(steps):
        scenes, captions = caption_batch(rng, LM_BATCH)
        prefix_len = int(rng.integers(0, MAX_PREFIX + 1))
        tags_rows = torch.from_numpy(rng.random(LM_BATCH) < 0.5) & (prefix_len > 0)
        inputs, labels = _lm_batch(model, tokenizer, scenes, captions, prefix_len, tags_rows, gen)
        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(step, steps, LM_LR)
        loss = model(inputs_embeds=inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    metrics = {"steps": steps, "perplexity_before": before, "perplexity_after": perplexities()}
    return model, metrics


# ---------------------------------------------------------------------------------------------
# Build, cache and resolve
# ---------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _readout_metrics(vision: CLIPVisionModel, n_train: int = 1500, n_test: int = 1000) -> dict:
    """Linear readout accuracies from the penultimate layer, pretrained vs. at initialisation."""
    torch.manual_seed(VISION_SEED)
    initial = CLIPVisionModel(CLIPVisionConfig(**VISION_CONFIG))
    scenes, images, _ = scene_batch(zoo_rng(3), n_train + n_test)
    labels = attribute_labels(scenes)
    return {
        "pretrained": linear_readout(vision_features(vision, images), labels, n_train),
        "initial": linear_readout(vision_features(initial, images), labels, n_train),
    }


def _build(root: Path) -> None:
    """Pretrain both backbones and save the zoo into ``root`` (a fresh directory)."""
    started = time.monotonic()
    with _torch_threads(BUILD_THREADS):
        log.info("micro zoo: pretraining the vision tower")
        vision, vision_metrics = pretrain_vision()
        vision_metrics["readout"] = _readout_metrics(vision)
        log.info("micro zoo: pretraining the language model")
        tokenizer = build_tokenizer()
        lm, lm_metrics = pretrain_lm(tokenizer)
    zoo = MicroZoo.at(root)
    vision.save_pretrained(zoo.vision_path)
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": IMAGE_SIZE}, do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD),
    ).save_pretrained(zoo.vision_path)  # fmt: skip
    lm.save_pretrained(zoo.llm_path)
    tokenizer.save_pretrained(zoo.llm_path)
    manifest = {
        "version": ZOO_VERSION,
        "seeds": {"vision": VISION_SEED, "llm": LM_SEED, "stream": ZOO_STREAM},
        "vision": {"config": VISION_CONFIG, "metrics": vision_metrics,
                   "sha256": _sha256(zoo.vision_path / "model.safetensors")},
        "llm": {"config": LM_CONFIG, "vocab_size": len(tokenizer), "metrics": lm_metrics,
                "image_token_id": tokenizer.convert_tokens_to_ids(syn.IMAGE),
                "max_caption_tokens": max_caption_tokens(tokenizer),
                "sha256": _sha256(zoo.llm_path / "model.safetensors")},
        "build_seconds": round(time.monotonic() - started, 1),
    }  # fmt: skip
    (root / "zoo.json").write_text(json.dumps(manifest, indent=2))


def _is_current(zoo: MicroZoo) -> bool:
    try:
        return zoo.manifest().get("version") == ZOO_VERSION
    except (OSError, ValueError):
        return False


def ensure_micro_zoo(cache_dir: Path | None = None) -> MicroZoo:
    """The micro zoo of this ``ZOO_VERSION`` under ``cache_dir`` (default: :func:`default_cache_dir`),
    built if missing or unreadable. Building happens in a temporary directory renamed into place
    under a file lock, so concurrent callers build once and a killed build leaves no half zoo.
    Zoos of other versions (other directories) are left alone."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    zoo = MicroZoo.at(cache / ZOO_DIRECTORY)
    if _is_current(zoo):
        return zoo
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{ZOO_DIRECTORY}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _is_current(zoo):  # another process built it while we waited
            return zoo
        tmp = Path(tempfile.mkdtemp(prefix=".micro-build-", dir=cache))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the zoo is shareable
            _build(tmp)
            if zoo.root.exists():  # a broken zoo (no readable manifest): move aside, swap in, delete
                stale = Path(tempfile.mkdtemp(prefix=".micro-stale-", dir=cache))
                zoo.root.rename(stale / ZOO_DIRECTORY)
                tmp.rename(zoo.root)
                shutil.rmtree(stale)
            else:
                tmp.rename(zoo.root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("micro zoo ready at %s", zoo.root)
    return zoo


def resolve_backbone(name_or_path: str, kind: Literal["vision", "llm"], cache_dir: Path | None = None) -> str:
    """``"micro"`` -> the zoo's ``vision``/``llm`` directory (built if needed); anything else
    (a hub id or a local path) is returned unchanged."""
    if kind not in ("vision", "llm"):
        raise ValueError(f"kind must be 'vision' or 'llm', not {kind!r}")
    if name_or_path != "micro":
        return name_or_path
    zoo = ensure_micro_zoo(cache_dir)
    return str(zoo.vision_path if kind == "vision" else zoo.llm_path)
