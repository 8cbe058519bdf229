"""Feature stores: views, concatenation and batches return the rows asked for; the disk cache is keyed,
resumable and never trusted half-written; the live tower gives the cached features."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedcmp.client.data import DataError, DataOptions, scan_data
from fedcmp.client.features import (ConcatFeatures, DiskFeatures, EncodedSplit, FeatureView, concat_splits,
                                    open_features)
from fedcmp.client.model import ProjectorMLLM
from fedcmp.common.recipe import Recipe


class TensorFeatures:
    """A feature store over a tensor in RAM (the test double of the real stores)."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features  # [N, P, H]

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: slice | torch.Tensor) -> torch.Tensor:
        return self.features[index].float()

    def batches(self, index_batches: list[torch.Tensor]):
        return (self[rows] for rows in index_batches)


def _rows(count: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + count, dtype=torch.float32).view(count, 1, 1).expand(count, 2, 3)  # [N, 2, 3]


def test_view_and_concat_index_like_the_tensor() -> None:
    whole = torch.cat([_rows(4), _rows(3, start=4)])  # [7, 2, 3]
    concat = ConcatFeatures([TensorFeatures(_rows(4)), TensorFeatures(_rows(3, start=4))])
    rows = torch.tensor([6, 0, 4, 3, 3])
    assert len(concat) == 7
    assert torch.equal(concat[rows], whole[rows]) and torch.equal(concat[1:6], whole[1:6])
    view = FeatureView(concat, torch.tensor([5, 1, 2]))
    assert torch.equal(view[torch.tensor([2, 0])], whole[torch.tensor([2, 5])])
    assert [batch[:, 0, 0].tolist() for batch in view.batches([torch.tensor([1]), torch.tensor([0, 2])])] == [
        [1.0], [5.0, 2.0]]


def test_split_batches_align_features_and_captions() -> None:
    ids = torch.arange(5).view(5, 1)  # [5, 1]: the caption of row i is the token i
    split = EncodedSplit([f"e{i}" for i in range(5)], TensorFeatures(_rows(5)), ids, torch.ones_like(ids))
    val = split.take(torch.tensor([4, 1]))
    assert val.ids == ["e4", "e1"]
    (batch,) = list(val.batches([torch.tensor([1, 0])]))
    assert batch.features[:, 0, 0].tolist() == [1.0, 4.0] and batch.caption_ids.flatten().tolist() == [1, 4]
    pooled = concat_splits([val, split.take(torch.tensor([0]))])
    (batch,) = list(pooled.batches([torch.tensor([2, 0])]))
    assert batch.features[:, 0, 0].tolist() == [0.0, 4.0] and batch.caption_ids.flatten().tolist() == [0, 4]


# ---- the disk cache and the live tower on tiny random backbones ---------------------------------


class TowerCalls:
    """Counts the vision tower's batches; raises on the `crash_at`-th one (a crash mid-encode)."""

    def __init__(self, model: ProjectorMLLM, crash_at: int | None = None) -> None:
        self.model, self.crash_at, self.calls = model, crash_at, 0
        self.forward = model.image_features

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise RuntimeError("simulated crash")
        return self.forward(pixel_values)


@pytest.fixture
def model_for(make_recipe: Callable[..., Recipe]) -> Callable[..., tuple[ProjectorMLLM, Recipe]]:
    def load(**overrides: object) -> tuple[ProjectorMLLM, Recipe]:
        recipe = make_recipe(**overrides)
        return ProjectorMLLM.from_pretrained(recipe.vision_model, recipe.llm, recipe), recipe

    return load


def _encode(model: ProjectorMLLM, recipe: Recipe, data: Path, cache: Path, **options: object) -> tuple[EncodedSplit, int]:
    tower = TowerCalls(model)
    model.image_features = tower  # type: ignore[method-assign]
    try:
        split = open_features(model, recipe, scan_data(data), DataOptions(feature_cache_dir=cache, workers=0, **options))
    finally:
        del model.image_features
    return split, tower.calls


def test_warm_cache_skips_the_tower_and_matches_the_live_tower(model_for, llava_folder, tmp_path: Path) -> None:
    data = llava_folder(10)
    model, recipe = model_for()
    cold, cold_calls = _encode(model, recipe, data, tmp_path)
    warm, warm_calls = _encode(model, recipe, data, tmp_path)
    assert cold_calls == 3 and warm_calls == 0  # 10 images in batches of 4, then none
    rows = torch.tensor([7, 2, 9, 0])
    assert torch.equal(cold.features[rows], warm.features[rows])
    assert warm.features[rows].dtype == torch.float32 and isinstance(warm.features.base, DiskFeatures)
    live, _ = _encode(model, recipe.model_copy(update={"feature_cache": "off"}), data, tmp_path)
    (live_batch,) = list(live.batches([rows]))  # the tower on this batch only
    assert torch.allclose(live_batch.features, warm.features[rows], rtol=1e-2, atol=1e-2)  # up to bf16 rounding
    with torch.no_grad():
        cached_nll, _ = model.caption_nll(warm.features[rows], warm.caption_ids[rows], warm.caption_mask[rows])
        live_nll, _ = model.caption_nll(live_batch.features, live_batch.caption_ids, live_batch.caption_mask)
    assert torch.allclose(cached_nll, live_nll, rtol=1e-3)  # both modes: the same loss for the same batch
    float32, _ = _encode(model, recipe.model_copy(update={"feature_dtype": "float32"}), data, tmp_path)
    assert torch.equal(float32.features[rows].to(torch.bfloat16).float(), warm.features[rows])


