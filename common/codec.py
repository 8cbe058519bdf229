"""Projector tensors as safetensors blobs: the wire layout, chunking, streamed checks, files.

The same bytes travel on the wire and rest in the state dir. A projector travels in the run's
wire dtype (`float32` or `bfloat16`), laid out exactly as `safetensors` writes it, so its size
and header are known in advance from the shapes and the dtype (`BlobLayout`). A receiver can
therefore refuse a wrong size before a byte arrives and check every chunk as it streams in
(`ProjectorStreamCheck`: header first, then every value finite), and `BlobReceiver` verifies
size and sha256, so a torn, tampered or poisoned transfer is detected before anything trusts it.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from fedcmp.common.constants import CHUNK_BYTES

# The dtypes a projector may travel in, by recipe name, and their safetensors names.
WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAFETENSORS_NAMES: dict[str, str] = {"float32": "F32", "bfloat16": "BF16"}
# Element sizes of every safetensors dtype, to name a foreign dtype from a blob's size alone.
SAFETENSORS_ITEMSIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                                         "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_SAFETENSORS_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
HEADER_LENGTH_BYTES = 8  # safetensors starts with the JSON header's length, little-endian u64
MAX_METADATA_BYTES = 16 * 1024  # string metadata a projector blob may carry in its header (provenance)


class BlobIntegrityError(ValueError):
    """A received blob whose size, sha256, layout or values differ from what the receiver accepts."""


def encode_params(params: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict (any device/dtype layout) to safetensors bytes, dtypes kept."""
    contiguous = {key: value.detach().to("cpu").contiguous() for key, value in params.items()}
    return safetensors_save(contiguous, metadata=metadata)


def decode_params(blob: bytes | bytearray) -> dict[str, Tensor]:
    """Inverse of `encode_params`; raises BlobIntegrityError on bytes that are not safetensors."""
    try:
        return safetensors_load(bytes(blob))
    except Exception as error:  # safetensors raises its own SafetensorError and others
        raise BlobIntegrityError(f"not a valid safetensors blob ({len(blob)} bytes): {error}") from error


def projector_parts(params: Mapping[str, Tensor], wire_dtype: str,
                    metadata: dict[str, str] | None = None) -> list[bytes | memoryview]:
    """A projector's tensors cast to `wire_dtype`, as the pieces of a safetensors blob (the `BlobLayout`
    layout): its header, then each tensor's bytes as a view of its storage (no copy for float32)."""
    dtype = wire_torch_dtype(wire_dtype)
    return safetensors_parts({key: value.detach().to(dtype) for key, value in params.items()}, metadata)


def encode_projector(params: Mapping[str, Tensor], wire_dtype: str, metadata: dict[str, str] | None = None) -> bytes:
    """`projector_parts` joined into one blob."""
    return b"".join(projector_parts(params, wire_dtype, metadata))


def decode_projector(blob: bytes | bytearray) -> dict[str, Tensor]:
    """A projector blob in any wire dtype, decoded to float32 tensors (exact for bfloat16 values).

    float32 tensors of a `bytearray` are views of it (no copy: the caller hands the blob over);
    `bytes`, being immutable, are copied once."""
    buffer = blob if isinstance(blob, bytearray) else bytearray(blob)
    return projector_views(buffer, f"a projector blob of {len(buffer)} bytes")


def through_wire(params: Mapping[str, Tensor], wire_dtype: str) -> dict[str, Tensor]:
    """The float32 tensors a receiver decodes after `params` travelled in `wire_dtype` (no copy for float32)."""
    dtype = wire_torch_dtype(wire_dtype)
    return {key: value.to(dtype).float() for key, value in params.items()}


def wire_torch_dtype(wire_dtype: str) -> torch.dtype:
    try:
        return WIRE_DTYPES[wire_dtype]
    except KeyError:
        raise ValueError(f"unknown wire dtype {wire_dtype!r}; known: {', '.join(WIRE_DTYPES)}") from None


