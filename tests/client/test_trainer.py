"""Local training: it learns, it is bit-for-bit deterministic, its batch stream is stateless, FedProx pulls."""
from __future__ import annotations

import math
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

from fedcmp.client.data import DataOptions
from fedcmp.client.evaluation import caption_nll
from fedcmp.client.sources import FORMATS, Columns
from fedcmp.client.trainer import LocalSession, batch_schedule
from fedcmp.common.recipe import Recipe
from tests.client.conftest import write_dataset


@pytest.fixture(scope="module")
def session(scenes: Path, make_recipe: Callable[..., Recipe]) -> LocalSession:
    return LocalSession.open(scenes, make_recipe(), client_id="alice")


def _distance(params: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    return sum(((params[key] - reference[key]) ** 2).sum().item() for key in reference) ** 0.5


def test_open_splits_and_encodes(session: LocalSession) -> None:
    assert (session.num_train_samples, session.num_val_samples) == (12, 4)
    assert session.train.features[:].shape == (12, 16, 24) and session.val.features[:].shape == (4, 16, 24)
    assert session.train.caption_ids.shape[0] == 12 and session.val.caption_mask.shape[0] == 4
    assert session.signature() == session.model.signature()


def test_a_round_lowers_the_training_loss(session: LocalSession) -> None:
    start = session.model.projector_params()
    train = session.train

    def train_nll(params: dict[str, Tensor]) -> float:
        session.model.load_projector_params(params)
        return caption_nll(session.model, train.features, train.caption_ids, train.caption_mask, batch_size=8)

    trained, metrics = session.train_round(start, round_index=0, local_steps=40)
    assert train_nll(trained) < train_nll(start) - 0.05  # a random frozen LM leaves little to gain: 2.84 -> 2.73
    assert metrics["steps"] == 40 and metrics["samples"] == 160
    assert metrics["train_loss_last"] < metrics["train_loss"]
    assert all(value.dtype == torch.float32 and value.device.type == "cpu" for value in trained.values())


def test_evaluate(session: LocalSession, scenes: Path, make_recipe: Callable[..., Recipe]) -> None:
    start = session.model.projector_params()
    before = session.evaluate(start)
    assert before["val_tokens"] == float(session.val.caption_mask.sum())
    assert before["val_loss"] > 0
    assert session.evaluate(start) == before
    no_val = LocalSession.open(scenes, make_recipe(val_fraction=0.0), client_id="bob")
    assert no_val.num_val_samples == 0
    empty = no_val.evaluate(start)
    assert math.isnan(empty["val_loss"]) and empty["val_tokens"] == 0.0


def test_two_fresh_sessions_are_bit_identical(scenes: Path, make_recipe: Callable[..., Recipe]) -> None:
    recipe = make_recipe()
    first = LocalSession.open(scenes, recipe, client_id="alice")
    second = LocalSession.open(scenes, recipe, client_id="alice")
    global_params = first.model.projector_params()
    params_a, metrics_a = first.train_round(global_params, round_index=2, local_steps=5)
    params_b, metrics_b = second.train_round(global_params, round_index=2, local_steps=5)
    assert metrics_a == metrics_b
    assert all(torch.equal(params_a[key], params_b[key]) for key in params_a)


def test_round_r_is_stateless(session: LocalSession, scenes: Path, make_recipe: Callable[..., Recipe]) -> None:
    """A client restarted at round r trains exactly as the long-lived one: same batches, same rates."""
    assert session.recipe.lr_schedule == "cosine"  # rates differ from round to round
    global_params = session.model.projector_params()
    for round_index in range(3):  # rounds 0, 1, 2 on the long-lived session
        last, _ = session.train_round(global_params, round_index, local_steps=4)
    fresh = LocalSession.open(scenes, make_recipe(), client_id="alice")
    restarted, _ = fresh.train_round(global_params, round_index=2, local_steps=4)
    assert all(torch.equal(last[key], restarted[key]) for key in last)


def test_batch_stream_covers_each_epoch_once() -> None:
    num_samples, batch_size, local_steps = 10, 4, 3  # 12 positions a round, so rounds straddle epochs
    rounds = [batch_schedule(7, "alice", round_index, local_steps, batch_size, num_samples) for round_index in range(5)]
    stream = torch.cat([schedule.flatten() for schedule in rounds])  # 60 positions = 6 epochs
    for epoch in range(6):
        assert sorted(stream[epoch * num_samples : (epoch + 1) * num_samples].tolist()) == list(range(num_samples))
    assert not torch.equal(stream[:10], stream[10:20])  # each epoch is reshuffled
    assert torch.equal(batch_schedule(7, "alice", 3, local_steps, batch_size, num_samples), rounds[3])
    assert not torch.equal(batch_schedule(7, "bob", 3, local_steps, batch_size, num_samples), rounds[3])
    assert not torch.equal(batch_schedule(8, "alice", 3, local_steps, batch_size, num_samples), rounds[3])


def test_fedprox_keeps_params_closer_to_global(scenes: Path, make_recipe: Callable[..., Recipe]) -> None:
    plain = LocalSession.open(scenes, make_recipe(optimizer="sgd", lr=0.5), client_id="alice")
    prox = LocalSession.open(scenes, make_recipe(optimizer="sgd", lr=0.5, proximal_mu=1.0), client_id="alice")
    global_params = plain.model.projector_params()
    without, _ = plain.train_round(global_params, round_index=0, local_steps=10)
    with_prox, _ = prox.train_round(global_params, round_index=0, local_steps=10)
    assert _distance(with_prox, global_params) < 0.9 * _distance(without, global_params)


@pytest.mark.parametrize("format", [f for f in FORMATS if f != "llava-json"])
def test_every_format_trains_the_same_update(format: str, scenes: Path, tmp_path: Path,
                                             make_recipe: Callable[..., Recipe]) -> None:
    recipe = make_recipe()
    columns = Columns(id="key", image="jpg", caption="txt") if format == "parquet" else Columns()
    options = DataOptions(feature_cache_dir=tmp_path / "features")
    reference = LocalSession.open(scenes, recipe, client_id="alice", options=options)
    other = LocalSession.open(write_dataset(tmp_path / format, format, 16), recipe, client_id="alice",
                              options=DataOptions(columns=columns, feature_cache_dir=tmp_path / "features"))
    assert other.train.ids == reference.train.ids and other.val.ids == reference.val.ids
    start = reference.model.projector_params()
    expected, _ = reference.train_round(start, round_index=0, local_steps=3)
    got, _ = other.train_round(start, round_index=0, local_steps=3)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_accumulation_gives_the_update_of_one_big_batch(
    session: LocalSession, make_recipe: Callable[..., Recipe]
) -> None:
    """batch_size 8 in micro-batches of 3 (3 + 3 + 2, gradients accumulated) = one forward of 8."""
    global_params = session.model.projector_params()
    updates = {}
    for micro_batch_size in (None, 3):
        recipe = make_recipe(batch_size=8, micro_batch_size=micro_batch_size, proximal_mu=0.5)
        updates[micro_batch_size], metrics = replace(session, recipe=recipe).train_round(global_params, 1, 3)
        assert metrics["samples"] == 24
    for key in global_params:
        assert not torch.allclose(updates[3][key], global_params[key])
        torch.testing.assert_close(updates[3][key], updates[None][key])


def test_rates_follow_the_run_wide_schedule(session: LocalSession, make_recipe: Callable[..., Recipe]) -> None:
    """Step 0 of the run is the warm-up's zero rate; the next round's step trains at the scheduled rate."""
    global_params = session.model.projector_params()
    warm = replace(session, recipe=make_recipe(rounds=10, lr_schedule="cosine", warmup_ratio=0.2))
    first, metrics = warm.train_round(global_params, round_index=0, local_steps=1)
    assert metrics["lr_last"] == 0.0 and all(torch.equal(first[key], global_params[key]) for key in first)
    second, metrics = warm.train_round(global_params, round_index=1, local_steps=1)
    assert metrics["lr_last"] == pytest.approx(0.5 * warm.recipe.lr)
    assert not all(torch.equal(second[key], global_params[key]) for key in second)
    constant = replace(session, recipe=make_recipe(rounds=10, lr_schedule="constant"))
    _, metrics = constant.train_round(global_params, round_index=0, local_steps=1)
    assert metrics["lr_last"] == constant.recipe.lr
