"""The frozen-feature room: where a split's vision features come from, behind one interface.

The trainer and the evaluation read features through `FeatureStore`: `len(store)`,
`store[indices]` (a slice or an index tensor -> float32 [b, P, vision_hidden]) and
`store.batches(index_batches)`, an iterator over many batches that a store may prefetch. They
never know whether the rows are a tensor in RAM, a memory-mapped on-disk cache or the vision
tower running live on each batch.

`EncodedSplit` row-aligns a feature store with the tokenized captions; `batches` yields
`CaptionBatch`es, the one thing a training step consumes.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

Index = slice | Tensor


@runtime_checkable
class FeatureStore(Protocol):
    """Rows of frozen vision features, [N, P, vision_hidden]."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: Index) -> Tensor:
        """float32 features [b, P, vision_hidden] of the rows `index` selects, in that order."""
        ...

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        """`self[rows]` for each rows of `index_batches`, in order (a store may prefetch ahead)."""
        ...


class TensorFeatures:
    """Features held in RAM as one tensor (small data: tests, the embedded demo's simulator)."""

    def __init__(self, features: Tensor) -> None:
        self.features = features  # [N, P, vision_hidden]

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: Index) -> Tensor:
        return self.features[index].float()

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        return (self[rows] for rows in index_batches)


class FeatureView:
    """The rows `rows` of another store, renumbered 0..len(rows)-1 (a train or val split of a site's data)."""

    def __init__(self, base: FeatureStore, rows: Tensor) -> None:
        self.base = base
        self.rows = rows  # [n] long: row i of the view is row rows[i] of base

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, index: Index) -> Tensor:
        return self.base[self.rows[index]]

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        return self.base.batches([self.rows[rows] for rows in index_batches])


class ConcatFeatures:
    """Several stores one after the other (the simulator's pooled, centralized baseline)."""

    def __init__(self, parts: Sequence[FeatureStore]) -> None:
        self.parts = list(parts)
        self.ends = torch.tensor([len(part) for part in self.parts]).cumsum(0)  # [K] exclusive row ends

    def __len__(self) -> int:
        return int(self.ends[-1]) if self.parts else 0

    def __getitem__(self, index: Index) -> Tensor:
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else index  # [b]
        part_of_row = torch.searchsorted(self.ends, rows, right=True)  # [b]
        starts = self.ends - torch.tensor([len(part) for part in self.parts])  # [K]
        pieces = {}
        for part in torch.unique(part_of_row).tolist():
            chosen = part_of_row == part
            pieces[part] = (chosen, self.parts[part][rows[chosen] - starts[part]])  # [b_k, P, H]
        first = next(iter(pieces.values()))[1]
        out = first.new_empty((rows.shape[0], *first.shape[1:]))  # [b, P, H]
        for chosen, features in pieces.values():
            out[chosen] = features
        return out

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[Tensor]:
        return (self[rows] for rows in index_batches)


@dataclass(frozen=True)
class CaptionBatch:
    """What one training or evaluation step consumes."""

    features: Tensor  # [B, P, vision_hidden] float32
    caption_ids: Tensor  # [B, L] long
    caption_mask: Tensor  # [B, L] long


@dataclass
class EncodedSplit:
    """A split's example ids, feature rows and tokenized captions, row-aligned."""

    ids: list[str]
    features: FeatureStore  # [N, P, vision_hidden]
    caption_ids: Tensor  # [N, L]
    caption_mask: Tensor  # [N, L]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, rows: Tensor) -> EncodedSplit:
        """The split of the rows `rows` ([n] long), in that order."""
        return EncodedSplit([self.ids[row] for row in rows.tolist()], FeatureView(self.features, rows),
                            self.caption_ids[rows], self.caption_mask[rows])

    def batches(self, index_batches: Sequence[Tensor]) -> Iterator[CaptionBatch]:
        """One CaptionBatch per rows of `index_batches` ([B] long each), in order."""
        features = self.features.batches(index_batches)
        for rows, batch_features in zip(index_batches, features):
            yield CaptionBatch(batch_features, self.caption_ids[rows], self.caption_mask[rows])


def concat_splits(splits: Sequence[EncodedSplit]) -> EncodedSplit:
    """One split holding the rows of all `splits` (captions right-padded to the longest)."""
    width = max(split.caption_ids.shape[1] for split in splits)

    def padded(tensor: Tensor) -> Tensor:  # [N, L] -> [N, width]
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))

    return EncodedSplit([row for split in splits for row in split.ids], ConcatFeatures([s.features for s in splits]),
                        torch.cat([padded(s.caption_ids) for s in splits]),
                        torch.cat([padded(s.caption_mask) for s in splits]))
