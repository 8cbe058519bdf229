"""The cross-modal projector: its two LLaVA layouts, parameter signature and seeded init.

Keys follow transformers' `LlavaMultiModalProjector` (`linear_1`, `act`, `linear_2`), so a
projector state dict drops into `LlavaForConditionalGeneration.model.multi_modal_projector`.
`linear` is LLaVA-1's single linear map; `mlp2x_gelu` is LLaVA-1.5's Linear-GELU-Linear.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

ProjectorType = Literal["linear", "mlp2x_gelu"]
PROJECTOR_TYPES: tuple[str, ...] = ("linear", "mlp2x_gelu")


class LinearProjector(nn.Module):
    """LLaVA-1 projector: one linear map from vision width to LM width."""

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)

    def forward(self, image_features: Tensor) -> Tensor:
        # image_features: [batch, patches, vision_hidden] -> [batch, patches, text_hidden]
        return self.linear_1(image_features)


class MlpGeluProjector(nn.Module):
    """LLaVA-1.5 projector (`mlp2x_gelu`), laid out like transformers' LlavaMultiModalProjector."""

    def __init__(self, vision_hidden: int, text_hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def forward(self, image_features: Tensor) -> Tensor:
        # [batch, patches, vision_hidden] -> [batch, patches, text_hidden]
        return self.linear_2(self.act(self.linear_1(image_features)))


def build_projector(projector_type: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """A fresh projector module of the given LLaVA type."""
    if projector_type == "linear":
        return LinearProjector(vision_hidden, text_hidden)
    if projector_type == "mlp2x_gelu":
        return MlpGeluProjector(vision_hidden, text_hidden)
    raise ValueError(f"unknown projector type {projector_type!r}; known: {', '.join(PROJECTOR_TYPES)}")


def projector_shapes(projector_type: str, vision_hidden: int, text_hidden: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every projector tensor; the signature clients and server compare."""
    shapes = {"linear_1.weight": (text_hidden, vision_hidden), "linear_1.bias": (text_hidden,)}
    if projector_type == "mlp2x_gelu":
        shapes |= {"linear_2.weight": (text_hidden, text_hidden), "linear_2.bias": (text_hidden,)}
    elif projector_type != "linear":
        raise ValueError(f"unknown projector type {projector_type!r}; known: {', '.join(PROJECTOR_TYPES)}")
    return shapes


def init_projector_params(projector_type: str, vision_hidden: int, text_hidden: int, seed: int) -> dict[str, Tensor]:
    """The round-0 global projector: PyTorch's default Linear init under a fixed seed."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        module = build_projector(projector_type, vision_hidden, text_hidden)
    finally:
        torch.random.set_rng_state(generator_state)
    return {key: value.detach().clone().float() for key, value in module.state_dict().items()}


def describe_shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """Human-readable signature, e.g. `linear_1.weight[128x64], linear_1.bias[128]`."""
    return ", ".join(f"{key}[{'x'.join(map(str, shape))}]" for key, shape in sorted(shapes.items()))
