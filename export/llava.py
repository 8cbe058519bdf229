"""LLaVA's own projector files: `mm_projector.bin` (torch.save) and `mm_projector.safetensors`.

LLaVA's builder makes `linear` a bare `nn.Linear` and `mlp<N>x_gelu` an `nn.Sequential` of
Linear, GELU, Linear, ... held as `model.mm_projector`; its stage-1 pretraining saves the
projector's named parameters, so the keys are `model.mm_projector.weight` (linear) or
`model.mm_projector.0.weight`, `.2.weight`, ... (the GELUs hold no parameters). LLaVA reads the
file back through `--pretrain_mm_mlp_adapter`, stripping everything up to `mm_projector.`.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import Tensor

from fedcmp.common.codec import save_params_file, write_atomic

LLAVA_PROJECTOR_PREFIX = "model.mm_projector"


def llava_key(key: str, projector_type: str) -> str:
    """`linear_K.weight` -> LLaVA's name: the Sequential index 2(K-1) for mlp types, no index for `linear`."""
    layer, parameter = key.split(".")
    if projector_type == "linear":
        return f"{LLAVA_PROJECTOR_PREFIX}.{parameter}"
    position = int(layer.removeprefix("linear_"))
    return f"{LLAVA_PROJECTOR_PREFIX}.{2 * (position - 1)}.{parameter}"


def llava_state_dict(params: dict[str, Tensor], projector_type: str) -> dict[str, Tensor]:
    """The projector's tensors under LLaVA's keys (same tensors, same dtype)."""
    return {llava_key(key, projector_type): value for key, value in sorted(params.items())}


def write_llava_projector(params: dict[str, Tensor], projector_type: str, out: Path,
                          metadata: dict[str, str] | None) -> list[Path]:
    """`out/mm_projector.bin` and `out/mm_projector.safetensors` (the latter with `metadata`)."""
    state = {key: value.contiguous() for key, value in llava_state_dict(params, projector_type).items()}
    bin_path, safetensors_path = out / "mm_projector.bin", out / "mm_projector.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(bin_path, buffer.getbuffer())
    save_params_file(safetensors_path, state, metadata)
    return [bin_path, safetensors_path]
