"""The in-process simulator: its modes, metrics and command line."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedcmp.common.recipe import Recipe
from fedcmp.sim.cli import main as sim_main
from fedcmp.sim.engine import Federation, Simulator, concat_splits, rounds_to_reach


@pytest.fixture(scope="module")
def small_federation(tmp_path_factory: pytest.TempPathFactory, micro_zoo) -> tuple[Path, Federation]:
    from fedcmp.common.datagen import generate_federation

    root = generate_federation(tmp_path_factory.mktemp("sim") / "fed", "concept", num_clients=3,
                               samples_per_client=40, test_samples=30, seed=1)
    return root, Federation.open(root, Recipe(), micro_zoo.root.parent)


def test_federated_run_reports_every_round_and_improves_test_nll(small_federation) -> None:
    _, federation = small_federation
    recipe = Recipe(rounds=3, local_steps=6, strategy="fedavg")
    result = Simulator(federation, recipe).run("federated")
    assert [row["round"] for row in result.rounds] == [1.0, 2.0, 3.0]
    assert all(row["participants"] == 3 for row in result.rounds)
    assert result.rounds[-1]["test_nll"] < result.rounds[0]["val_loss"]  # round 1's val_loss: the initial global
    assert {"test_nll", "test_retrieval", "val_nll"} <= result.final.keys()
    assert all(0.0 <= row["test_retrieval"] <= 1.0 for row in result.rounds)  # scored after every round
    assert 0.0 <= result.final["test_retrieval"] <= 1.0


def test_retrieval_is_reported_unavailable_on_few_distinct_captions(small_federation) -> None:
    _, federation = small_federation
    few = concat_splits([federation.test.take(torch.arange(6))] * 5)  # 30 test images, 6 distinct captions
    result = Simulator(Federation(federation.model, federation.sessions, few), Recipe(rounds=1, local_steps=1)).run()
    assert "test_nll" in result.final and "test_retrieval" not in result.final
    assert "test_retrieval" not in result.rounds[0]
    assert result.unavailable == {"test_retrieval": "retrieval picks the true caption among 10 distinct ones; the "
                                                     "30 scored test images carry 6 distinct captions"}
    assert Simulator(federation, Recipe(rounds=1, local_steps=1)).run().unavailable == {}


def test_validation_scores_pool_tokens_and_balance_clients(small_federation) -> None:
    _, federation = small_federation
    result = Simulator(federation, Recipe(rounds=1, local_steps=2)).run("federated")
    evaluations = [session.evaluate(result.global_params) for session in federation.sessions.values()]
    tokens = sum(e["val_tokens"] for e in evaluations)
    pooled = sum(e["val_loss"] * e["val_tokens"] for e in evaluations) / tokens
    balanced = sum(e["val_loss"] for e in evaluations) / len(evaluations)
    assert result.final["val_nll"] == pytest.approx(pooled, rel=1e-6)
    assert result.final["val_nll_balanced"] == pytest.approx(balanced, rel=1e-6)


def test_centralized_pools_all_data_and_takes_all_steps(small_federation) -> None:
    _, federation = small_federation
    recipe = Recipe(rounds=2, local_steps=3)
    result = Simulator(federation, recipe).run("centralized")
    assert [row["steps"] for row in result.rounds] == [9.0, 9.0]  # 3 clients x 3 steps each round
    assert len(concat_splits([s.train for s in federation.sessions.values()])) == sum(
        s.num_train_samples for s in federation.sessions.values())


def test_local_only_trains_each_client_alone(small_federation) -> None:
    _, federation = small_federation
    result = Simulator(federation, Recipe(rounds=2, local_steps=2)).run("local")
    assert len(result.rounds) == 2 and "test_nll" in result.final and not result.global_params


def test_unknown_mode_is_refused(small_federation) -> None:
    _, federation = small_federation
    with pytest.raises(ValueError, match="unknown simulation mode 'swarm'; known: federated, centralized, local"):
        Simulator(federation, Recipe()).run("swarm")  # type: ignore[arg-type]


def test_rounds_to_reach() -> None:
    rows = [{"round": 1.0, "test_nll": 0.9}, {"round": 2.0, "test_nll": 0.7}, {"round": 3.0, "test_nll": 0.6}]
    assert rounds_to_reach(rows, 0.7) == 2.0
    assert math.isnan(rounds_to_reach(rows, 0.1))


def test_cli_writes_metrics_and_rejects_bad_input(small_federation, tmp_path, capsys, micro_zoo) -> None:
    root, _ = small_federation
    out = tmp_path / "m.jsonl"
    cache = ["--cache-dir", str(micro_zoo.root.parent), "--threads", "1"]
    assert sim_main(["--data", str(root), "--rounds", "1", "--local-steps", "2", "--strategy", "fedcmp",
                     "--strategy-param", "beta=0.2", "--out", str(out), *cache]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["event"] for row in rows] == ["round", "final"]
    assert sim_main(["--data", str(root), "--strategy-param", "beta", *cache]) == 2
    assert "expects KEY=NUMBER" in capsys.readouterr().err
    assert sim_main(["--data", str(tmp_path), *cache]) == 2
    assert "holds no client_* folders" in capsys.readouterr().err
    assert sim_main(["--data", str(root), "--strategy", "fedmagic", *cache]) == 2
    assert "fedavg" in capsys.readouterr().err
