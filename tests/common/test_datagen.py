"""fedcmp-data: LLaVA-format output, the four scenarios' skews, determinism and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedcmp.common import synthetic as syn
from fedcmp.common.datagen import generate_federation, main, quantity_sizes

CLIENTS, PER_CLIENT, TEST = 8, 60, 64


def _make(tmp_path: Path, scenario: str, seed: int = 0, name: str | None = None, **kw) -> Path:
    return generate_federation(tmp_path / (name or scenario), scenario, CLIENTS, PER_CLIENT, TEST, seed, **kw)


def _chat(split: Path) -> list[dict]:
    return json.loads((split / "chat.json").read_text())


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("federations")
    return {s: _make(root, s) for s in ("iid", "concept", "domain", "quantity")}


def test_llava_pretraining_format(federations: dict[str, Path]) -> None:
    out = federations["iid"]
    manifest = json.loads((out / "manifest.json").read_text())
    splits = [out / f"client_{i}" for i in range(CLIENTS)] + [out / "test"]
    assert sorted(p.name for p in out.iterdir()) == sorted([s.name for s in splits] + ["manifest.json"])
    for split, size in zip(splits, manifest["client_sizes"] + [manifest["test"]["size"]]):
        records = _chat(split)
        assert isinstance(records, list) and len(records) == size
        assert len(list((split / "images").iterdir())) == size
        for rec in records[:10]:
            assert set(rec) == {"id", "image", "conversations"}
            human, gpt = rec["conversations"]
            assert human == {"from": "human", "value": "<image>\n"}
            assert gpt["from"] == "gpt" and set(syn.tokenize(gpt["value"])) <= set(syn.vocabulary())
            with Image.open(split / "images" / rec["image"]) as img:
                assert img.mode == "RGB" and img.size == (32, 32)


def test_same_seed_same_bytes(tmp_path: Path, federations: dict[str, Path]) -> None:
    again = _make(tmp_path, "concept")
    assert _tree_digest(again) == _tree_digest(federations["concept"])
    other = _make(tmp_path, "concept", seed=1, name="concept-seed1")
    assert _tree_digest(other) != _tree_digest(again)


def test_test_split_balanced_and_disjoint(federations: dict[str, Path]) -> None:
    for out in federations.values():
        hist = json.loads((out / "manifest.json").read_text())["test"]["histograms"]
        assert set(hist["domain"].values()) == {TEST // len(syn.DOMAINS)}
        assert set(hist["style"].values()) == {TEST // len(syn.STYLE_NAMES)}
        test_ids = [r["id"] for r in _chat(out / "test")]
        client_ids = [r["id"] for i in range(CLIENTS) for r in _chat(out / f"client_{i}")]
        assert len(set(test_ids)) == len(test_ids) and len(set(client_ids)) == len(client_ids)
        assert not set(test_ids) & set(client_ids)
    categories = json.loads((federations["iid"] / "manifest.json").read_text())["test"]["histograms"]["category"]
    assert set(categories) == set(syn.CATEGORIES)
    # one seed, one test set for every scenario but `domain`, whose test split keeps each domain's
    # own caption style as its clients do (same scenes, other captions)
    others = {name: out for name, out in federations.items() if name != "domain"}
    assert len({_tree_digest(out / "test") for out in others.values()}) == 1
    assert _tree_digest(federations["domain"] / "test") != _tree_digest(federations["iid"] / "test")


def test_domain_scenario_test_split_keeps_each_domains_style() -> None:
    from fedcmp.common.datagen import held_out_samples

    paired = held_out_samples(80, np.random.default_rng(0), domain_style=True)
    assert all(sample.style == syn.DOMAIN_STYLE[sample.scene.domain] for sample in paired)
    mixed = held_out_samples(80, np.random.default_rng(0))
    assert any(sample.style != syn.DOMAIN_STYLE[sample.scene.domain] for sample in mixed)


def _dominant_share(out: Path) -> float:
    clients = json.loads((out / "manifest.json").read_text())["clients"]
    return float(np.mean([max(c["histograms"]["category"].values()) / c["size"] for c in clients]))


def test_concept_skew_is_skewed(federations: dict[str, Path]) -> None:
    assert _dominant_share(federations["concept"]) > 0.4
    assert _dominant_share(federations["iid"]) < 0.25


def test_domain_skew_one_domain_and_style_per_client(federations: dict[str, Path]) -> None:
    clients = json.loads((federations["domain"] / "manifest.json").read_text())["clients"]
    domains = []
    for c in clients:
        assert len(c["histograms"]["domain"]) == 1 and len(c["histograms"]["style"]) == 1
        domains.append(next(iter(c["histograms"]["domain"])))
    assert sorted(set(domains)) == sorted(syn.DOMAINS)  # 8 clients cycle the 4 domains


def test_quantity_skew_sizes_and_templates(federations: dict[str, Path]) -> None:
    manifest = json.loads((federations["quantity"] / "manifest.json").read_text())
    sizes = manifest["client_sizes"]
    assert max(sizes) >= 10 * min(sizes) and sum(sizes) == pytest.approx(CLIENTS * PER_CLIENT, abs=CLIENTS)
    templates = []
    for c in manifest["clients"]:
        assert len(c["histograms"]["style"]) == 1 and len(c["histograms"]["template"]) == 1
        templates.append(next(iter(c["histograms"]["template"])))
    assert len(set(templates)) == CLIENTS  # each client its own caption template
    assert len({next(iter(c["histograms"]["style"])) for c in manifest["clients"]}) == len(syn.STYLE_NAMES)
    assert all(max(s) >= 10 * min(s) for s in (quantity_sizes(k, 100 * k) for k in (2, 3, 8, 16)))


def test_image_size_parameter(tmp_path: Path) -> None:
    out = generate_federation(tmp_path / "big", "iid", 2, 3, 4, 0, image_size=48)
    with Image.open(out / "client_0" / "images" / "c0_000000.png") as img:
        assert img.size == (48, 48)


def test_cli_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    args = ["--out", str(out), "--scenario", "domain", "--clients", "4"]
    args += ["--samples-per-client", "5", "--test-samples", "8"]
    assert main(args) == 0
    before = _tree_digest(out)
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert _tree_digest(out) == before
    assert main(args + ["--seed", "1", "--force"]) == 0  # --force replaces a previous output
    assert _tree_digest(out) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs left behind
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert main(["--out", str(foreign), "--force"]) == 2  # never deletes what it did not write
    assert (foreign / "keep.txt").exists()
    assert main(["--out", str(tmp_path / "bad"), "--alpha", "0"]) == 2
