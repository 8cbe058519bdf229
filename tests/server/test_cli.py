"""`fedcmp-server`'s start-up: recipe flags, --resume (before and after a commit), unusable state dirs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fedcmp.common.constants import EXIT_USAGE
from fedcmp.common.recipe import Recipe, RecipeError
from fedcmp.server import cli
from fedcmp.server.cli import main, open_run, parse_args
from fedcmp.server.store import RunStore
from fedcmp.server.strategies import available_strategies


def start(state, *flags: str):
    return open_run(parse_args(["--state-dir", str(state), *flags]))


@pytest.mark.parametrize("strategy", available_strategies())
def test_resume_before_the_first_commit_works_for_every_strategy(tmp_path, strategy) -> None:
    start(tmp_path, "--strategy", strategy, "--rounds", "2")
    coordinator = start(tmp_path, "--resume")
    assert coordinator.strategy.name == strategy and coordinator.round == 0
    # The fresh strategy aggregates (its state was not half-loaded from nothing).
    base = {"w": torch.zeros(3, 2)}
    from fedcmp.server.strategies import ClientUpdate

    updates = [ClientUpdate(name, 4, {"w": torch.ones(3, 2)}, {"steps": 5.0}) for name in ("a", "b")]  # fednova: steps
    assert torch.isfinite(coordinator.strategy.aggregate(base, updates)["w"]).all()


def test_resume_may_change_operational_fields_and_keeps_them(tmp_path) -> None:
    start(tmp_path, "--min-clients", "4", "--quorum", "1.0")
    coordinator = start(tmp_path, "--resume", "--min-clients", "2", "--quorum", "0.5", "--client-timeout", "30",
                        "--rounds", "9", "--max-clients", "5")
    recipe = coordinator.recipe
    assert (recipe.min_clients, recipe.quorum, recipe.client_timeout_s, recipe.rounds, recipe.max_clients) == \
        (2, 0.5, 30.0, 9, 5)
    again = start(tmp_path, "--resume")  # a second resume continues with the changed values
    assert again.recipe == recipe


@pytest.mark.parametrize("flags, named", [
    (("--lr", "0.5"), "lr"),
    (("--projector-type", "linear", "--batch-size", "3"), "batch_size, projector_type"),
    (("--set", "strategy_params.beta=0.1"), "strategy_params"),
])
def test_resume_refuses_fields_that_define_the_training(tmp_path, flags, named) -> None:
    start(tmp_path, "--strategy", "fedavgm")
    with pytest.raises(RecipeError, match=f"--resume cannot change {named}: they define the model"):
        start(tmp_path, "--resume", *flags)
    assert Recipe.from_json(RunStore(tmp_path).load_recipe_json()).lr == Recipe().lr


def test_resume_with_a_config_file_compares_field_by_field(tmp_path) -> None:
    start(tmp_path, "--strategy", "fedavgm", "--rounds", "3")
    config = tmp_path.parent / f"{tmp_path.name}.json"
    config.write_text(json.dumps({"strategy": "fedavgm", "rounds": 5, "quorum": 0.75}))
    assert start(tmp_path, "--resume", "--config", str(config)).recipe.rounds == 5
    config.write_text(json.dumps({"rounds": 5}))
    with pytest.raises(RecipeError, match="cannot change strategy"):
        start(tmp_path, "--resume", "--config", str(config))


def test_an_unusable_state_dir_is_a_usage_error(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["--state-dir", str(blocker / "state"), "--port", "0"]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert f"--state-dir {blocker / 'state'} is not usable: Not a directory" in error


def test_a_bad_strategy_is_refused_before_anything_is_written(tmp_path, capsys) -> None:
    assert main(["--state-dir", str(tmp_path / "state"), "--strategy", "fedsomething"]) == EXIT_USAGE
    assert "fedsomething" in capsys.readouterr().err and not RunStore(tmp_path / "state").has_run()


@pytest.mark.parametrize("value, message", [("0", "0 MiB is outside 0.0625-1024"), ("2048", "outside 0.0625-1024"),
                                            ("four", "'four' is not a number of MiB")])
def test_a_stream_window_out_of_range_is_a_usage_error(tmp_path, capsys, value, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--state-dir", str(tmp_path), "--stream-window-mib", value])
    assert exit_info.value.code == EXIT_USAGE and message in capsys.readouterr().err
    assert parse_args(["--state-dir", str(tmp_path), "--stream-window-mib", "0.5"]).stream_window_mib == 0.5


def test_start_up_freezes_what_it_loaded_out_of_garbage_collection(tmp_path, monkeypatch) -> None:
    """The modules and run state are out of every later collection (~8% of the server's CPU in perf)."""
    events = []

    async def serve(*args) -> int:
        events.append("serve")
        return 0

    monkeypatch.setattr(cli, "serve", serve)
    monkeypatch.setattr(cli.gc, "freeze", lambda: events.append("freeze"))
    assert main(["--state-dir", str(tmp_path / "state"), "--port", "0"]) == 0
    assert events == ["freeze", "serve"]


# What a fresh `fedcmp-server` process sees when torch is first imported (libgomp reads its
# environment then, once): the module under test is imported with a hook on `import torch`.
_POLICY_AT_TORCH_IMPORT = """
import builtins, os, sys
real_import, seen = builtins.__import__, []
def hook(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = hook
import fedcmp.server.cli
print(seen[0])
"""


@pytest.mark.parametrize("operator_setting, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_between_regions_unless_the_operator_says_otherwise(operator_setting, expected) -> None:
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if operator_setting is not None:
        env["OMP_WAIT_POLICY"] = operator_setting
    result = subprocess.run([sys.executable, "-c", _POLICY_AT_TORCH_IMPORT], env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == expected
