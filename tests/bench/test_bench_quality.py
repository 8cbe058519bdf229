"""bench_quality's method filter (`--methods`) and its report on a subset of the methods, on fabricated rows."""
from __future__ import annotations

import pytest
from bench_quality import main, report, select_methods, summarise
from quality import QUICK, SCENARIOS, Method, tuned_methods


def test_select_methods_keeps_the_named_ones_and_fedavg_in_benchmark_order() -> None:
    methods = tuned_methods()
    assert select_methods(methods, None) == methods
    chosen = select_methods(methods, ["fedcmp-no-norm-bound", "fedcmp"])
    assert [m.name for m in chosen] == ["fedavg", "fedcmp", "fedcmp-no-norm-bound"]
    assert chosen[1].recipe_overrides == next(m for m in methods if m.name == "fedcmp").recipe_overrides
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['fedcmpp'\]; known: fedavg, "):
        select_methods(methods, ["fedcmp", "fedcmpp"])


def test_unknown_method_is_a_usage_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--methods", "fedcmpp"])
    assert exit_info.value.code == 2
    assert "unknown method(s) ['fedcmpp']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def fake_row(scenario: str, seed: int, method: str, nll: float) -> dict:
    rounds = [{"round": r, "test_nll": nll + 0.1 * (2 - r), "update_cosine": 0.5} for r in (1, 2)]
    return {"scenario": scenario, "seed": seed, "method": method, "rounds": rounds,
            "final": {"test_nll": nll, "test_retrieval": 0.3}}


def test_report_of_a_subset_without_the_centralized_bound() -> None:
    methods = select_methods(tuned_methods(), ["fedcmp", "fedcmp-no-norm-bound"])
    nll = {"fedavg": 1.0, "fedcmp": 0.9, "fedcmp-no-norm-bound": 0.9}
    rows = [fake_row(s, seed, m.name, nll[m.name] + 0.01 * seed) for s in SCENARIOS for seed in (0, 1, 2)
            for m in methods]
    text = report(summarise(rows, methods), rows, methods, [0, 1, 2], QUICK, 60.0, "cmd", [])
    assert "| fedcmp-no-norm-bound | 0.9100 | 0.9100 | 0.9100 | 0.9100 |" in text
    assert "fedprox" not in text  # only the methods that ran
    assert "gap closed: n/a (`centralized` was not run)" in text
    assert "Full Fed-CMP against `fedcmp-no-norm-bound`" in text
    assert "  - iid: 0.9100 ± 0.0082 vs 0.9100 ± 0.0082, +0.00 std" in text


def test_select_methods_keeps_each_method_once() -> None:
    chosen = select_methods([Method("fedavg"), Method("fedcmp")], ["fedavg", "fedcmp", "fedcmp"])
    assert [m.name for m in chosen] == ["fedavg", "fedcmp"]