@dataclass(frozen=True)
class BlobLayout:
    """The exact layout of a projector blob: safetensors header, then each tensor in key order.

    header: the 8-byte length and the JSON header without metadata (keys sorted, offsets
    contiguous, padded with spaces to a multiple of 8) exactly as `safetensors` writes them;
    `spans[key]` is the tensor's [start, end) in the data section that follows. A blob may also
    carry up to MAX_METADATA_BYTES of string metadata (`__metadata__`) in its header.
    """

    wire_dtype: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # sorted by key
    header: bytes
    spans: tuple[tuple[str, int, int], ...]  # (key, start, end) in the data section

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]], wire_dtype: str) -> BlobLayout:
        itemsize = wire_torch_dtype(wire_dtype).itemsize
        ordered = tuple((key, tuple(int(d) for d in shapes[key])) for key in sorted(shapes))
        header, spans = _header(ordered, SAFETENSORS_NAMES[wire_dtype], itemsize)
        return cls(wire_dtype, ordered, header, spans)

    @property
    def itemsize(self) -> int:
        return wire_torch_dtype(self.wire_dtype).itemsize

    @property
    def data_bytes(self) -> int:
        return self.spans[-1][2] if self.spans else 0

    @property
    def size(self) -> int:
        """Bytes of the blob without metadata."""
        return len(self.header) + self.data_bytes

    def admits_size(self, size: int) -> bool:
        return self.size <= size <= self.size + MAX_METADATA_BYTES

    def entries(self) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
        """key -> (safetensors dtype, shape, data offsets) as the header must state them."""
        shapes = dict(self.shapes)
        return {key: (SAFETENSORS_NAMES[self.wire_dtype], shapes[key], (start, end)) for key, start, end in self.spans}

    def explain_size(self, size: int) -> str:
        """Why a blob of `size` bytes cannot be this projector (names a dtype whose size it matches)."""
        message = (f"announced size {size} bytes is not the {self.size} bytes (plus at most {MAX_METADATA_BYTES} of "
                   f"metadata) of the projector {_describe(self.shapes)} in the run's wire dtype {self.wire_dtype}")
        for itemsize in sorted(set(SAFETENSORS_ITEMSIZES.values()) - {self.itemsize}, reverse=True):
            names = [name for name, each in SAFETENSORS_ITEMSIZES.items() if each == itemsize and self._fits(size, name)]
            if names:
                return (f"{message}; it is the size of the projector in a {itemsize}-byte dtype ({', '.join(names)}), "
                        "which this run does not accept")
        return message

    def _fits(self, size: int, dtype_name: str) -> bool:
        """Whether `size` is this projector's size in `dtype_name` (with at most MAX_METADATA_BYTES metadata)."""
        header, spans = _header(self.shapes, dtype_name, SAFETENSORS_ITEMSIZES[dtype_name])
        smallest = len(header) + (spans[-1][2] if spans else 0)
        return smallest <= size <= smallest + MAX_METADATA_BYTES


def _header(shapes: tuple[tuple[str, tuple[int, ...]], ...], dtype_name: str,
            itemsize: int) -> tuple[bytes, tuple[tuple[str, int, int], ...]]:
    entries: dict[str, dict[str, object]] = {}
    spans = []
    offset = 0
    for key, shape in shapes:
        end = offset + itemsize * _numel(shape)
        entries[key] = {"dtype": dtype_name, "shape": list(shape), "data_offsets": [offset, end]}
        spans.append((key, offset, end))
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, tuple(spans)


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _describe(shapes: Iterable[tuple[str, Sequence[int]]]) -> str:
    return ", ".join(f"{key}[{'x'.join(map(str, shape))}]" for key, shape in shapes)