def test_live_tower_with_worker_processes(model_for, llava_folder, tmp_path: Path) -> None:
    data = llava_folder(8)
    model, recipe = model_for(feature_cache="off")
    split = open_features(model, recipe, scan_data(data), DataOptions(feature_cache_dir=tmp_path / "c", workers=2))
    batches = [torch.tensor([5, 1]), torch.tensor([0, 7, 3])]
    for rows, batch in zip(batches, split.batches(batches)):
        assert torch.equal(batch.features, split.features[rows])
    assert not (tmp_path / "c").exists()  # no cache written


def test_live_tower_keeps_its_workers_across_passes(model_for, llava_folder, tmp_path: Path) -> None:
    # A round is a pass; starting the decoding processes once per store, not once per round.
    data = llava_folder(8)
    model, recipe = model_for(feature_cache="off")
    split = open_features(model, recipe, scan_data(data), DataOptions(feature_cache_dir=tmp_path / "c", workers=2))
    live = split.features.base  # the LiveFeatures behind the view of usable rows
    first_pass = [torch.tensor([5, 1]), torch.tensor([0, 7, 3])]
    assert all(torch.equal(batch.features, split.features[rows])
               for rows, batch in zip(first_pass, split.batches(first_pass)))
    workers = {worker.pid for worker in live._loader._iterator._workers}
    second_pass = [torch.tensor([2, 6]), torch.tensor([4])]
    assert all(torch.equal(batch.features, split.features[rows])
               for rows, batch in zip(second_pass, split.batches(second_pass)))
    assert {worker.pid for worker in live._loader._iterator._workers} == workers


def test_a_superseded_live_pass_is_refused_not_fed_the_newer_rows(model_for, llava_folder, tmp_path: Path) -> None:
    data = llava_folder(8)
    model, recipe = model_for(feature_cache="off")
    split = open_features(model, recipe, scan_data(data), DataOptions(feature_cache_dir=tmp_path / "c", workers=2))
    older = split.features.batches([torch.tensor([0]), torch.tensor([1])])
    next(older)
    newer_rows = [torch.tensor([6, 2]), torch.tensor([3])]
    newer = split.features.batches(newer_rows)
    with pytest.raises(RuntimeError, match="newer pass"):
        next(older)
    assert all(torch.equal(features, split.features[rows]) for rows, features in zip(newer_rows, newer))


@pytest.mark.parametrize("change", ["tower weights", "feature layer", "select strategy", "image content"])
def test_cache_is_invalidated(change: str, model_for, llava_folder, tmp_path: Path, backbones) -> None:
    data = llava_folder(6)
    model, recipe = model_for()
    _encode(model, recipe, data, tmp_path)
    if change == "tower weights":
        with torch.no_grad():
            model.llava.model.vision_tower.post_layernorm.weight.add_(0.01)
    elif change == "feature layer":
        model, recipe = model_for(vision_feature_layer=-1)
    elif change == "select strategy":
        model, recipe = model_for(vision_feature_select="full")
    else:
        Image.new("RGB", (40, 40), (255, 255, 255)).save(data / "images" / "00003.png")
    _, calls = _encode(model, recipe, data, tmp_path)
    assert calls == 2  # encoded again


def test_crash_during_encode_resumes_and_is_never_trusted_half_done(model_for, llava_folder, tmp_path: Path) -> None:
    data = llava_folder(14)  # 4 batches of 4, 4, 4, 2
    model, recipe = model_for()
    model.image_features = TowerCalls(model, crash_at=3)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="simulated crash"):
        open_features(model, recipe, scan_data(data), DataOptions(feature_cache_dir=tmp_path / "c", workers=0))
    del model.image_features
    (partial,) = (tmp_path / "c").glob("*.partial")
    assert json.loads((partial / "progress.json").read_text())["done"] == 8
    assert not list((tmp_path / "c").glob("*/manifest.json"))  # nothing complete to trust
    resumed, calls = _encode(model, recipe, data, tmp_path / "c")
    assert calls == 2 and not list((tmp_path / "c").glob("*.partial"))  # only the two batches left
    clean, _ = _encode(model, recipe, data, tmp_path / "clean")
    assert torch.equal(resumed.features[:], clean.features[:])


def test_damaged_cache_files_are_rebuilt(model_for, llava_folder, tmp_path: Path) -> None:
    data = llava_folder(6)
    model, recipe = model_for()
    _encode(model, recipe, data, tmp_path / "c")
    (complete,) = [path for path in (tmp_path / "c").iterdir() if path.is_dir()]
    with open(complete / "features.bin", "r+b") as file:
        file.truncate(100)  # a torn copy
    _, calls = _encode(model, recipe, data, tmp_path / "c")
    assert calls == 2
    (complete / "manifest.json").unlink()
    _, calls = _encode(model, recipe, data, tmp_path / "c")
    assert calls == 2


def test_undecodable_image_is_a_bad_sample_in_both_modes(model_for, llava_folder, tmp_path: Path) -> None:
    data = llava_folder(8)
    (data / "images" / "00005.png").write_bytes((data / "images" / "00005.png").read_bytes()[:60])
    model, recipe = model_for()
    lenient = DataOptions(feature_cache_dir=tmp_path / "c", workers=0, max_bad_fraction=0.2)
    for mode in ("disk", "disk", "off"):  # the warm start reads the reason from the cache manifest
        scanned = scan_data(data, lenient)
        split = open_features(model, recipe.model_copy(update={"feature_cache": mode}), scanned, lenient)
        assert "scene-00005" not in split.ids and len(split) == 7
        assert list(scanned.bad.rows) == [5] and "cannot decode image" in scanned.bad.rows[5]
    with pytest.raises(DataError, match="1 of 8 samples are bad"):
        open_features(model, recipe, scan_data(data), lenient)
