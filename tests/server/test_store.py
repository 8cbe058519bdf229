"""The durable state dir: spilled uploads, atomic commits, resume, refusal to clobber a run."""
from __future__ import annotations

import asyncio
import errno
import io
import json
import threading
import weakref

import pytest
import torch
from safetensors import safe_open

from fedcmp.common.codec import (BlobIntegrityError, BlobLayout, decode_projector, encode_params, encode_projector,
                                 iter_chunks, save_params_file, sha256_hex)
from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.server import store as store_module
from fedcmp.server.store import EncodedGlobal, RunStore, SpilledUpdates, StateError, UploadStorageError

SHAPES = {"linear_1.weight": (4, 3), "linear_1.bias": (4,)}
LAYOUT = BlobLayout.of(SHAPES, "float32")


def params(value: float) -> dict[str, torch.Tensor]:
    return {"linear_1.weight": torch.full((4, 3), value), "linear_1.bias": torch.full((4,), value)}


async def _chunks(blob: bytes, chunk_bytes: int = 16, consumed: list[int] | None = None):
    for chunk in iter_chunks(blob, chunk_bytes):
        if consumed is not None:
            consumed.append(len(chunk))
        yield bytes(chunk)


def spill(store: RunStore, client_id: str, value: float, round_index: int = 1, tamper: bool = False,
          layout: BlobLayout = LAYOUT):
    blob = encode_projector(params(value), layout.wire_dtype)
    sent = blob[:-1] + bytes([blob[-1] ^ 1]) if tamper else blob
    return asyncio.run(store.spill_upload(round_index, client_id, 10, {"train_loss": value}, len(blob),
                                          sha256_hex(blob), _chunks(sent), layout))


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    length = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + length])["__metadata__"]


def leftovers(store: RunStore, round_index: int = 1) -> list[str]:
    directory = store.upload_dir(round_index)
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


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


def test_bfloat16_uploads_are_aggregated_as_float32(tmp_path) -> None:
    store = RunStore(tmp_path)
    spill(store, "c1", 1.5, layout=BlobLayout.of(SHAPES, "bfloat16"))
    update = SpilledUpdates(store.uploads(1))[0]
    assert update.params["linear_1.weight"].dtype == torch.float32
    assert torch.equal(update.params["linear_1.weight"], torch.full((4, 3), 1.5))  # 1.5 is exact in bfloat16


