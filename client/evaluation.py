"""Quality of a projector on encoded captions: mean token NLL and caption retrieval accuracy.

Both metrics take frozen features [N, P, vision_hidden] (a tensor or any `FeatureStore`: they
only index it) and caption ids / masks [N, L] as `tokenize_captions` produces them, and score
with the model's current projector (load one first with `load_projector_params`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from fedcmp.client.features import FeatureStore
from fedcmp.client.model import ProjectorMLLM


@torch.no_grad()
def caption_nll(
    model: ProjectorMLLM, features: Tensor | FeatureStore, caption_ids: Tensor, caption_mask: Tensor, batch_size: int
) -> float:
    """Mean NLL per supervised caption token (caption + separator) over the whole set."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        end = start + batch_size
        nll, tokens = model.caption_nll(features[start:end], caption_ids[start:end], caption_mask[start:end])
        total_nll += nll.sum().item()
        total_tokens += int(tokens.sum().item())
    if total_tokens == 0:
        raise ValueError("caption_nll needs at least one caption")
    return total_nll / total_tokens


def _caption_rows(caption_ids: Tensor, caption_mask: Tensor) -> Tensor:
    """One row per example that is equal exactly when two examples carry the same caption. [N, 2L]"""
    return torch.cat([caption_ids * caption_mask, caption_mask], dim=1)


def count_distinct_captions(caption_ids: Tensor, caption_mask: Tensor) -> int:
    """How many distinct captions (token sequences) the set holds: retrieval needs `num_candidates` of them."""
    return int(torch.unique(_caption_rows(caption_ids, caption_mask), dim=0).shape[0])


@torch.no_grad()
def retrieval_accuracy(
    model: ProjectorMLLM,
    features: Tensor | FeatureStore,
    caption_ids: Tensor,
    caption_mask: Tensor,
    num_candidates: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> float:
    """Fraction of images whose own caption scores best among `num_candidates` candidates.

    Candidates for image i: its own caption plus `num_candidates - 1` other *distinct* captions of
    the set (distinct token sequences), drawn with a generator seeded by `seed`. The score is the
    mean NLL per token, not the summed NLL: a summed NLL grows with caption length, so it would
    pick the shortest candidate whatever the image shows (and the sets mix tag lists with full
    sentences). A tie counts as a miss, so an uninformative projector cannot score by luck of
    ordering. All (image, candidate) pairs are scored in batches of `batch_size` pairs.
    """
    num_images = len(features)
    # caption_class[i]: which distinct caption example i carries.
    rows = _caption_rows(caption_ids, caption_mask)  # [N, 2L]
    distinct, caption_class = torch.unique(rows, dim=0, return_inverse=True)  # [U, 2L], [N]
    num_distinct = distinct.shape[0]
    if num_distinct < num_candidates:
        raise ValueError(f"retrieval needs at least {num_candidates} distinct captions, the set has {num_distinct}")
    representative = torch.zeros(num_distinct, dtype=torch.long).scatter_reduce(
        0, caption_class, torch.arange(num_images), reduce="amin", include_self=False
    )  # [U]: the first example carrying each distinct caption

    generator = torch.Generator().manual_seed(seed)
    candidates = torch.empty(num_images, num_candidates, dtype=torch.long)  # [N, C]: example index of each caption
    for image in range(num_images):
        weights = torch.ones(num_distinct)
        weights[caption_class[image]] = 0.0  # never the true caption (or a copy of it) as a distractor
        others = torch.multinomial(weights, num_candidates - 1, replacement=False, generator=generator)  # [C - 1]
        candidates[image, 0] = image
        candidates[image, 1:] = representative[others]

    image_index = torch.arange(num_images).repeat_interleave(num_candidates)  # [N * C]
    caption_index = candidates.flatten()  # [N * C]
    scores = torch.empty(num_images * num_candidates)  # mean NLL per token of each pair
    for start in range(0, scores.shape[0], batch_size):
        images, captions = image_index[start : start + batch_size], caption_index[start : start + batch_size]
        nll, tokens = model.caption_nll(features[images], caption_ids[captions], caption_mask[captions])
        scores[start : start + batch_size] = (nll / tokens).cpu()
    scores = scores.view(num_images, num_candidates)  # [N, C], column 0 is the true caption
    correct = scores[:, 0] < scores[:, 1:].min(dim=1).values
    return correct.float().mean().item()