class ProjectorStreamCheck:
    """Checks a projector blob of `size` bytes chunk by chunk as it arrives: header, then values.

    The header must state exactly the layout's tensors (keys, shapes, the wire dtype, offsets)
    and may add string metadata; its length must make the blob `size` bytes. Values are checked
    per chunk on the whole elements it completes (a partial element waits for the next chunk),
    so no byte is read twice.
    """

    def __init__(self, layout: BlobLayout, size: int) -> None:
        self.layout = layout
        self.size = size
        self._header = bytearray()  # the 8-byte length, then the JSON header
        self._header_end: int | None = None  # 8 + the header's length, once known
        self._carry = b""  # bytes of an element split across chunks
        self._elements = 0  # elements of the data section checked so far

    def add(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        if self._header_end is None or len(self._header) < self._header_end:
            view = self._take_header(view)
        if len(view):
            self._check_values(view)

    def _take_header(self, view: memoryview) -> memoryview:
        """Append the header's bytes from `view`; check the header once whole; return the rest."""
        if self._header_end is None:
            needed = HEADER_LENGTH_BYTES - len(self._header)
            self._header += view[:needed]
            view = view[needed:]
            if len(self._header) < HEADER_LENGTH_BYTES:
                return view
            (length,) = struct.unpack("<Q", self._header)
            longest = len(self.layout.header) - HEADER_LENGTH_BYTES + MAX_METADATA_BYTES
            if length > longest:
                raise BlobIntegrityError(f"a safetensors header of {length} bytes is refused (at most {longest})")
            self._header_end = HEADER_LENGTH_BYTES + length
        needed = self._header_end - len(self._header)
        self._header += view[:needed]
        if len(self._header) == self._header_end:
            self._check_header(bytes(self._header[HEADER_LENGTH_BYTES:]))
            if self._header_end + self.layout.data_bytes != self.size:
                raise BlobIntegrityError(
                    f"a safetensors header of {self._header_end - HEADER_LENGTH_BYTES} bytes and the "
                    f"{self.layout.data_bytes} bytes of the projector's tensors do not make the announced "
                    f"{self.size} bytes")
        return view[needed:]

    def _check_header(self, text: bytes) -> None:
        expected = f"the projector {_describe(self.layout.shapes)} in {self.layout.wire_dtype}"
        try:
            entries = json.loads(text)
            metadata = entries.pop("__metadata__", {})
            received = {key: (entry["dtype"], tuple(entry["shape"]), tuple(entry["data_offsets"]))
                        for key, entry in entries.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise BlobIntegrityError(f"the safetensors header is not valid JSON of tensor entries: {error}") from error
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise BlobIntegrityError("the safetensors metadata must map strings to strings")
        wanted = self.layout.entries()
        if received == wanted:
            return
        wanted_dtype = SAFETENSORS_NAMES[self.layout.wire_dtype]
        foreign = sorted({str(dtype) for dtype, _, _ in received.values() if dtype != wanted_dtype})
        if foreign:
            raise BlobIntegrityError(f"dtype {', '.join(foreign)} is refused: this run's wire dtype is "
                                     f"{self.layout.wire_dtype} ({wanted_dtype})")
        shapes = tuple((key, received[key][1]) for key in sorted(received))
        if shapes != self.layout.shapes:
            raise BlobIntegrityError(f"tensors {_describe(shapes)} do not match {expected}")
        raise BlobIntegrityError(f"tensor offsets in the safetensors header differ from the layout of {expected}")

    def _check_values(self, view: memoryview) -> None:
        itemsize = self.layout.itemsize
        if self._carry:
            needed = itemsize - len(self._carry)
            self._carry += bytes(view[:needed])
            view = view[needed:]
            if len(self._carry) == itemsize:
                self._check_elements(memoryview(self._carry))
                self._carry = b""
        whole = len(view) - len(view) % itemsize
        if whole:
            self._check_elements(view[:whole])
        self._carry += bytes(view[whole:])

    def _check_elements(self, view: memoryview) -> None:
        non_finite = _non_finite(view, self.layout.wire_dtype)  # [n] bool
        if non_finite.any():
            first_bad = self._elements + int(np.argmax(non_finite))
            raise BlobIntegrityError(f"non-finite values (NaN/inf) in {self._tensor_at(first_bad)}")
        self._elements += non_finite.size

    def _tensor_at(self, element: int) -> str:
        position = element * self.layout.itemsize
        return next(key for key, start, end in self.layout.spans if start <= position < end)


def _non_finite(view: memoryview, wire_dtype: str) -> np.ndarray:
    """Which of the whole elements in `view` are NaN or inf (no copy of the bytes)."""
    if wire_dtype == "float32":
        return ~np.isfinite(np.frombuffer(view, dtype=np.float32))
    bits = np.frombuffer(view, dtype=np.uint16)  # bfloat16: NaN/inf iff its 8 exponent bits are all ones
    return (bits & np.uint16(0x7F80)) == np.uint16(0x7F80)


def sha256_hex(blob: bytes | memoryview) -> str:
    return hashlib.sha256(blob).hexdigest()


def file_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """A file as consecutive `chunk_bytes` pieces, read one at a time (an empty file: one empty piece)."""
    with open(path, "rb") as handle:
        chunk = handle.read(chunk_bytes)
        yield chunk
        while chunk := handle.read(chunk_bytes):
            yield chunk


def file_digest(path: Path) -> tuple[int, str]:
    """A file's size and sha256, read a chunk at a time."""
    return parts_digest(file_chunks(path))


def safetensors_dtypes(first_bytes: bytes) -> set[str] | None:
    """The tensor dtypes ("F32", ...) a safetensors header names, from the blob's first bytes; None if they do not hold it."""
    if len(first_bytes) < HEADER_LENGTH_BYTES:
        return None
    (length,) = struct.unpack("<Q", first_bytes[:HEADER_LENGTH_BYTES])
    if len(first_bytes) < HEADER_LENGTH_BYTES + length:
        return None
    try:
        entries = json.loads(first_bytes[HEADER_LENGTH_BYTES: HEADER_LENGTH_BYTES + length])
        return {entry["dtype"] for key, entry in entries.items() if key != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def iter_chunks(blob: bytes | memoryview, chunk_bytes: int = CHUNK_BYTES) -> Iterator[memoryview]:
    """Zero-copy views of consecutive `chunk_bytes` slices of `blob` (an empty blob: one empty chunk)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    view = memoryview(blob)
    if len(view) == 0:
        yield view
        return
    for offset in range(0, len(view), chunk_bytes):
        yield view[offset : offset + chunk_bytes]


def joined_chunks(parts: Iterable[bytes | memoryview], chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Consecutive `chunk_bytes` pieces of the concatenation of `parts`, each its own bytes (every
    byte copied once, as a message needs; an empty concatenation: one empty piece)."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk_bytes}")
    pending: list[memoryview] = []  # slices of the chunk being filled
    filled, any_yielded = 0, False
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            take = min(chunk_bytes - filled, len(view))
            pending.append(view[:take])
            filled, view = filled + take, view[take:]
            if filled == chunk_bytes:
                yield b"".join(pending)
                pending, filled, any_yielded = [], 0, True
    if pending or not any_yielded:
        yield b"".join(pending)


def parts_digest(parts: Iterable[bytes | memoryview]) -> tuple[int, str]:
    """The size and sha256 of the concatenation of `parts`, without joining them."""
    digest, size = hashlib.sha256(), 0
    for part in parts:
        digest.update(part)
        size += memoryview(part).nbytes
    return size, digest.hexdigest()


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

    def add(self, chunk: bytes | memoryview) -> None:
        self._received += len(chunk)
        if self._received > self.expected_size:
            raise BlobIntegrityError(f"received more than the announced {self.expected_size} bytes")
        self._digest.update(chunk)
        if self._sink is not None:
            self._sink.write(chunk)
        else:
            self._buffer.extend(chunk)

    def finish(self) -> bytearray:
        """Verify size and digest; returns the blob when receiving into memory (empty for a file sink)."""
        if self._received != self.expected_size:
            raise BlobIntegrityError(f"received {self._received} bytes, announced {self.expected_size}")
        actual = self._digest.hexdigest()
        if actual != self.expected_sha256:
            raise BlobIntegrityError(f"sha256 mismatch: announced {self.expected_sha256}, received {actual}")
        return self._buffer if self._buffer is not None else bytearray()


def receive_blob(chunks: Iterable[bytes], expected_size: int, expected_sha256: str) -> bytearray:
    receiver = BlobReceiver(expected_size, expected_sha256)
    for chunk in chunks:
        receiver.add(chunk)
    return receiver.finish()


def write_atomic(path: Path, *parts: bytes | memoryview) -> None:
    """Write `parts`, one after another, to `path` so a crash leaves either the old file or the
    new one: temp, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as handle:
            for part in parts:
                handle.write(part)
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


def save_params_file(path: Path, params: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """`params` as a safetensors file, written atomically straight from the tensors' storage
    (no whole-file buffer: `encode_params` holds the blob and safetensors a copy of every tensor
    besides)."""
    write_atomic(path, *safetensors_parts(params, metadata))


def safetensors_parts(params: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> list[bytes | memoryview]:
    """`params` as the pieces of a safetensors blob: the header, then each tensor's bytes, a view
    of its storage (copied only when not contiguous on the CPU).

    Tensors lie by element size, largest first, then by key, so every tensor is aligned; metadata
    keys are sorted, so equal inputs give equal bytes. A projector in one dtype is thus laid out
    as `BlobLayout` says, metadata aside.
    """
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in params.items()}
    order = sorted(tensors, key=lambda key: (-tensors[key].element_size(), key))
    entries: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for key in order:
        end = offset + tensors[key].numel() * tensors[key].element_size()
        entries[key] = {"dtype": _safetensors_dtype(key, tensors[key].dtype), "shape": list(tensors[key].shape),
                        "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text,
            *(memoryview(tensors[key].reshape(-1).view(torch.uint8).numpy()) for key in order)]


def _safetensors_dtype(key: str, dtype: torch.dtype) -> str:
    try:
        return TORCH_SAFETENSORS_NAMES[dtype]
    except KeyError:
        raise ValueError(f"{key}: safetensors cannot store dtype {dtype}") from None


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


def map_projector_file(path: Path) -> dict[str, Tensor]:
    """A checked projector file's tensors as float32, memory-mapped instead of read.

    float32 tensors are views of a private (copy-on-write) mapping: no copy, pages read on first
    touch; other wire dtypes are widened to float32 (one copy per tensor).
    """
    try:
        with open(path, "rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as error:
        raise BlobIntegrityError(f"cannot map {path}: {error}") from error
    return projector_views(mapping, str(path))


def projector_views(buffer: bytearray | mmap.mmap, what: str) -> dict[str, Tensor]:
    """The tensors of a projector blob in a writable buffer, as float32: views of the buffer for
    float32 tensors, one widened copy each otherwise. Raises BlobIntegrityError, naming `what`,
    unless the header is safetensors of wire-dtype tensors whose spans lie in the buffer."""
    names = {name: wire_dtype for wire_dtype, name in SAFETENSORS_NAMES.items()}
    try:
        (length,) = struct.unpack("<Q", buffer[:HEADER_LENGTH_BYTES])
        start = HEADER_LENGTH_BYTES + length
        if start > len(buffer):
            raise ValueError(f"its header claims {length} bytes, more than the blob holds")
        entries = json.loads(buffer[HEADER_LENGTH_BYTES:start])
        params = {}
        for key, entry in entries.items():
            if key == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in names:
                raise ValueError(f"tensor {key} is {entry['dtype']}, not a wire dtype ({', '.join(names)})")
            dtype = WIRE_DTYPES[names[entry["dtype"]]]
            shape = [int(size) for size in entry["shape"]]
            if not 0 <= begin <= end <= len(buffer) - start or end - begin != _numel(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key}'s data offsets [{begin}, {end}) do not hold its shape {shape}")
            flat = (torch.frombuffer(buffer, dtype=dtype, count=_numel(shape), offset=start + begin) if end > begin
                    else torch.empty(0, dtype=dtype))  # frombuffer refuses an empty span
            params[key] = flat.view(shape).float()  # no copy when already float32
        return params
    except (ValueError, KeyError, TypeError, AttributeError, struct.error) as error:
        raise BlobIntegrityError(f"{what} is not a projector blob: {error}") from error
