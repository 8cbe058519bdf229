"""Where a process stands among its client's ranks: torchrun's environment, one GPU per rank,
enough examples per step for every rank. (Two real ranks: tests/integration/test_multi_rank_client.py.)"""
from __future__ import annotations

from collections.abc import Callable

import pytest

from fedcmp.client.distributed import Ranks
from fedcmp.common.recipe import Recipe, RecipeError


def test_ranks_from_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    alone = Ranks.from_env()
    assert (alone.rank, alone.world_size, alone.is_main) == (0, 1, True)
    assert alone.device("cuda") == "cuda" and alone.device("cuda:3") == "cuda:3"
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ranks = Ranks.from_env()
    assert (ranks.rank, ranks.world_size, ranks.is_main) == (5, 8, False)
    assert ranks.device("cuda") == "cuda:1" and ranks.device("cpu") == "cpu"


def test_one_gpu_cannot_hold_several_ranks() -> None:
    with pytest.raises(ValueError, match="names one GPU, but this client runs 2 ranks; pass --device cuda"):
        Ranks(rank=1, world_size=2, local_rank=1).device("cuda:3")


def test_every_rank_needs_an_example_of_each_step(make_recipe: Callable[..., Recipe]) -> None:
    ranks = Ranks(rank=0, world_size=4)
    ranks.check_batch(make_recipe(batch_size=4))
    with pytest.raises(RecipeError, match="batch_size 3 cannot feed 4 ranks"):
        ranks.check_batch(make_recipe(batch_size=3))
