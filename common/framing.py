"""Protobuf framing by hand on the transfer hot path, so the projector's bytes are not copied per client.

- `blob_chunk_message`: a fedcmp.v1.BlobChunk serialized from a piece of the global, framed once
  per global version and sent to every client as it is (the service's PRESERIALIZED methods).
- `parse_upload_message`: an UploadMessage off the wire (the server's reader); a chunk comes back
  as a view of the received bytes instead of being parsed into a message and copied out of it.
- `parse_blob_chunk`: a BlobChunk off the wire (the client's reader of a download), its data a
  view of the received bytes in the same way.

Both follow the protobuf wire format: a field is a varint tag (field number << 3 | wire type),
then for bytes a varint length and the bytes; fields may come in any order, so a data field
followed by the other fields' serialization is one message.
"""
from __future__ import annotations

from fedcmp.common.wire import coordinator_pb2 as pb

LENGTH_DELIMITED = 2  # protobuf wire type of bytes, strings and messages
BLOB_CHUNK_DATA_TAG = 1 << 3 | LENGTH_DELIMITED  # BlobChunk.data, field 1
UPLOAD_CHUNK_TAG = 2 << 3 | LENGTH_DELIMITED  # UploadMessage.chunk, field 2 of its oneof


def varint(value: int) -> bytes:
    """`value` >= 0 as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def varint_at(raw: bytes, position: int) -> tuple[int, int]:
    """(the varint at `position`, the position after it); value -1 when `raw` holds no whole varint there."""
    value = shift = 0
    while position < len(raw) and shift < 64:
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    return -1, position


def blob_chunk_message(piece: bytes | memoryview, offset: int, total_size: int, sha256: str) -> tuple[bytes, int]:
    """(a serialized BlobChunk carrying `piece`, where `piece` starts in it)."""
    data = varint(BLOB_CHUNK_DATA_TAG) + varint(len(piece)) if len(piece) else b""  # proto3 leaves b"" out
    rest = pb.BlobChunk(offset=offset, total_size=total_size, sha256=sha256).SerializeToString()
    return b"".join((data, piece, rest)), len(data)


def parse_upload_message(raw: bytes) -> pb.UploadMessage | memoryview:
    """An UploadMessage: a message that is one chunk field only as a view of `raw` (no copy), any
    other (a header, or anything unusual) parsed by protobuf, which also names what is malformed."""
    if raw[:1] == bytes((UPLOAD_CHUNK_TAG,)):
        length, start = varint_at(raw, 1)
        if length >= 0 and start + length == len(raw):
            return memoryview(raw)[start:]
    return pb.UploadMessage.FromString(raw)


def parse_blob_chunk(raw: bytes) -> tuple[memoryview, pb.BlobChunk]:
    """A BlobChunk as (its data, the message without it): the data, framed first as
    `blob_chunk_message` frames it, is a view of `raw` (no copy); any other framing is parsed by
    protobuf (which also names what is malformed) and its data viewed there."""
    if raw[:1] == bytes((BLOB_CHUNK_DATA_TAG,)):
        length, start = varint_at(raw, 1)
        if length >= 0 and start + length <= len(raw):
            rest = pb.BlobChunk.FromString(raw[start + length:])  # offset, size, digest: a few bytes
            if not rest.data:  # a second data field would replace the first (the last one wins)
                return memoryview(raw)[start:start + length], rest
    message = pb.BlobChunk.FromString(raw)
    data = memoryview(message.data)
    message.ClearField("data")
    return data, message
