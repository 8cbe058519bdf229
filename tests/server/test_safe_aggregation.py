"""A round's aggregation without the updates that break it: screened, left out one by one, or the farthest."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from fedcmp.common.codec import save_params_file
from fedcmp.server.rounds import Coordinator
from fedcmp.server.safe_aggregation import aggregate_safely, is_finite
from fedcmp.server.store import UPLOAD_CHECKS, RunStore, SpilledUpload
from fedcmp.server.strategies import build_strategy

from .test_liveness import FAST, GUARD_S, ManualClient, training, until
from .test_rounds import make_coordinator

GLOBAL = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}


def spill(store: RunStore, client_id: str, params: dict[str, torch.Tensor], num_samples: int = 10,
          round_index: int = 1) -> SpilledUpload:
    """An upload as it lies on disk, recorded as checked though it is not: the aggregation's defence in depth
    behind the upload checks (which refuse NaN, foreign shapes and such sample counts as they stream in)."""
    path = store.upload_dir(round_index) / f"{client_id}.safetensors"
    save_params_file(path, params)
    header = {"client_id": client_id, "round": round_index, "num_samples": num_samples, "metrics": {},
              "size": path.stat().st_size, "checks": UPLOAD_CHECKS}
    path.with_suffix(".json").write_text(json.dumps(header))
    return SpilledUpload(client_id, round_index, num_samples, {}, path)


def shifted(value: float) -> dict[str, torch.Tensor]:
    return {key: tensor + value for key, tensor in GLOBAL.items()}


@pytest.mark.parametrize("strategy", ["fedavg", "fedavgm", "fedadam", "fedcmp"])
@pytest.mark.parametrize("bad, num_samples, reason", [
    ({"w": torch.full((4, 3), float("nan")), "b": torch.zeros(4)}, 10, "holds NaN/inf"),
    ({"w": torch.zeros(2, 3), "b": torch.zeros(4)}, 10, "do not match the projector"),
    (shifted(1.0), -5, "claims -5 samples"),
])
def test_screened_updates_are_left_out_and_named(tmp_path, strategy, bad, num_samples, reason) -> None:
    store = RunStore(tmp_path)
    uploads = [spill(store, "a", shifted(1.0)), spill(store, "b", shifted(3.0)), spill(store, "evil", bad, num_samples)]
    outcome = aggregate_safely(build_strategy(strategy, {}), GLOBAL, uploads)
    assert list(outcome.excluded) == ["evil"] and reason in outcome.excluded["evil"]
    honest = build_strategy(strategy, {}).aggregate(GLOBAL, [upload for upload in _updates(uploads[:2])])
    for key in GLOBAL:
        assert torch.equal(outcome.new_global[key], honest[key])


class GramInFloat32:
    """FedAvg plus a float32 Gram term that overflows to NaN for huge deltas, as Fed-CMP's sketch could."""

    name = "gram"

    def __init__(self) -> None:
        self.inner = build_strategy("fedavg", {})

    def aggregate(self, global_params, updates):
        new = self.inner.aggregate(global_params, updates)
        gram = sum((update.params["w"] - global_params["w"]).pow(2).sum() for update in updates)  # inf past ~1e19
        return {key: tensor + 0.0 * (gram - gram) for key, tensor in new.items()}  # inf - inf = NaN

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


@pytest.mark.parametrize("strategy", [GramInFloat32(), build_strategy("fedcmp", {})], ids=["gram", "fedcmp"])
def test_finite_updates_that_overflow_the_strategy_never_make_a_nan_global(tmp_path, strategy) -> None:
    store = RunStore(tmp_path)
    uploads = [spill(store, "a", shifted(0.1)), spill(store, "b", shifted(0.2)), spill(store, "c", shifted(0.3)),
               spill(store, "huge", shifted(1e19))]
    outcome = aggregate_safely(strategy, GLOBAL, uploads)
    assert outcome.new_global is not None and set(outcome.excluded) <= {"huge"}
    assert all(torch.isfinite(tensor).all() for tensor in outcome.new_global.values())
    if isinstance(strategy, GramInFloat32):
        assert list(outcome.excluded) == ["huge"]


