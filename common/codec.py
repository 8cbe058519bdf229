"""Projector tensors as safetensors blobs, cut into chunks and verified by sha256.

The same bytes travel on the wire and rest in the state dir. `BlobReceiver` reassembles a
chunked blob into memory or straight into a file, checking size and digest, so a torn or
tampered transfer is detected before anything trusts it.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from fedcmp.common.constants import CHUNK_BYTES


class BlobIntegrityError(ValueError):
    """A received blob whose size or sha256 differs from what its sender announced."""


def encode_params(params: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a projector state dict (any device/dtype layout) to safetensors bytes."""
    contiguous = {key: value.detach().to("cpu").contiguous() for key, value in params.items()}
    return safetensors_save(contiguous, metadata=metadata)


def decode_params(blob: bytes) -> dict[str, Tensor]:
    """Inverse of `encode_params`; raises BlobIntegrityError on bytes that are not safetensors."""
    try:
        return safetensors_load(blob)
    except Exception as error:  # safetensors raises its own SafetensorError and others
        raise BlobIntegrityError(f"not a valid safetensors blob ({len(blob)} bytes): {error}") from error


def sha256_hex(blob: bytes | memoryview) -> str:
    return hashlib.sha256(blob).hexdigest()


def iter_chunks(blob: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Zero-copy views of consecutive `chunk_bytes` slices of `blob` (an empty blob: one empty chunk)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    view = memoryview(blob)
    if len(view) == 0:
        yield view
        return
    for offset in range(0, len(view), chunk_bytes):
        yield view[offset : offset + chunk_bytes]


class BlobReceiver:
    """Accumulates chunks of an announced blob into memory or a file and verifies them at the end."""

    def __init__(self, expected_size: int, expected_sha256: str, sink: BinaryIO | None = None) -> None:
        if expected_size < 0:
            raise BlobIntegrityError(f"announced size {expected_size} is negative")
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256.lower()
        self._digest = hashlib.sha256()
        self._received = 0
        self._sink = sink
        self._buffer = bytearray() if sink is None else None

    def add(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self.expected_size:
            raise BlobIntegrityError(f"received more than the announced {self.expected_size} bytes")
        self._digest.update(chunk)
        if self._sink is not None:
            self._sink.write(chunk)
        else:
            self._buffer.extend(chunk)

    def finish(self) -> bytes:
        """Verify size and digest; returns the blob when receiving into memory (b'' for a file sink)."""
        if self._received != self.expected_size:
            raise BlobIntegrityError(f"received {self._received} bytes, announced {self.expected_size}")
        actual = self._digest.hexdigest()
        if actual != self.expected_sha256:
            raise BlobIntegrityError(f"sha256 mismatch: announced {self.expected_sha256}, received {actual}")
        return bytes(self._buffer) if self._buffer is not None else b""


def receive_blob(chunks: Iterable[bytes], expected_size: int, expected_sha256: str) -> bytes:
    receiver = BlobReceiver(expected_size, expected_sha256)
    for chunk in chunks:
        receiver.add(chunk)
    return receiver.finish()


def write_atomic(path: Path, blob: bytes | memoryview) -> None:
    """Write `blob` to `path` so a crash leaves either the old file or the new one: temp, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # a failed write (ENOSPC, EIO) leaves no temp file behind
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_params_file(path: Path, params: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    write_atomic(path, encode_params(params, metadata))


def load_params_file(path: Path) -> dict[str, Tensor]:
    try:
        return decode_params(Path(path).read_bytes())
    except OSError as error:
        raise BlobIntegrityError(f"cannot read {path}: {error.strerror}") from error


def load_params_metadata(path: Path) -> dict[str, str]:
    """The metadata in a safetensors file's header (`{}` when it has none), without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, SafetensorError) as error:
        raise BlobIntegrityError(f"cannot read the safetensors header of {path}: {error}") from error
