"""The micro zoo: loads like a real checkpoint, is really pretrained, is cached atomically."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionModel,
    LlamaForCausalLM,
)

from fedcmp.common import synthetic as syn
from fedcmp.common import zoo
from fedcmp.common.datagen import DATA_STREAM
from fedcmp.common.zoo import MicroZoo, ensure_micro_zoo, resolve_backbone


def _federation_scenes(n: int, stream: int) -> tuple[list[syn.Scene], np.ndarray]:
    """Scenes as the federated data draws them (not the zoo's seeds or digit instances)."""
    rng = np.random.default_rng([DATA_STREAM, 99, stream])
    scenes = [syn.sample_scene(rng) for _ in range(n)]
    return scenes, np.stack([syn.render(s) for s in scenes])


def test_loads_through_from_pretrained(micro_zoo: MicroZoo) -> None:
    vision = CLIPVisionModel.from_pretrained(micro_zoo.vision_path)
    processor = AutoImageProcessor.from_pretrained(micro_zoo.vision_path)
    lm = AutoModelForCausalLM.from_pretrained(micro_zoo.llm_path)
    tok = AutoTokenizer.from_pretrained(micro_zoo.llm_path)
    assert isinstance(lm, LlamaForCausalLM)

    _, images = _federation_scenes(4, 0)
    pixels = processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    assert torch.allclose(pixels, zoo.pixel_values(images), atol=1e-5)  # same normalisation as pretraining
    hidden = vision(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (4, 1 + 16, 64)  # CLS + 4x4 patches of 8 px

    assert [tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token] == ["<pad>", "<s>", "</s>", None]
    assert tok.convert_tokens_to_ids("<image>") == micro_zoo.manifest()["llm"]["image_token_id"]
    ids = tok("<image>\na small red circle on the left.")["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<image>")]
    assert lm.config.vocab_size == len(tok)
    # every word and punctuation mark of the caption language is one token, wherever it stands
    words = [word for word in syn.vocabulary() if word.isalpha()]
    assert [len(ids) for ids in tok(words, add_special_tokens=False)["input_ids"]] == [1] * len(words)
    for *_, text in itertools.islice(syn.all_scene_captions(), 0, None, 97):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(syn.tokenize(text)), text


@pytest.mark.parametrize(
    "caption",
    ["crimson vertical stripes on a white background", "a picture of teal a checkerboard", "Ünïcode ✓ 漢字\n"],
)
def test_tokenizer_represents_any_caption(micro_zoo: MicroZoo, caption: str) -> None:
    """Byte-level: no unknown token, and decoding gives the caption back (the issue's examples)."""
    tok = AutoTokenizer.from_pretrained(micro_zoo.llm_path)
    ids = tok(caption, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).strip() == caption.strip()


def test_lm_is_pretrained(micro_zoo: MicroZoo) -> None:
    tok = AutoTokenizer.from_pretrained(micro_zoo.llm_path)
    lm = AutoModelForCausalLM.from_pretrained(micro_zoo.llm_path)
    torch.manual_seed(0)
    initial = LlamaForCausalLM(lm.config)
    rng = np.random.default_rng([DATA_STREAM, 99, 2])
    scenes = [syn.sample_scene(rng) for _ in range(400)]
    captions = [syn.caption(s, *syn.TEMPLATES[i % len(syn.TEMPLATES)]) for i, s in enumerate(scenes)]

    def ppl(model: LlamaForCausalLM, prefix: zoo.PrefixKind) -> float:
        return zoo.caption_perplexity(model, tok, scenes, captions, prefix)

    before, after = ppl(initial, "none"), ppl(lm, "none")
    assert before > 30 and after < 4.0 and after < 0.1 * before
    # a prefix of foreign embeddings (where the image goes) is tolerated ...
    assert ppl(lm, "noise") < 4.0
    # ... and the LM reads it: the attribute words' embeddings there make captions far likelier
    assert ppl(lm, "tags") < 0.85 * ppl(lm, "noise")


def test_vision_tower_is_pretrained(micro_zoo: MicroZoo) -> None:
    vision = CLIPVisionModel.from_pretrained(micro_zoo.vision_path)
    torch.manual_seed(0)
    initial = CLIPVisionModel(vision.config)
    scenes, images = _federation_scenes(1600, 1)
    labels = {k: v for k, v in zoo.attribute_labels(scenes).items() if k in ("colour", "category", "position")}
    trained = zoo.linear_readout(zoo.vision_features(vision, images), labels, n_train=1000)
    random = zoo.linear_readout(zoo.vision_features(initial, images), labels, n_train=1000)
    assert trained["category"] > random["category"] + 0.3 and trained["category"] > 0.7
    assert trained["position"] > random["position"] + 0.4 and trained["position"] > 0.95
    assert trained["colour"] > 0.97 and trained["colour"] >= random["colour"]


def test_manifest_and_reuse(micro_zoo: MicroZoo) -> None:
    manifest = micro_zoo.manifest()
    assert manifest["version"] == zoo.ZOO_VERSION
    assert manifest["llm"]["max_caption_tokens"] == zoo.max_caption_tokens(zoo.build_tokenizer())
    assert micro_zoo.root.name == f"micro-v{zoo.ZOO_VERSION}"
    for part, path in (("vision", micro_zoo.vision_path), ("llm", micro_zoo.llm_path)):
        assert manifest[part]["sha256"] == zoo._sha256(path / "model.safetensors")
    stamp = (micro_zoo.root / "zoo.json").stat().st_mtime_ns
    assert ensure_micro_zoo(micro_zoo.root.parent) == micro_zoo
    assert (micro_zoo.root / "zoo.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert resolve_backbone("micro", "vision", micro_zoo.root.parent) == str(micro_zoo.vision_path)
    assert resolve_backbone("micro", "llm", micro_zoo.root.parent) == str(micro_zoo.llm_path)
    assert resolve_backbone("llava-hf/llava-1.5-7b-hf", "llm") == "llava-hf/llava-1.5-7b-hf"
    assert resolve_backbone("/models/clip", "vision") == "/models/clip"


def test_pretraining_is_deterministic() -> None:
    def vision_weights() -> dict[str, torch.Tensor]:
        return zoo.pretrain_vision(steps=3, n_train=64, n_eval=16)[0].state_dict()

    def lm_weights() -> dict[str, torch.Tensor]:
        return zoo.pretrain_lm(zoo.build_tokenizer(), steps=3, n_eval=16)[0].state_dict()

    for build in (vision_weights, lm_weights):
        a, b = build(), build()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert zoo.build_tokenizer().backend_tokenizer.to_str() == zoo.build_tokenizer().backend_tokenizer.to_str()


def _fake_build(root: Path) -> None:
    (root / "zoo.json").write_text(json.dumps({"version": zoo.ZOO_VERSION}))


def test_build_is_atomic_and_replaces_a_broken_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = zoo.ZOO_DIRECTORY

    def killed(root: Path) -> None:
        (root / "vision").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_build", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_micro_zoo(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{here}.lock"]  # no half zoo left

    broken = tmp_path / here
    broken.mkdir()
    (broken / "zoo.json").write_text("{not json")
    monkeypatch.setattr(zoo, "_build", _fake_build)
    built = ensure_micro_zoo(tmp_path)
    assert built.manifest() == {"version": zoo.ZOO_VERSION}
    assert sorted(p.name for p in tmp_path.iterdir()) == [here, f"{here}.lock"]


def test_other_versions_coexist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zoo of another version (another fedcmp sharing the cache) is neither used nor touched."""
    older = tmp_path / f"micro-v{zoo.ZOO_VERSION - 1}"
    older.mkdir()
    (older / "zoo.json").write_text(json.dumps({"version": zoo.ZOO_VERSION - 1}))
    legacy = tmp_path / "micro"  # version 1 lived here
    legacy.mkdir()
    (legacy / "zoo.json").write_text(json.dumps({"version": 1}))
    monkeypatch.setattr(zoo, "_build", _fake_build)
    built = ensure_micro_zoo(tmp_path)
    assert built.root == tmp_path / zoo.ZOO_DIRECTORY and built.manifest() == {"version": zoo.ZOO_VERSION}
    assert json.loads((older / "zoo.json").read_text()) == {"version": zoo.ZOO_VERSION - 1}
    assert json.loads((legacy / "zoo.json").read_text()) == {"version": 1}


def test_default_cache_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDCMP_CACHE", str(tmp_path))
    monkeypatch.setattr(zoo, "_build", _fake_build)
    assert ensure_micro_zoo().root == tmp_path / zoo.ZOO_DIRECTORY