class RefusesClient:
    """A strategy (FedAvg) that raises whenever a given client takes part."""

    name = "picky"

    def __init__(self, refused: str) -> None:
        self.inner = build_strategy("fedavg", {})
        self.refused = refused

    def aggregate(self, global_params, updates):
        if any(update.client_id == self.refused for update in updates):
            raise RuntimeError("cannot take this one")
        return self.inner.aggregate(global_params, updates)

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


def test_leave_one_out_finds_the_update_a_strategy_cannot_take(tmp_path) -> None:
    store = RunStore(tmp_path)
    uploads = [spill(store, name, shifted(1.0)) for name in ("a", "b", "c")]
    outcome = aggregate_safely(RefusesClient("b"), GLOBAL, uploads)
    assert list(outcome.excluded) == ["b"] and "cannot take this one" in outcome.excluded["b"]


def test_when_nothing_aggregates_the_strategy_state_is_untouched(tmp_path) -> None:
    store = RunStore(tmp_path)
    strategy = build_strategy("fedavgm", {})
    strategy.aggregate(GLOBAL, _updates([spill(store, "a", shifted(1.0), round_index=9)]))  # some momentum
    before = strategy.state_dict()
    outcome = aggregate_safely(strategy, GLOBAL, [spill(store, "a", shifted(1e38)), spill(store, "b", shifted(-1e38))])
    assert outcome.new_global is None and sorted(outcome.excluded) == ["a", "b"]
    after = strategy.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_a_poisoned_round_commits_without_the_offender_and_the_run_goes_on(tmp_path, caplog) -> None:
    async def scenario() -> Coordinator:
        coordinator = make_coordinator(tmp_path, rounds=2, min_clients=2, round_timeout_s=600.0, **FAST)
        a, evil = ManualClient(coordinator, "a"), ManualClient(coordinator, "evil")
        async with training(coordinator, a, evil):
            await a.train(1)
            client = evil.call()
            assert (await coordinator.next_task(client, hold_s=0.05)).kind == "TRAIN"
            template = coordinator.store.load_global(0)
            nan = {key: torch.full_like(value, float("nan")) for key, value in template.items()}
            spill(coordinator.store, "evil", nan)
            coordinator.upload_accepted(client, 1)
            await until(lambda: coordinator.record.committed_round == 1, "round 1 to commit")
            await a.train(2)
            await evil.train(2)
            await until(lambda: coordinator.record.committed_round == 2, "round 2 to commit")
        return coordinator

    with caplog.at_level(logging.WARNING, logger="fedcmp.server"):
        coordinator = asyncio.run(scenario())
    first, second = coordinator.record.history
    assert first["clients"] == ["a"] and first["excluded"] == {"evil": "holds NaN/inf"}
    assert second["clients"] == ["a", "evil"] and second["excluded"] == {}
    assert "round 1: evil's update is left out: holds NaN/inf" in caplog.text
    assert all(torch.isfinite(tensor).all() for tensor in coordinator.store.load_global(1).values())


def _updates(uploads):
    from fedcmp.server.store import SpilledUpdates

    return SpilledUpdates(uploads)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("position", [0, 1, 7, 8, 15, 16, 31, 1000, 4095])
def test_is_finite_finds_one_non_finite_value_anywhere(value: float, position: int) -> None:
    """One bad value among many finite ones, at the first, vector-lane and last positions."""
    params = {"w": torch.randn(64, 64), "b": torch.randn(5), "empty": torch.empty(0)}
    assert is_finite(params)
    params["w"].view(-1)[position] = value
    assert not is_finite(params)
    assert not is_finite({"b": torch.tensor([1.0, value])}) and not is_finite({"b": torch.tensor([value, 1.0])})