def test_a_corrupt_upload_leaves_nothing_behind(tmp_path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(BlobIntegrityError, match="sha256 mismatch"):
        spill(store, "c1", 1.0, tamper=True)
    assert store.uploads(1) == []
    assert leftovers(store) == []


@pytest.mark.parametrize("tensors, message", [
    ({"linear_1.weight": torch.full((4, 3), float("nan")), "linear_1.bias": torch.zeros(4)},
     "non-finite.*linear_1.weight"),
    ({"linear_1.weight": torch.zeros(4, 3), "linear_1.bias": torch.tensor([0, 0, float("inf"), 0])},
     "non-finite.*linear_1.bias"),
    ({"linear_1.weight": torch.zeros(4, 2), "linear_1.bias": torch.zeros(4)}, "is not the 216 bytes"),
    ({"linear_1.weight": torch.zeros(4, 3)}, "is not the 216 bytes"),
    ({"linear_1.weight": torch.zeros(4, 3, dtype=torch.float16), "linear_1.bias": torch.zeros(4, dtype=torch.float16)},
     "size of the projector in a 2-byte dtype .*F16"),
    ({"linear_1.weight": torch.zeros(4, 3, dtype=torch.int64), "linear_1.bias": torch.zeros(4, dtype=torch.int64)},
     "dtype I64 is refused: this run's wire dtype is float32"),
    ({"linear_1.weight": torch.zeros(4, 3, dtype=torch.float8_e4m3fn),
      "linear_1.bias": torch.zeros(4, dtype=torch.float8_e4m3fn)}, "in a 1-byte dtype .*F8_E4M3.*which this run does not accept"),
    ({"linear_1.weight": torch.zeros(4, 3, dtype=torch.int32), "linear_1.bias": torch.zeros(4, dtype=torch.int32)},
     "dtype I32 is refused: this run's wire dtype is float32"),
    ({"linear_1.weight": torch.zeros(3, 4), "linear_1.bias": torch.zeros(4)},
     r"tensors linear_1.bias\[4\], linear_1.weight\[3x4\] do not match"),
])
def test_uploads_with_bad_contents_are_refused_and_leave_nothing(tmp_path, tensors, message) -> None:
    store = RunStore(tmp_path)
    blob = encode_params(tensors)
    with pytest.raises(BlobIntegrityError, match=message):
        asyncio.run(store.spill_upload(1, "c1", 10, {}, len(blob), sha256_hex(blob), _chunks(blob), LAYOUT))
    assert store.uploads(1) == [] and leftovers(store) == []


def test_a_wrong_size_is_refused_before_any_byte_is_read_or_written(tmp_path) -> None:
    store = RunStore(tmp_path)
    consumed: list[int] = []
    with pytest.raises(BlobIntegrityError, match=f"announced size {2**50} bytes is not the"):
        asyncio.run(store.spill_upload(1, "c1", 10, {}, 2**50, "0" * 64, _chunks(b"x" * 64, consumed=consumed),
                                       LAYOUT))
    assert consumed == [] and not store.upload_dir(1).exists()


def test_concurrent_streams_of_one_client_and_round_publish_once(tmp_path) -> None:
    """The honest stream is half-way when a NaN stream for the same (client, round) arrives."""
    store = RunStore(tmp_path)
    honest = encode_projector(params(1.0), "float32")
    poisoned = encode_projector(params(float("nan")), "float32")
    poisoned_read: list[int] = []

    async def scenario():
        halfway = asyncio.Event()

        async def slow_honest_chunks():
            for index, chunk in enumerate(iter_chunks(honest, 16)):
                if index == 3:
                    halfway.set()
                    await asyncio.sleep(0.2)  # the other stream arrives now
                yield bytes(chunk)

        first = asyncio.create_task(store.spill_upload(1, "c1", 10, {}, len(honest), sha256_hex(honest),
                                                       slow_honest_chunks(), LAYOUT))
        await halfway.wait()
        second = store.spill_upload(1, "c1", 10, {}, len(poisoned), sha256_hex(poisoned),
                                    _chunks(poisoned, consumed=poisoned_read), LAYOUT)
        return await asyncio.gather(first, second)

    published, duplicate = asyncio.run(scenario())
    assert published is not None and duplicate is None and poisoned_read == []
    [upload] = store.uploads(1)
    assert upload.path.read_bytes() == honest
    assert leftovers(store) == ["c1.json", "c1.safetensors"]


def test_a_refused_stream_does_not_block_the_next_one(tmp_path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(BlobIntegrityError, match="non-finite"):
        spill(store, "c1", float("inf"))
    assert spill(store, "c1", 2.0) is not None
    assert spill(store, "c1", 3.0) is None  # already published: nothing read, nothing changed
    assert torch.equal(SpilledUpdates(store.uploads(1))[0].params["linear_1.bias"], torch.full((4,), 2.0))


class FailingDisk(io.RawIOBase):
    """A spill file whose writes fail with `code` (ENOSPC, EIO) and that records the writing threads."""

    def __init__(self, code: int, threads: list[str]) -> None:
        self.code, self.threads = code, threads

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.threads.append(threading.current_thread().name)
        raise OSError(self.code, "injected " + errno.errorcode[self.code])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_a_failing_disk_is_a_storage_error_that_leaves_nothing_and_can_be_retried(tmp_path, monkeypatch, code) -> None:
    store = RunStore(tmp_path)
    threads: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(store, "_spill_file", lambda fd: (__import__("os").close(fd), FailingDisk(code, threads))[1])
        with pytest.raises(UploadStorageError, match="could not store the upload") as caught:
            spill(store, "c1", 1.0)
    assert caught.value.errno == code
    assert threads and all(name.startswith("fedcmp-io") for name in threads)  # written off the event loop
    assert leftovers(store) == []
    assert spill(store, "c1", 1.0) is not None and len(store.uploads(1)) == 1


@pytest.mark.parametrize("damage", ["legacy header", "negative samples", "non-finite metric", "truncated tensors",
                                    "not json"])
def test_a_poisoned_spilled_upload_is_dropped_and_named_on_resume(tmp_path, caplog, damage) -> None:
    store = RunStore(tmp_path)
    spill(store, "bad", 1.0)
    spill(store, "good", 2.0)
    header_file = store.upload_dir(1) / "bad.json"
    header = json.loads(header_file.read_text())
    if damage == "legacy header":  # what an older server spilled: no record of checks
        header.pop("checks")
    elif damage == "negative samples":
        header["num_samples"] = -5
    elif damage == "non-finite metric":
        header["metrics"] = {"train_loss": float("nan")}
    elif damage == "truncated tensors":
        path = store.upload_dir(1) / "bad.safetensors"
        path.write_bytes(path.read_bytes()[:-4])
    header_file.write_text("{trunc" if damage == "not json" else json.dumps(header))
    assert [upload.client_id for upload in RunStore(tmp_path).uploads(1)] == ["good"]
    assert "dropped the spilled upload bad of round 1" in caplog.text
    assert leftovers(store) == ["good.json", "good.safetensors"]


def test_unsafe_client_ids_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a safe name"):
        RunStore(tmp_path).upload_path(1, "../etc/passwd")
    with pytest.raises(ValueError, match="not a safe name"):
        RunStore(tmp_path).upload_path(1, "c1\n")


def test_a_global_is_encoded_once_per_version_and_wire_dtype(tmp_path) -> None:
    store = RunStore(tmp_path)
    store.commit_initial_global(store.create("{}", "fedavg"), params(0.5))
    first = store.encoded_global(0, "float32")
    assert store.encoded_global(0, "float32") is first
    half = store.encoded_global(0, "bfloat16")
    assert BlobLayout.of(SHAPES, "bfloat16").admits_size(half.size) and half.size < first.size
    blob = b"".join(half.chunks)
    assert len(blob) == half.size and sha256_hex(blob) == half.sha256
    assert torch.equal(decode_projector(blob)["linear_1.bias"], torch.full((4,), 0.5))  # 0.5 is exact in bfloat16
    with safe_open(store.global_path(0), framework="pt") as stored:  # the download keeps the global's provenance
        assert stored.metadata() == safetensors_metadata(blob)


def test_a_global_is_mapped_for_aggregation_not_read(tmp_path, monkeypatch) -> None:
    """Its pages stay page cache the kernel can drop, not a second projector of the server's memory."""
    store = RunStore(tmp_path)
    store.commit_initial_global(store.create("{}", "fedavg"), params(0.5))
    monkeypatch.setattr(type(store.global_path(0)), "read_bytes", lambda path: pytest.fail(f"{path} was read"))
    loaded = store.load_global(0)
    assert torch.equal(loaded["linear_1.bias"], torch.full((4,), 0.5))
    assert all(not tensor.untyped_storage().resizable() for tensor in loaded.values())  # views of the mapping


@pytest.mark.parametrize("first_piece", [0, 1, 127, 128, 300, 70_000])
def test_the_served_messages_are_the_blob_chunks_a_download_expects(first_piece: int) -> None:
    """Built by hand (a varint-framed data field, then the other fields), parsed by protobuf."""
    blob = bytes(range(256)) * 300
    pieces = [blob[:first_piece], blob[first_piece:first_piece + 5]]
    encoded = EncodedGlobal.of(3, "float32", pieces, first_piece + 5, "ab" * 32)
    offsets = [0, first_piece]
    assert [pb.BlobChunk.FromString(message) for message in encoded.messages] == [
        pb.BlobChunk(data=piece, offset=offset, total_size=first_piece + 5, sha256="ab" * 32)
        for piece, offset in zip(pieces, offsets)]
    assert [bytes(chunk) for chunk in encoded.chunks] == pieces


def test_the_old_versions_chunks_are_let_go_before_the_new_ones_are_read(tmp_path, monkeypatch) -> None:
    """At most one encoded global in memory: the server's memory stays flat across rounds."""
    store = RunStore(tmp_path)
    record = store.commit_initial_global(store.create("{}", "fedavg"), params(0.5))
    old = weakref.ref(store.encoded_global(0, "float32"))
    store.commit_round(record, 1, params(1.0), {}, {"round": 1})
    real_encode = store._encode_global
    held_while_reading = []

    def encode(version: int, wire_dtype: str):
        held_while_reading.append(old() is not None)
        return real_encode(version, wire_dtype)

    monkeypatch.setattr(store, "_encode_global", encode)
    assert torch.equal(decode_projector(b"".join(store.encoded_global(1, "float32").chunks))["linear_1.bias"],
                       torch.full((4,), 1.0))
    assert held_while_reading == [False]


def test_a_float32_global_is_served_as_its_file_and_any_other_is_encoded(tmp_path) -> None:
    store = RunStore(tmp_path)
    store.commit_initial_global(store.create("{}", "fedavg"), params(0.5))
    served = store.encoded_global(0, "float32")
    assert b"".join(served.chunks) == store.global_path(0).read_bytes()
    assert served.sha256 == sha256_hex(store.global_path(0).read_bytes())
    other = RunStore(tmp_path / "other")  # a global file in bfloat16 (not what the coordinator writes)
    other.commit_initial_global(other.create("{}", "fedavg"), params(0.5))
    save_params_file(other.global_path(0), {key: value.bfloat16() for key, value in params(0.5).items()})
    blob = b"".join(other.encoded_global(0, "float32").chunks)
    assert LAYOUT.admits_size(len(blob)) and decode_projector(blob)["linear_1.bias"].dtype == torch.float32


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


def test_each_commit_keeps_three_globals_and_no_committed_uploads(tmp_path) -> None:
    store = RunStore(tmp_path)
    record = store.commit_initial_global(store.create("{}", "fedavg"), params(0.0))
    spill(store, "late", 1.0, round_index=1)
    spill(store, "next", 1.0, round_index=6)  # the open round's uploads stay
    for round_index in (2, 3, 4, 5):  # a gap (v1 never written) still leaves only the last three
        record = store.commit_round(record, round_index, params(float(round_index)), {"m": torch.ones(1)},
                                    {"round": round_index})
    assert sorted(p.name for p in (tmp_path / "global").iterdir()) == [f"v{n}.safetensors" for n in (3, 4, 5)]
    assert sorted(p.name for p in (tmp_path / "strategy").iterdir()) == [f"r{n}.safetensors" for n in (3, 4, 5)]
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir()) == ["r6", "spare"]


def test_a_commit_deletes_the_oldest_version_before_it_writes_the_new_one(tmp_path, monkeypatch) -> None:
    """So the kernel hands the freed pages to the new files at once (docs/decisions.md)."""
    store = RunStore(tmp_path)
    record = store.commit_initial_global(store.create("{}", "fedavg"), params(0.0))
    for round_index in (1, 2):
        record = store.commit_round(record, round_index, params(1.0), {"m": torch.ones(1)}, {"round": round_index})
    on_disk_at_write: list[list[str]] = []
    real_save = store_module.save_params_file

    def save(path, tensors, metadata=None) -> None:
        on_disk_at_write.append(sorted(p.name for p in path.parent.iterdir()))
        real_save(path, tensors, metadata)

    monkeypatch.setattr(store_module, "save_params_file", save)
    store.commit_round(record, 3, params(3.0), {"m": torch.ones(1)}, {"round": 3})
    assert on_disk_at_write == [["v1.safetensors", "v2.safetensors"], ["r1.safetensors", "r2.safetensors"]]


def test_the_next_rounds_uploads_overwrite_the_last_committed_rounds_tensor_files(tmp_path) -> None:
    store = RunStore(tmp_path)
    record = store.commit_initial_global(store.create("{}", "fedavg"), params(0.0))
    for client_id in ("a", "b"):
        spill(store, client_id, 1.0, round_index=1)
    record = store.commit_round(record, 1, params(1.0), {"m": torch.ones(1)}, {"round": 1})
    spares = {path.stat().st_ino for path in store.spare_dir.iterdir()}
    assert len(spares) == 2 and not store.upload_dir(1).exists()
    for spare in store.spare_dir.iterdir():  # longer than the next upload, which must be cut to its own size
        with open(spare, "ab") as handle:
            handle.write(b"stale bytes")
    spill(store, "c", 2.0, round_index=2)
    (upload,) = store.uploads(2)  # published: its size is its header's
    inode = upload.path.stat().st_ino
    assert inode in spares and upload.path.stat().st_size == len(encode_projector(params(2.0), "float32"))
    assert torch.equal(SpilledUpdates([upload])[0].params["linear_1.weight"], torch.full((4, 3), 2.0))
    record = store.commit_round(record, 2, params(2.0), {"m": torch.ones(1)}, {"round": 2})
    assert [path.stat().st_ino for path in store.spare_dir.iterdir()] == [inode]  # round 1's unused spare: surplus
    store.commit_final(record, {"val_loss": 0.5})
    assert not store.spare_dir.exists()


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
