"""`fedcmp-client`'s data side: --check's report and exit codes, and bad data refused before any coordinator."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedcmp.client import cli
from fedcmp.common.constants import EXIT_OK, EXIT_USAGE


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
