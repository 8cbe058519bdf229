"""`fedcmp-client`: --check's report and exit codes, bad data refused before any coordinator, devices it refuses
before loading anything, its recipe overrides."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedcmp.client import cli
from fedcmp.client.cli import check_device, local_recipe, parse_args
from fedcmp.common.constants import EXIT_OK, EXIT_USAGE
from fedcmp.common.recipe import Recipe, RecipeError


def _backbone_flags(backbones) -> list[str]:
    return ["--vision-model", str(backbones.vision), "--llm", str(backbones.llm), "--threads", "1"]


def test_check_reports_the_data(llava_folder: Callable[[int], Path], backbones, capsys, tmp_path: Path) -> None:
    folder = llava_folder(12)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_caption_tokens: 6\nval_fraction: 0.25\n")
    code = cli.main(["--check", "--data", str(folder), "--recipe", str(recipe), "--workers", "0",
                     *_backbone_flags(backbones)])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    assert "format: llava-json" in out
    assert "samples: 12 rows, 12 usable (9 train / 3 held out), 0 bad" in out
    assert "caption tokens: min 6, mean 6.0, max 6; 12 cut at the recipe's limit" in out  # 6 words + eos, cut to 6
    assert "image sizes (w x h): smallest 40x40, median 40x40, largest 40x40" in out
    assert "projector: linear_1.bias[32], linear_1.weight[32x24]" in out and "check passed" in out


def test_check_counts_bad_samples_and_enforces_the_cap(llava_folder, backbones, capsys) -> None:
    folder = llava_folder(10)
    entries = json.loads((folder / "chat.json").read_text())
    entries[3]["conversations"][1]["value"] = " "
    (folder / "chat.json").write_text(json.dumps(entries))
    (folder / "images" / "00007.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    flags = ["--check", "--data", str(folder), "--workers", "0", *_backbone_flags(backbones)]
    assert cli.main([*flags, "--max-bad-fraction", "0.2"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "samples: 10 rows, 8 usable" in out and "2 bad" in out
    assert "empty caption" in out and "row 7: cannot decode image" in out
    assert cli.main(flags) == EXIT_USAGE  # the default cap: 1%
    assert "1 of 10 samples are bad (10.0%), more than the 1.0% allowed" in capsys.readouterr().err  # at the scan
    assert cli.main([*flags, "--max-bad-fraction", "0.2", "--on-bad-sample", "fail"]) == EXIT_USAGE
    assert "bad sample: chat.json entry 3 (id 'scene-00003'): empty caption" in capsys.readouterr().err


def test_check_refuses_unloadable_backbones(llava_folder, tmp_path: Path, capsys) -> None:
    code = cli.main(["--check", "--data", str(llava_folder(2)), "--vision-model", str(tmp_path),
                     "--llm", str(tmp_path)])
    assert code == EXIT_USAGE and "cannot load the backbones" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["missing data", "bad data", "no server"])
def test_bad_start_exits_2_before_contacting_the_coordinator(problem: str, llava_folder, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def no_contact(*args: object) -> None:
        raise AssertionError("the coordinator was contacted")

    monkeypatch.setattr(cli, "CoordinatorLink", no_contact)
    folder = llava_folder(3)
    (folder / "images" / "00001.png").unlink()
    data = {"missing data": tmp_path / "nowhere", "bad data": folder, "no server": folder}[problem]
    server = [] if problem == "no server" else ["--server", "127.0.0.1:1"]
    assert cli.main([*server, "--data", str(data)]) == EXIT_USAGE
    expected = {"missing data": "does not exist", "bad data": "1 of 3 samples are bad", "no server": "--server is "
                "required"}[problem]
    assert expected in capsys.readouterr().err


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
