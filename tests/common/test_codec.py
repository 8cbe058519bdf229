"""Blob codec: safetensors round trip, chunking, integrity checks, atomic files."""
from __future__ import annotations

import errno

import pytest
import torch

from fedcmp.common.codec import (BlobIntegrityError, BlobReceiver, decode_params, encode_params, iter_chunks,
                                 load_params_file, receive_blob, save_params_file, sha256_hex)


def projector(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"linear_1.weight": torch.randn(64, 32, generator=generator), "linear_1.bias": torch.randn(64, generator=generator),
            "linear_2.weight": torch.randn(64, 64, generator=generator), "linear_2.bias": torch.randn(64, generator=generator)}


def test_round_trip_is_exact_and_keeps_keys() -> None:
    params = projector()
    decoded = decode_params(encode_params(params))
    assert decoded.keys() == params.keys()
    assert all(torch.equal(decoded[key], params[key]) for key in params)


def test_non_contiguous_tensors_are_encoded() -> None:
    params = {"linear_1.weight": torch.randn(8, 4).t()}
    assert torch.equal(decode_params(encode_params(params))["linear_1.weight"], params["linear_1.weight"])


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1024, 10**9])
def test_chunks_reassemble_to_the_same_blob(chunk_bytes: int) -> None:
    blob = encode_params(projector())
    chunks = list(iter_chunks(blob, chunk_bytes))
    assert all(len(chunk) <= chunk_bytes for chunk in chunks)
    assert receive_blob((bytes(c) for c in chunks), len(blob), sha256_hex(blob)) == blob


def test_empty_blob_is_one_empty_chunk() -> None:
    assert [bytes(c) for c in iter_chunks(b"")] == [b""]


def test_sha256_mismatch_is_detected() -> None:
    blob = encode_params(projector())
    tampered = bytearray(blob)
    tampered[-1] ^= 0xFF
    with pytest.raises(BlobIntegrityError, match="sha256 mismatch"):
        receive_blob(iter_chunks(bytes(tampered)), len(blob), sha256_hex(blob))


def test_truncated_and_oversized_transfers_are_detected() -> None:
    blob = encode_params(projector())
    with pytest.raises(BlobIntegrityError, match="received .* announced"):
        receive_blob([blob[:-10]], len(blob), sha256_hex(blob))
    receiver = BlobReceiver(len(blob) - 1, sha256_hex(blob))
    with pytest.raises(BlobIntegrityError, match="more than the announced"):
        receiver.add(blob)


def test_garbage_is_not_decoded() -> None:
    with pytest.raises(BlobIntegrityError, match="not a valid safetensors blob"):
        decode_params(b"definitely not safetensors")


def test_file_round_trip_and_missing_file(tmp_path) -> None:
    path = tmp_path / "nested" / "p.safetensors"
    save_params_file(path, projector(1))
    assert torch.equal(load_params_file(path)["linear_2.bias"], projector(1)["linear_2.bias"])
    assert [p.name for p in path.parent.iterdir()] == ["p.safetensors"]  # no temp files left behind
    with pytest.raises(BlobIntegrityError, match="cannot read"):
        load_params_file(tmp_path / "absent.safetensors")


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    from fedcmp.common import codec

    target = tmp_path / "run.json"
    codec.write_atomic(target, b"old")

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(codec.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        codec.write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and sorted(path.name for path in tmp_path.iterdir()) == ["run.json"]
