"""fedcmp-export: LLaVA's mm_projector key layout, transformers Llava directories, refusals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import AutoProcessor, LlavaForConditionalGeneration

from fedcmp.common.codec import load_params_file, load_params_metadata, save_params_file
from fedcmp.common.constants import EXIT_USAGE
from fedcmp.common.provenance import ProjectorProvenance
from fedcmp.export.api import export_projector
from fedcmp.export.source import ExportError

BIN = Path(sys.executable).parent
# The names LLaVA's pretraining saves (`get_mm_adapter_state_maybe_zero_3` over `model.named_parameters()`):
# mlp2x_gelu is nn.Sequential(Linear, GELU, Linear), linear a bare nn.Linear, both at `model.mm_projector`.
LLAVA_KEYS = {
    "mlp2x_gelu": ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                   "model.mm_projector.2.bias", "model.mm_projector.2.weight"],
    "linear": ["model.mm_projector.bias", "model.mm_projector.weight"],
}


def llava_builder(projector_type: str, vision_hidden: int, text_hidden: int) -> nn.Module:
    """The module LLaVA's `build_vision_projector` makes for these two types."""
    if projector_type == "linear":
        return nn.Linear(vision_hidden, text_hidden)
    return nn.Sequential(nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden))


def load_like_llava(weights: dict[str, torch.Tensor], module: nn.Module) -> None:
    """LLaVA's `--pretrain_mm_mlp_adapter` loading: keep keys after 'mm_projector.', load strictly."""
    module.load_state_dict({key.split("mm_projector.")[1]: value for key, value in weights.items()
                            if "mm_projector" in key})


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "linear"])
def test_llava_files_carry_llavas_keys_and_load_into_its_projector(state_dir, tmp_path, projector_type) -> None:
    state = state_dir(projector_type)
    written = export_projector(state, tmp_path / "out", formats=("llava",))
    source = load_params_file(state / "global" / "v2.safetensors")
    from_bin = torch.load(tmp_path / "out" / "llava" / "mm_projector.bin", weights_only=True)
    from_safetensors = load_file(tmp_path / "out" / "llava" / "mm_projector.safetensors")
    assert sorted(from_bin) == sorted(from_safetensors) == LLAVA_KEYS[projector_type]
    assert set(written) == {"llava"}

    module = llava_builder(projector_type, vision_hidden=24, text_hidden=32)
    load_like_llava(from_bin, module)
    layers = [module] if projector_type == "linear" else [module[0], module[2]]
    for index, layer in enumerate(layers, start=1):
        assert torch.equal(layer.weight, source[f"linear_{index}.weight"])
        assert torch.equal(layer.bias, source[f"linear_{index}.bias"])
    for tensor in from_safetensors:
        assert torch.equal(from_safetensors[tensor], from_bin[tensor])
    provenance = ProjectorProvenance.from_metadata(
        load_params_metadata(tmp_path / "out" / "llava" / "mm_projector.safetensors"), "export")
    assert (provenance.projector_type, provenance.round, provenance.vision_hidden) == (projector_type, 2, 24)


def test_transformers_directory_loads_generates_and_holds_the_projector(state_dir, tiny_backbones, tmp_path) -> None:
    state = state_dir("mlp2x_gelu", rounds=3)
    export_projector(state, tmp_path / "out", round_index=2, cache_dir=tiny_backbones.cache_dir)
    folder = tmp_path / "out" / "transformers"
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)

    source = load_params_file(state / "global" / "v2.safetensors")
    exported = model.model.multi_modal_projector.state_dict()
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[key], source[key]) for key in source)  # bit for bit

    inputs = processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text="<image>", return_tensors="pt")
    patches = (32 // 8) ** 2  # the default strategy drops CLS: one <image> token per patch
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == patches
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)
    llava_files = {path.name for path in (tmp_path / "out" / "llava").iterdir()}
    assert llava_files == {"mm_projector.bin", "mm_projector.safetensors"}


def test_a_linear_projector_is_refused_for_transformers_and_exported_for_llava(state_dir, tmp_path) -> None:
    state = state_dir("linear")
    with pytest.raises(ExportError, match="Linear-GELU-Linear"):
        export_projector(state, tmp_path / "refused", formats=("transformers",))
    assert not (tmp_path / "refused").exists()  # refused before writing anything
    assert set(export_projector(state, tmp_path / "default")) == {"llava"}

    command = subprocess.run([str(BIN / "fedcmp-export"), str(state), "--out", str(tmp_path / "cli"),
                              "--format", "transformers"], capture_output=True, text=True, timeout=120)
    assert command.returncode == EXIT_USAGE
    assert "'linear' projector" in command.stderr and "--format llava" in command.stderr


def test_backbones_with_other_fingerprints_are_refused(state_dir, tiny_backbones, micro_zoo, tmp_path) -> None:
    with pytest.raises(ExportError, match=r"the LLM .* has fingerprint [0-9a-f]{12}, but .* trained against"):
        export_projector(state_dir(), tmp_path / "out", formats=("transformers",), llm=str(micro_zoo.llm_path),
                         cache_dir=tiny_backbones.cache_dir)


def test_rounds_and_sources_that_cannot_be_exported_are_named(state_dir, tmp_path) -> None:
    state = state_dir(rounds=3)  # the store keeps the committed global (v3) and the two before it
    with pytest.raises(ExportError, match="round 0 has no global projector .* rounds still on disk: 1, 2, 3"):
        export_projector(state, tmp_path / "out", round_index=0)
    with pytest.raises(ExportError, match="does not exist"):
        export_projector(tmp_path / "absent", tmp_path / "out")
    with pytest.raises(ExportError, match="not a fedcmp state dir"):
        export_projector(tmp_path, tmp_path / "out")
    with pytest.raises(ExportError, match="single file"):
        export_projector(state / "global" / "v3.safetensors", tmp_path / "out", round_index=2)
    bare = tmp_path / "bare.safetensors"
    save_params_file(bare, load_params_file(state / "global" / "v3.safetensors"))  # no metadata
    with pytest.raises(ExportError, match="carries no fedcmp metadata"):
        export_projector(bare, tmp_path / "out", formats=("transformers",))
    assert set(export_projector(bare, tmp_path / "bare-out", formats=("llava",))) == {"llava"}
    save_params_file(tmp_path / "other.safetensors", {"weight": torch.zeros(2, 2)})
    with pytest.raises(ExportError, match="holds no projector"):
        export_projector(tmp_path / "other.safetensors", tmp_path / "out")
