"""Protobuf framing by hand: varints, BlobChunks framed once, upload chunks read as views."""
from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from fedcmp.common.wire import coordinator_pb2 as pb
from fedcmp.server.framing import blob_chunk_message, parse_upload_message, varint, varint_at


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
