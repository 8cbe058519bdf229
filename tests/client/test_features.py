"""Feature stores: views, concatenation and batches return exactly the rows asked for, in order."""
from __future__ import annotations

import torch

from fedcmp.client.features import ConcatFeatures, EncodedSplit, FeatureView, TensorFeatures, concat_splits


def _rows(count: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + count, dtype=torch.float32).view(count, 1, 1).expand(count, 2, 3)  # [N, 2, 3]


def test_view_and_concat_index_like_the_tensor() -> None:
    whole = torch.cat([_rows(4), _rows(3, start=4)])  # [7, 2, 3]
    concat = ConcatFeatures([TensorFeatures(_rows(4)), TensorFeatures(_rows(3, start=4))])
    rows = torch.tensor([6, 0, 4, 3, 3])
    assert len(concat) == 7
    assert torch.equal(concat[rows], whole[rows]) and torch.equal(concat[1:6], whole[1:6])
    view = FeatureView(concat, torch.tensor([5, 1, 2]))
    assert torch.equal(view[torch.tensor([2, 0])], whole[torch.tensor([2, 5])])
    assert [batch[:, 0, 0].tolist() for batch in view.batches([torch.tensor([1]), torch.tensor([0, 2])])] == [
        [1.0], [5.0, 2.0]]


def test_split_batches_align_features_and_captions() -> None:
    ids = torch.arange(5).view(5, 1)  # [5, 1]: the caption of row i is the token i
    split = EncodedSplit([f"e{i}" for i in range(5)], TensorFeatures(_rows(5)), ids, torch.ones_like(ids))
    val = split.take(torch.tensor([4, 1]))
    assert val.ids == ["e4", "e1"]
    (batch,) = list(val.batches([torch.tensor([1, 0])]))
    assert batch.features[:, 0, 0].tolist() == [1.0, 4.0] and batch.caption_ids.flatten().tolist() == [1, 4]
    pooled = concat_splits([val, split.take(torch.tensor([0]))])
    (batch,) = list(pooled.batches([torch.tensor([2, 0])]))
    assert batch.features[:, 0, 0].tolist() == [0.0, 4.0] and batch.caption_ids.flatten().tolist() == [0, 4]
