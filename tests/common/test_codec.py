"""Blob codec: safetensors round trip, wire layout and dtypes, streamed checks, chunking, files."""
from __future__ import annotations

import errno
import json
import re
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file as safetensors_load_file

from fedcmp.common.codec import (MAX_METADATA_BYTES, WIRE_DTYPES, BlobIntegrityError, BlobLayout, BlobReceiver, ProjectorStreamCheck,
                                 decode_params, decode_projector, encode_params, encode_projector, iter_chunks,
                                 joined_chunks, load_params_file, map_projector_file, parts_digest, projector_parts,
                                 receive_blob, save_params_file, sha256_hex, through_wire)


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


def test_a_file_is_written_from_the_tensors_and_reads_back_exactly(tmp_path) -> None:
    """Every dtype a strategy state may hold, a 0-d, an empty and a non-contiguous tensor; metadata kept."""
    params = {"w": torch.randn(6, 4).t(), "step": torch.tensor(7), "h": torch.randn(5, dtype=torch.float64),
              "b": torch.randn(3).to(torch.bfloat16), "mask": torch.tensor([True, False]), "none": torch.zeros(0),
              "i8": torch.tensor([-3, 4], dtype=torch.int8)}
    save_params_file(tmp_path / "s.safetensors", params, {"z": "1", "a": 'q"uote'})
    loaded = safetensors_load_file(tmp_path / "s.safetensors")
    assert loaded.keys() == params.keys()
    assert all(loaded[key].dtype == params[key].dtype and torch.equal(loaded[key], params[key]) for key in params)
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as handle:
        assert handle.metadata() == {"z": "1", "a": 'q"uote'}
    with pytest.raises(ValueError, match="cannot store dtype torch.complex64"):
        save_params_file(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_a_float32_projector_file_is_a_wire_blob_the_stream_check_admits(tmp_path) -> None:
    params = projector()
    save_params_file(tmp_path / "g.safetensors", params, {"fedcmp.round": "3"})
    blob = (tmp_path / "g.safetensors").read_bytes()
    check = ProjectorStreamCheck(BlobLayout.of(projector_shapes_of(params), "float32"), len(blob))
    for chunk in iter_chunks(blob, 1000):
        check.add(chunk)
    assert all(torch.equal(decode_projector(blob)[key], params[key]) for key in params)


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


def projector_shapes_of(params: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in params.items()}


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
def test_the_layout_is_exactly_what_safetensors_writes(wire_dtype: str) -> None:
    params = projector()
    layout = BlobLayout.of(projector_shapes_of(params), wire_dtype)
    blob = encode_projector(params, wire_dtype)
    assert len(blob) == layout.size and blob[: len(layout.header)] == layout.header


def test_bfloat16_halves_the_bytes_and_is_exact_for_bfloat16_values() -> None:
    params = {key: value.to(torch.bfloat16).float() for key, value in projector().items()}
    blob = encode_projector(params, "bfloat16")
    assert len(blob) < 0.51 * len(encode_projector(params, "float32"))
    decoded = decode_projector(blob)
    assert all(decoded[key].dtype == torch.float32 and torch.equal(decoded[key], params[key]) for key in params)
    rounded = decode_projector(encode_projector(projector(), "bfloat16"))  # other values: rounded, 8 mantissa bits
    assert all(torch.allclose(rounded[key], projector()[key], rtol=2**-8, atol=0) for key in rounded)


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
def test_through_wire_is_what_the_receiver_decodes(wire_dtype: str) -> None:
    params = projector()
    travelled = through_wire(params, wire_dtype)
    decoded = decode_projector(encode_projector(params, wire_dtype))
    assert all(torch.equal(travelled[key], decoded[key]) for key in params)
    if wire_dtype == "float32":  # the float32 wire is the identity, without a copy
        assert all(travelled[key].data_ptr() == params[key].data_ptr() for key in params)


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
@pytest.mark.parametrize("chunk_bytes", [1, 3, 1000, 10**9])
def test_the_stream_check_accepts_a_good_blob_in_any_chunking(wire_dtype: str, chunk_bytes: int) -> None:
    params = projector()
    blob = encode_projector(params, wire_dtype, metadata={"fedcmp.round": "3"})
    check = ProjectorStreamCheck(BlobLayout.of(projector_shapes_of(params), wire_dtype), len(blob))
    for chunk in iter_chunks(blob, chunk_bytes):
        check.add(chunk)


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_stream_check_names_the_tensor_holding_a_non_finite_value(wire_dtype: str, bad: float) -> None:
    params = projector()
    params["linear_2.weight"][17, 5] = bad
    blob = encode_projector(params, wire_dtype)
    check = ProjectorStreamCheck(BlobLayout.of(projector_shapes_of(params), wire_dtype), len(blob))
    with pytest.raises(BlobIntegrityError, match=r"non-finite values \(NaN/inf\) in linear_2.weight"):
        for chunk in iter_chunks(blob, 3):  # elements split across chunks
            check.add(chunk)


@pytest.mark.parametrize("metadata, message", [
    ({"note": "x" * (MAX_METADATA_BYTES + 1)}, "a safetensors header of .* bytes is refused"),
    ({"round": 3}, None),  # safetensors itself refuses non-string metadata when encoding
])
def test_metadata_is_bounded(metadata, message) -> None:
    params = projector()
    layout = BlobLayout.of(projector_shapes_of(params), "float32")
    if message is None:
        with pytest.raises(Exception):
            encode_params(params, metadata=metadata)
        return
    blob = encode_params(params, metadata=metadata)
    assert not layout.admits_size(len(blob))
    with pytest.raises(BlobIntegrityError, match=message):
        ProjectorStreamCheck(layout, len(blob)).add(blob)


def test_a_header_that_does_not_add_up_to_the_announced_size_is_refused() -> None:
    params = projector()
    layout = BlobLayout.of(projector_shapes_of(params), "float32")
    blob = encode_params(params, metadata={"a": "b"})
    with pytest.raises(BlobIntegrityError, match="do not make the announced"):
        ProjectorStreamCheck(layout, len(blob) + 8).add(blob)


def test_a_size_names_the_dtype_it_belongs_to() -> None:
    layout = BlobLayout.of(projector_shapes_of(projector()), "float32")
    as_float16 = len(encode_params({key: value.half() for key, value in projector().items()}))
    assert re.search(r"in a 2-byte dtype \(.*F16.*\), which this run does not accept", layout.explain_size(as_float16))
    assert "dtype" not in layout.explain_size(7).split("wire dtype")[1]


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
def test_a_mapped_projector_file_reads_as_float32(tmp_path, wire_dtype: str) -> None:
    path = tmp_path / "upload.safetensors"
    path.write_bytes(encode_projector(projector(), wire_dtype))
    mapped = map_projector_file(path)
    expected = {key: value.float() for key, value in safetensors_load_file(path).items()}
    assert mapped.keys() == expected.keys()
    assert all(mapped[key].dtype == torch.float32 and torch.equal(mapped[key], expected[key]) for key in expected)
    if wire_dtype == "float32":  # views of one mapping, at the file's offsets: nothing was copied
        spans = {key: start for key, start, _ in BlobLayout.of(projector_shapes_of(projector()), wire_dtype).spans}
        base = mapped["linear_1.bias"].data_ptr() - spans["linear_1.bias"]
        assert all(mapped[key].data_ptr() - base == spans[key] for key in spans)
    with pytest.raises(BlobIntegrityError, match="cannot map"):
        map_projector_file(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
def test_projector_parts_are_the_safetensors_blob_without_copying_the_tensors(wire_dtype: str) -> None:
    params = projector()
    parts = projector_parts(params, wire_dtype, metadata={"fedcmp.round": "3"})
    blob = b"".join(parts)
    (length,) = struct.unpack("<Q", blob[:8])
    assert json.loads(blob[8 : 8 + length])["__metadata__"] == {"fedcmp.round": "3"}
    decoded = safetensors_load(blob)
    assert all(torch.equal(decoded[key].float(), through_wire(params, wire_dtype)[key]) for key in params)
    assert parts_digest(parts) == (len(blob), sha256_hex(blob))
    if wire_dtype == "float32":  # each tensor's part is its own storage
        addresses = {np.frombuffer(part, dtype=np.uint8).ctypes.data for part in parts[1:]}
        assert addresses == {value.data_ptr() for value in params.values()}


@pytest.mark.parametrize("wire_dtype", list(WIRE_DTYPES))
def test_a_received_projector_decodes_as_safetensors_reads_it_into_views_of_the_buffer(wire_dtype: str) -> None:
    blob = encode_projector(projector(), wire_dtype, metadata={"fedcmp.round": "3"})
    received = bytearray(blob)
    decoded = decode_projector(received)
    expected = {key: value.float() for key, value in safetensors_load(blob).items()}
    assert decoded.keys() == expected.keys()
    assert all(decoded[key].dtype == torch.float32 and torch.equal(decoded[key], expected[key]) for key in expected)
    start = torch.frombuffer(received, dtype=torch.uint8).data_ptr()
    inside = [start <= value.data_ptr() < start + len(received) for value in decoded.values()]
    assert all(inside) if wire_dtype == "float32" else not any(inside)  # bfloat16 is widened into new tensors


def _with_header(entries: dict, data: bytes) -> bytearray:
    text = json.dumps(entries).encode()
    return bytearray(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("blob, reason", [
    (bytearray(b"\xff" * 8 + b"{}"), "more than the blob holds"),
    (bytearray(b"\x02\x00\x00\x00\x00\x00\x00\x00[]"), "not a projector blob"),
    (_with_header({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)), "w is F16, not a wire dtype"),
    (_with_header({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)), r"offsets \[0, 8\)"),
    (_with_header({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), "do not hold its shape"),
    (_with_header({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)), "data_offsets"),
])
def test_a_malformed_projector_blob_is_refused_with_a_reason(blob: bytearray, reason: str) -> None:
    with pytest.raises(BlobIntegrityError, match=reason):
        decode_projector(blob)


@pytest.mark.parametrize("chunk_bytes", [1, 3, 5, 1024])
def test_joined_chunks_cut_the_concatenation_of_parts_at_every_chunk_size(chunk_bytes: int) -> None:
    parts = [b"abc", memoryview(b""), memoryview(bytearray(b"defgh")), b"ijklmnop"]
    chunks = list(joined_chunks(parts, chunk_bytes))
    assert b"".join(chunks) == b"abcdefghijklmnop"
    assert all(len(chunk) == chunk_bytes for chunk in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk_bytes
    assert list(joined_chunks([b"", memoryview(b"")], chunk_bytes)) == [b""]
    with pytest.raises(ValueError, match="positive"):
        next(joined_chunks(parts, 0))
