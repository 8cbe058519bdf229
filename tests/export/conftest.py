"""Fixtures of the export tests: tiny random backbones and a state dir the coordinator's store wrote."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (AutoImageProcessor, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                          LlamaForCausalLM)

from fedcmp.client.fingerprint import fingerprint_backbones
from fedcmp.common.projector import init_projector_params
from fedcmp.common.provenance import Backbones
from fedcmp.common.recipe import Recipe
from fedcmp.server.store import RunStore


@dataclass(frozen=True)
class TinyBackbones:
    vision: Path
    llm: Path
    cache_dir: Path  # where their fingerprints are cached

    def identity(self) -> Backbones:
        return fingerprint_backbones(str(self.vision), str(self.llm), self.cache_dir)


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory, micro_zoo) -> TinyBackbones:
    """A random 2-layer CLIP vision tower and a random 2-layer Llama, on the micro zoo's image processor and
    tokenizer (so that real captions tokenize), saved with `save_pretrained`."""
    root = tmp_path_factory.mktemp("tiny-backbones")
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(root / "vision")
    AutoImageProcessor.from_pretrained(micro_zoo.vision_path).save_pretrained(root / "vision")
    tokenizer = AutoTokenizer.from_pretrained(micro_zoo.llm_path)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
                                       bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
    llm.save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return TinyBackbones(root / "vision", root / "llm", root / "cache")


@pytest.fixture
def state_dir(tmp_path: Path, tiny_backbones: TinyBackbones) -> Callable[..., Path]:
    """Factory: a state dir with globals v0..v`rounds` (seeded random projectors) written by `RunStore`."""

    def make(projector_type: str = "mlp2x_gelu", rounds: int = 2) -> Path:
        recipe = Recipe(vision_model=str(tiny_backbones.vision), llm=str(tiny_backbones.llm),
                        projector_type=projector_type, strategy="fedavg")
        store = RunStore(tmp_path / f"state-{projector_type}")
        record = store.create(recipe.to_json(), recipe.strategy)
        record = store.commit_initial_global(record, init_projector_params(projector_type, 24, 32, seed=0),
                                             tiny_backbones.identity())
        for round_index in range(1, rounds + 1):
            params = init_projector_params(projector_type, 24, 32, seed=round_index)
            record = store.commit_round(record, round_index, params, {}, {"round": round_index})
        return store.root

    return make
