"""Benchmark metrics: mean token NLL and caption retrieval (candidate draw, scoring, ties)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fedcmp.client.data import scan_data
from fedcmp.client.features import open_features
from fedcmp.client.evaluation import caption_nll, retrieval_accuracy
from fedcmp.client.model import ProjectorMLLM
from fedcmp.common.recipe import Recipe


class ClassScorer:
    """A stand-in model: image i shows class features[i, 0, 0], caption ids[:, 0] names a class.

    The NLL per token is `match` when they agree and `miss` otherwise.
    """

    def __init__(self, match: float, miss: float) -> None:
        self.match, self.miss = match, miss
        self.calls = 0

    def caption_nll(self, features: Tensor, caption_ids: Tensor, caption_mask: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        tokens = caption_mask.sum(dim=1)
        agree = features[:, 0, 0].long() == caption_ids[:, 0]
        per_token = torch.where(agree, torch.tensor(self.match), torch.tensor(self.miss))
        return per_token * tokens, tokens


def _class_set(num_classes: int, copies: int) -> tuple[Tensor, Tensor, Tensor]:
    """`copies` images per class, each carrying the same caption as the others of its class."""
    labels = torch.arange(num_classes).repeat_interleave(copies)  # [N]
    features = labels.float().view(-1, 1, 1).expand(-1, 4, 3).clone()  # [N, 4, 3]
    caption_ids = torch.stack([labels, labels + 100, labels + 200], dim=1)  # [N, 3]
    short = labels % 2 == 0  # half the classes have shorter captions: lengths must not matter
    caption_ids[short, 2] = 0
    caption_mask = torch.ones_like(caption_ids)
    caption_mask[short, 2] = 0
    return features, caption_ids, caption_mask


def test_retrieval_with_duplicate_captions_and_ties() -> None:
    features, caption_ids, caption_mask = _class_set(num_classes=12, copies=2)
    perfect = ClassScorer(match=1.0, miss=2.0)
    # Copies of the true caption are never distractors, so a perfect scorer gets everything.
    assert retrieval_accuracy(perfect, features, caption_ids, caption_mask, batch_size=32) == 1.0
    assert perfect.calls == 8  # 24 images x 10 candidates in batches of 32
    assert retrieval_accuracy(ClassScorer(match=2.0, miss=1.0), features, caption_ids, caption_mask) == 0.0
    assert retrieval_accuracy(ClassScorer(match=1.0, miss=1.0), features, caption_ids, caption_mask) == 0.0  # ties miss


def test_retrieval_needs_enough_distinct_captions() -> None:
    features, caption_ids, caption_mask = _class_set(num_classes=9, copies=3)
    with pytest.raises(ValueError, match="at least 10 distinct captions, the set has 9"):
        retrieval_accuracy(ClassScorer(1.0, 2.0), features, caption_ids, caption_mask)
    assert retrieval_accuracy(ClassScorer(1.0, 2.0), features, caption_ids, caption_mask, num_candidates=9) == 1.0


@pytest.fixture(scope="module")
def encoded(scenes: Path, make_recipe: Callable[..., Recipe]) -> tuple[ProjectorMLLM, Tensor, Tensor, Tensor]:
    recipe = make_recipe()
    model = ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe)
    split = open_features(model, recipe, scan_data(scenes))
    return model, split.features[:], split.caption_ids, split.caption_mask


Encoded = tuple[ProjectorMLLM, Tensor, Tensor, Tensor]


def test_caption_nll_is_token_weighted_and_batch_invariant(encoded: Encoded) -> None:
    model, features, caption_ids, caption_mask = encoded
    with torch.no_grad():
        nll, tokens = model.caption_nll(features, caption_ids, caption_mask)
    expected = (nll.sum() / tokens.sum()).item()
    for batch_size in (1, 5, 16):
        assert caption_nll(model, features, caption_ids, caption_mask, batch_size) == pytest.approx(expected, rel=1e-5)


def test_retrieval_on_the_real_model_is_deterministic(encoded: Encoded) -> None:
    model, features, caption_ids, caption_mask = encoded
    first = retrieval_accuracy(model, features, caption_ids, caption_mask, seed=1, batch_size=24)
    assert 0.0 <= first <= 1.0
    assert retrieval_accuracy(model, features, caption_ids, caption_mask, seed=1, batch_size=40) == first
