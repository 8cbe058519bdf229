"""Numeric precision of a client: the backbones' dtype, autocast, the fp16 gradient scaler, TF32.

`precision` (a recipe field, overridable per client) is `bf16`, `fp16`, `fp32`, or `auto`: bf16
on a CUDA device that supports it (LLaVA's stage 1 trains in bf16), fp16 on an older CUDA
device, fp32 on CPU. Under bf16/fp16 the frozen backbones are held in that dtype and every
forward runs under autocast; the projector's (master) weights and the loss stay float32. fp16
needs a gradient scaler (its range is too small for raw gradients); bf16 and fp32 do not. On
CUDA, float32 matrix products may use TF32 tensor cores.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch

from fedcmp.common.recipe import RecipeError

Precision = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The concrete precision of `precision` ("auto" or a concrete one) on `device`.

    bf16 on a GPU without bf16 support is refused (a RecipeError that says to use fp16).
    """
    if precision not in PRECISIONS:
        raise RecipeError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    on_cuda = device.type == "cuda"
    bf16_ok = not on_cuda or torch.cuda.is_bf16_supported()
    if precision == "auto":
        return ("bf16" if bf16_ok else "fp16") if on_cuda else "fp32"
    if precision == "bf16" and not bf16_ok:
        raise RecipeError(f"precision bf16: {device} has no bfloat16 support; use --precision fp16 on this client")
    return precision  # type: ignore[return-value]


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision autocast for bf16/fp16 forwards; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, active only under fp16 (a pass-through otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def enable_tf32(device: torch.device) -> None:
    """Let float32 matrix products on a CUDA device use TF32 tensor cores (process-wide)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
