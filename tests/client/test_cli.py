"""The client's command line: devices it refuses before loading anything, its recipe overrides."""
from __future__ import annotations

import pytest
import torch

from fedcmp.client.cli import check_device, local_recipe, parse_args
from fedcmp.common.recipe import Recipe, RecipeError


def test_devices_this_machine_lacks_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="not a device"):
        check_device("gpu0")
    with pytest.raises(ValueError, match="runs on cpu or cuda"):
        check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\), cuda:0..cuda:1"):
        check_device("cuda:2")


def test_client_flags_override_the_recipe_and_are_validated() -> None:
    base = ["--server", "127.0.0.1:1", "--data", "data"]
    recipe = local_recipe(parse_args([*base, "--precision", "fp16", "--micro-batch-size", "4",
                                      "--gradient-checkpointing"]), Recipe(batch_size=16))
    assert (recipe.precision, recipe.micro_batch_size, recipe.gradient_checkpointing) == ("fp16", 4, True)
    untouched = local_recipe(parse_args(base), Recipe(gradient_checkpointing=True, precision="bf16"))
    assert untouched == Recipe(gradient_checkpointing=True, precision="bf16")
    with pytest.raises(RecipeError, match="batch_size: Input should be greater than or equal to 1"):
        local_recipe(parse_args([*base, "--batch-size", "0"]), Recipe())
