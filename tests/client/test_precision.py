"""Precision and memory: each precision trains on CPU and makes (nearly) the fp32 update, fp16
runs under a gradient scaler, gradient checkpointing recomputes the LM and changes nothing."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fedcmp.client.precision import DTYPES, grad_scaler, resolve_precision
from fedcmp.client.trainer import LocalSession
from fedcmp.common.recipe import Recipe, RecipeError


def _round_update(session: LocalSession) -> tuple[dict[str, Tensor], dict[str, float]]:
    start = session.model.projector_params()
    params, metrics = session.train_round(start, round_index=0, local_steps=3)
    return {key: params[key] - start[key] for key in start}, metrics


def _flat(update: dict[str, Tensor]) -> Tensor:
    return torch.cat([value.flatten() for value in update.values()])


@pytest.fixture(scope="module")
def sgd_recipe(make_recipe: Callable[..., Recipe]) -> Callable[..., Recipe]:
    # SGD: the update is proportional to the gradient, so a gradient that is off shows.
    return lambda **overrides: make_recipe(optimizer="sgd", lr=1.0, lr_schedule="constant", **overrides)


@pytest.fixture(scope="module")
def fp32_update(scenes: Path, sgd_recipe: Callable[..., Recipe]) -> dict[str, Tensor]:
    return _round_update(LocalSession.open(scenes, sgd_recipe(precision="fp32"), client_id="alice"))[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_make_the_fp32_update(
    precision: str, scenes: Path, sgd_recipe: Callable[..., Recipe], fp32_update: dict[str, Tensor]
) -> None:
    session = LocalSession.open(scenes, sgd_recipe(precision=precision), client_id="alice")
    llava = session.model.llava
    assert session.model.precision == precision
    assert llava.model.language_model.embed_tokens.weight.dtype == DTYPES[precision]  # backbones held in it
    assert next(llava.model.vision_tower.parameters()).dtype == DTYPES[precision]
    assert all(param.dtype == torch.float32 for param in session.model.projector.parameters())  # master weights

    update, metrics = _round_update(session)
    expected = _flat(fp32_update)
    assert expected.norm() > 1e-3
    cosine = torch.nn.functional.cosine_similarity(_flat(update), expected, dim=0)
    assert cosine > 0.99, cosine  # a skipped fp16 step or a mis-scaled gradient would break this
    assert _flat(update).norm() == pytest.approx(expected.norm().item(), rel=0.05)
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_fp16_alone_runs_under_a_gradient_scaler() -> None:
    cpu = torch.device("cpu")
    assert grad_scaler("fp16", cpu).is_enabled()
    assert not grad_scaler("bf16", cpu).is_enabled() and not grad_scaler("fp32", cpu).is_enabled()


def test_auto_precision_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_precision("auto", torch.device("cuda:1")) == "bf16"  # LLaVA's stage 1
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # e.g. a V100
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    with pytest.raises(RecipeError, match="no bfloat16 support; use --precision fp16"):
        resolve_precision("bf16", torch.device("cuda"))
    with pytest.raises(RecipeError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_gradient_checkpointing_recomputes_the_lm_and_changes_nothing(
    scenes: Path, sgd_recipe: Callable[..., Recipe], fp32_update: dict[str, Tensor]
) -> None:
    session = LocalSession.open(scenes, sgd_recipe(precision="fp32", gradient_checkpointing=True), client_id="alice")
    attention = session.model.llava.model.language_model.layers[0].self_attn  # inside the checkpointed layer
    calls: list[bool] = []
    attention.register_forward_hook(lambda module, args, output: calls.append(True))
    update, _ = _round_update(session)
    # 3 steps of one micro-batch: each layer runs in the forward and again, recomputed, in the backward.
    assert len(calls) == 6
    assert all(not param.requires_grad for param in session.model.llava.model.language_model.parameters())
    for key, value in fp32_update.items():
        torch.testing.assert_close(update[key], value, rtol=1e-5, atol=1e-7)
