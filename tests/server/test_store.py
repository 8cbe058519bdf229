"""The durable state dir: spilled uploads, atomic commits, resume, refusal to clobber a run."""
from __future__ import annotations

import asyncio
import json

import pytest
import torch

from fedcmp.common.codec import BlobIntegrityError, encode_params, iter_chunks, sha256_hex
from fedcmp.server.store import RunStore, SpilledUpdates, StateError


def params(value: float) -> dict[str, torch.Tensor]:
    return {"linear_1.weight": torch.full((4, 3), value), "linear_1.bias": torch.full((4,), value)}


async def _chunks(blob: bytes, chunk_bytes: int = 16):
    for chunk in iter_chunks(blob, chunk_bytes):
        yield bytes(chunk)


def spill(store: RunStore, client_id: str, value: float, round_index: int = 1, tamper: bool = False):
    blob = encode_params(params(value))
    sent = blob[:-1] + bytes([blob[-1] ^ 1]) if tamper else blob
    return asyncio.run(store.spill_upload(round_index, client_id, 10, {"train_loss": value}, len(blob),
                                          sha256_hex(blob), _chunks(sent)))


def test_spilled_uploads_are_listed_and_loaded_lazily_in_client_order(tmp_path) -> None:
    store = RunStore(tmp_path)
    spill(store, "zeta", 2.0)
    spill(store, "alpha", 1.0)
    updates = SpilledUpdates(store.uploads(1))
    assert len(updates) == 2
    assert [updates[i].client_id for i in range(2)] == ["alpha", "zeta"]
    assert torch.equal(updates[1].params["linear_1.bias"], torch.full((4,), 2.0))
    assert updates[0].metrics == {"train_loss": 1.0} and updates[0].num_samples == 10
    assert store.has_upload(1, "alpha") and not store.has_upload(2, "alpha")


def test_a_corrupt_upload_leaves_nothing_behind(tmp_path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(BlobIntegrityError, match="sha256 mismatch"):
        spill(store, "c1", 1.0, tamper=True)
    assert store.uploads(1) == []
    assert list(store.upload_dir(1).iterdir()) == []


@pytest.mark.parametrize("params, message", [
    ({"linear_1.weight": torch.full((4, 3), float("nan")), "linear_1.bias": torch.zeros(4)}, "non-finite.*linear_1.weight"),
    ({"linear_1.weight": torch.zeros(4, 2), "linear_1.bias": torch.zeros(4)}, "do not match the projector"),
    ({"linear_1.weight": torch.zeros(4, 3)}, "do not match the projector"),
])
def test_uploads_with_bad_contents_are_refused_and_leave_nothing(tmp_path, params, message) -> None:
    store = RunStore(tmp_path)
    blob = encode_params(params)
    expected = {"linear_1.weight": [4, 3], "linear_1.bias": [4]}
    with pytest.raises(BlobIntegrityError, match=message):
        asyncio.run(store.spill_upload(1, "c1", 10, {}, len(blob), sha256_hex(blob), _chunks(blob), expected))
    assert store.uploads(1) == [] and list(store.upload_dir(1).iterdir()) == []


def test_unsafe_client_ids_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a safe name"):
        RunStore(tmp_path).upload_path(1, "../etc/passwd")


def test_commit_then_resume_sees_exactly_the_committed_state(tmp_path) -> None:
    store = RunStore(tmp_path)
    record = store.create('{"rounds": 3}', "fedavg")
    record = store.commit_initial_global(record, params(0.0))
    spill(store, "c1", 1.0)
    record = store.commit_round(record, 1, params(1.0), {"momentum": torch.ones(2)}, {"round": 1, "train_loss": 0.5})
    reopened = RunStore(tmp_path).load()
    assert (reopened.committed_round, reopened.global_version, reopened.strategy) == (1, 1, "fedavg")
    assert reopened.projector_shapes == {"linear_1.weight": [4, 3], "linear_1.bias": [4]}
    assert torch.equal(store.load_global(1)["linear_1.weight"], torch.ones(4, 3))
    assert torch.equal(store.load_strategy_state(1)["momentum"], torch.ones(2))
    assert store.uploads(1) == []  # a committed round's uploads are no longer needed
    lines = [json.loads(line) for line in store.metrics_file.read_text().splitlines()]
    assert lines == [{"event": "round", "round": 1, "train_loss": 0.5}]
    final = store.commit_final(reopened, {"val_loss": 0.25})
    assert RunStore(tmp_path).load().done and final.final_metrics == {"val_loss": 0.25}


def test_old_versions_are_pruned_but_the_predecessor_is_kept(tmp_path) -> None:
    store = RunStore(tmp_path)
    record = store.commit_initial_global(store.create("{}", "fedavg"), params(0.0))
    for round_index in (1, 2, 3):
        record = store.commit_round(record, round_index, params(float(round_index)), {}, {"round": round_index})
    assert sorted(p.name for p in (tmp_path / "global").iterdir()) == ["v2.safetensors", "v3.safetensors"]


def test_an_existing_run_is_never_overwritten(tmp_path) -> None:
    store = RunStore(tmp_path)
    store.create("{}", "fedavg")
    with pytest.raises(StateError, match="already holds a run.*--resume"):
        RunStore(tmp_path).create("{}", "fedavg")


def test_resume_without_a_run_and_with_a_corrupt_record(tmp_path) -> None:
    with pytest.raises(StateError, match="holds no run"):
        RunStore(tmp_path / "empty").load()
    store = RunStore(tmp_path)
    store.create("{}", "fedavg")
    store.run_file.write_text("{truncated")
    with pytest.raises(StateError, match="corrupt"):
        store.load()
