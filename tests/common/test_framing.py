"""Protobuf framing by hand: varints, BlobChunks framed once and read as views, upload chunks read as views."""
from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.common.framing import blob_chunk_message, parse_blob_chunk, parse_upload_message, varint, varint_at


@pytest.mark.parametrize("value", [1, 127, 128, 300, 2**21, 2**63 - 1])
def test_varints_read_back_as_protobuf_writes_them(value: int) -> None:
    serialized = pb.BlobChunk(offset=value).SerializeToString()  # tag 0x10, then the varint
    assert serialized == b"\x10" + varint(value) and varint_at(serialized, 1) == (value, len(serialized))


def test_a_cut_varint_is_no_varint() -> None:
    assert varint_at(b"\xff\xff", 0)[0] == -1 and varint_at(b"", 0)[0] == -1


@pytest.mark.parametrize("size", [0, 1, 127, 128, 70_000])
def test_a_chunk_is_a_view_of_the_received_bytes(size: int) -> None:
    chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw = pb.UploadMessage(chunk=chunk).SerializeToString()
    parsed = parse_upload_message(raw)
    assert isinstance(parsed, memoryview) and parsed.obj is raw and bytes(parsed) == chunk


@pytest.mark.parametrize("message", [pb.UploadMessage(header=pb.UploadHeader(client_id="a", size=3)),
                                     pb.UploadMessage()])
def test_other_messages_are_parsed_by_protobuf(message: pb.UploadMessage) -> None:
    assert parse_upload_message(message.SerializeToString()) == message


def test_a_chunk_followed_by_more_fields_is_whatever_protobuf_makes_of_it() -> None:
    header = pb.UploadMessage(header=pb.UploadHeader(client_id="b")).SerializeToString()
    raw = pb.UploadMessage(chunk=b"abc").SerializeToString() + header  # oneof: the last field wins
    assert parse_upload_message(raw) == pb.UploadMessage(header=pb.UploadHeader(client_id="b"))


def test_a_chunk_shorter_than_its_length_is_refused_by_protobuf() -> None:
    raw = pb.UploadMessage(chunk=b"abcdef").SerializeToString()[:-2]
    with pytest.raises(DecodeError):
        parse_upload_message(raw)


@pytest.mark.parametrize("size", [0, 5, 128])
def test_a_framed_blob_chunk_parses_as_the_message(size: int) -> None:
    piece = b"\x07" * size
    message, start = blob_chunk_message(piece, 40, 99, "ab" * 32)
    assert pb.BlobChunk.FromString(message) == pb.BlobChunk(data=piece, offset=40, total_size=99, sha256="ab" * 32)
    assert message[start:start + size] == piece


def test_zero_is_one_byte() -> None:
    assert varint(0) == b"\x00" and varint_at(b"\x00", 0) == (0, 1)


@pytest.mark.parametrize("size", [1, 127, 128, 70_000])
def test_a_downloaded_chunk_is_a_view_of_the_received_bytes(size: int) -> None:
    piece = bytes(range(256)) * (size // 256) + bytes(size % 256)
    raw, _ = blob_chunk_message(piece, 40, 99, "ab" * 32)
    data, rest = parse_blob_chunk(raw)
    assert data.obj is raw and bytes(data) == piece
    assert rest == pb.BlobChunk(offset=40, total_size=99, sha256="ab" * 32)


@pytest.mark.parametrize("message", [
    pb.BlobChunk(offset=3, total_size=9, sha256="cd", data=b"xyz").SerializeToString(),  # protobuf's field order
    pb.BlobChunk(total_size=9).SerializeToString(),  # no data (an empty blob)
    pb.BlobChunk(data=b"old").SerializeToString() + pb.BlobChunk(data=b"xyz", total_size=9).SerializeToString(),
])
def test_other_framings_read_as_protobuf_reads_them(message: bytes) -> None:
    data, rest = parse_blob_chunk(message)
    parsed = pb.BlobChunk.FromString(message)
    assert bytes(data) == parsed.data and rest.total_size == parsed.total_size and not rest.data


def test_a_blob_chunk_shorter_than_its_length_is_refused_by_protobuf() -> None:
    raw, _ = blob_chunk_message(b"abcdef", 0, 6, "ef")
    with pytest.raises(DecodeError):
        parse_blob_chunk(raw[:4])
