"""`fedcmp-client --check`: validate a site's data and backbones without any coordinator.

Scans every record, decodes every image once (no vision tower), tokenizes the captions and loads
the backbones, then reports what a federation would see: sample counts and bad samples,
caption token lengths, image sizes and the projector signature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcmp.client.data import DataOptions, ScannedData, split_train_val
from fedcmp.client.features import scan_images
from fedcmp.client.model import ProjectorMLLM
from fedcmp.common.projector import describe_shapes
from fedcmp.common.recipe import Recipe


@dataclass
class CheckReport:
    format: str
    rows: int
    usable: int
    bad_reasons: list[str]
    bad_count: int
    train: int
    val: int
    caption_tokens: tuple[int, float, int]  # min, mean, max supervised tokens per caption
    truncated: int  # captions cut at max_caption_tokens
    image_sizes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # smallest, median, largest (w, h)
    signature: str

    def lines(self) -> list[str]:
        low, mean, high = self.caption_tokens
        smallest, median, largest = (f"{w}x{h}" for w, h in self.image_sizes)
        lines = [f"format: {self.format}",
                 f"samples: {self.rows} rows, {self.usable} usable ({self.train} train / {self.val} held out), "
                 f"{self.bad_count} bad",
                 *(f"  bad: {reason}" for reason in self.bad_reasons),
                 f"caption tokens: min {low}, mean {mean:.1f}, max {high}; {self.truncated} cut at the recipe's limit",
                 f"image sizes (w x h): smallest {smallest}, median {median}, largest {largest}",
                 f"projector: {self.signature}"]
        return lines


def check_site(model: ProjectorMLLM, recipe: Recipe, scanned: ScannedData, options: DataOptions) -> CheckReport:
    """Decode every image of `scanned` and measure the data; raises DataError past the bad-sample cap."""
    images = scan_images(scanned.source, model.image_processor, scanned.rows, recipe.batch_size, options.workers)
    for row, reason in sorted(images.bad.items()):
        scanned.bad.add(row, reason)
    scanned.bad.check(len(scanned.source))
    usable = scanned.drop(list(images.bad))
    _, caption_mask = model.tokenize_captions(usable.captions)  # [N, L]
    tokens = caption_mask.sum(dim=1).numpy()  # [N]
    areas = np.array([w * h for w, h in images.sizes])
    order = np.argsort(areas, kind="stable")
    train, val = split_train_val(usable.ids, recipe.val_fraction, recipe.seed)
    return CheckReport(
        format=scanned.source.format, rows=len(scanned.source), usable=len(usable.ids),
        bad_reasons=scanned.bad.first_reasons(), bad_count=len(scanned.bad.rows), train=len(train), val=len(val),
        caption_tokens=(int(tokens.min()), float(tokens.mean()), int(tokens.max())),
        truncated=int((tokens >= recipe.max_caption_tokens).sum()),
        image_sizes=tuple(images.sizes[order[i]] for i in (0, len(order) // 2, -1)),  # type: ignore[arg-type]
        signature=describe_shapes(model.signature()))
