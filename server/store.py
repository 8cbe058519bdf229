"""The coordinator's durable state dir: spilled uploads, committed rounds, resumable runs.

Layout under `--state-dir`:

    recipe.json                      the run's recipe (written once)
    run.json                         the commit record: the last committed round and what it names
    global/v{N}.safetensors          global projector versions (the committed one and the two before it),
                                     with fedcmp's projector metadata (fedcmp.common.provenance)
    strategy/r{N}.safetensors        strategy state (momentum, moments, basis, counters) after round N (the same three)
    uploads/r{N}/{client}.safetensors + .json    accepted client uploads of the open round
    metrics.jsonl                    one JSON line per committed round (and the final evaluation)

Every file is written temp -> fsync -> rename; `run.json` is renamed last, so it is the commit
point: a crash at any moment leaves the previous commit intact and loadable.

Uploads stream in on the event loop, but every byte is hashed, checked and written on a thread
pool (`io_pool`), each stream into its own temp file; one lock per (client, round) lets only
one stream publish. The published header records what was verified, so a resumed run trusts
only uploads that passed these checks and drops (and names) any other.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, overload

from torch import Tensor

from fedcmp.common.codec import (SAFETENSORS_NAMES, BlobIntegrityError, BlobLayout, BlobReceiver, ProjectorStreamCheck,
                                 file_chunks, file_digest, fsync_dir, joined_chunks, load_params_file, load_params_metadata,
                                 map_projector_file, parts_digest, projector_parts, safetensors_dtypes, save_params_file,
                                 write_atomic)
from fedcmp.common.provenance import Backbones, ProjectorProvenance
from fedcmp.common.recipe import Recipe
from fedcmp.common.framing import blob_chunk_message
from fedcmp.server.strategies import ClientUpdate

log = logging.getLogger("fedcmp.server")

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # \Z: "$" would let a trailing newline in
UPLOAD_CHECKS = "sha256+layout+finite"  # what a published upload header says was verified on arrival
T = TypeVar("T")


class StateError(RuntimeError):
    """The state dir cannot be used as asked (e.g. holds a run but --resume was not given)."""


class UploadStorageError(RuntimeError):
    """The disk failed while an upload was spilled (ENOSPC, EIO, ...); nothing was kept, retrying may work."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass
class RunRecord:
    """What `run.json` commits: enough to resume at the next round."""

    committed_round: int = 0
    global_version: int = 0
    strategy: str = ""
    projector_shapes: dict[str, list[int]] = field(default_factory=dict)  # fixed when round 1 opens
    backbones: dict[str, str] = field(default_factory=dict)  # Backbones fields, fixed with the shapes
    history: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    done: bool = False


@dataclass(frozen=True)
class SpilledUpload:
    """An accepted upload on disk: its header facts and where its tensors lie."""

    client_id: str
    round: int
    num_samples: int
    metrics: dict[str, float]
    path: Path


@dataclass(frozen=True)
class EncodedGlobal:
    """A global version encoded once in the wire dtype, as the very messages every download sends.

    `messages` are serialized fedcmp.v1.BlobChunk messages, one per CHUNK_BYTES piece of the
    safetensors blob, so a download hands them to gRPC as they are: no message is built or
    serialized per client. `chunks` are the pieces themselves, views into the messages.
    """

    version: int
    wire_dtype: str
    messages: tuple[bytes, ...]
    spans: tuple[tuple[int, int], ...]  # [start, end) of each message's piece of the blob
    size: int
    sha256: str

    @classmethod
    def of(cls, version: int, wire_dtype: str, chunks: Iterable[bytes | memoryview], size: int,
           sha256: str) -> EncodedGlobal:
        messages, spans, offset = [], [], 0
        for chunk in chunks:
            message, start = blob_chunk_message(chunk, offset, size, sha256)
            messages.append(message)
            spans.append((start, start + len(chunk)))
            offset += len(chunk)
        return cls(version, wire_dtype, tuple(messages), tuple(spans), size, sha256)

    @property
    def chunks(self) -> tuple[memoryview, ...]:
        return tuple(memoryview(message)[start:end] for message, (start, end) in zip(self.messages, self.spans))


class SpilledUpdates(Sequence[ClientUpdate]):
    """Client updates read from disk one at a time, so aggregation memory does not grow with K."""

    def __init__(self, uploads: Iterable[SpilledUpload]) -> None:
        self._uploads = sorted(uploads, key=lambda upload: upload.client_id)

    def __len__(self) -> int:
        return len(self._uploads)

    @overload
    def __getitem__(self, index: int) -> ClientUpdate: ...
    @overload
    def __getitem__(self, index: slice) -> list[ClientUpdate]: ...

    def __getitem__(self, index: int | slice) -> ClientUpdate | list[ClientUpdate]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        upload = self._uploads[index]
        return ClientUpdate(upload.client_id, upload.num_samples, map_projector_file(upload.path), upload.metrics)


class _UploadSink:
    """One upload stream's private temp file, digest and content check. Runs on the I/O pool only."""

    def __init__(self, sink: BinaryIO, temp: Path, size: int, sha256: str, layout: BlobLayout) -> None:
        self.temp = temp
        self._sink = sink
        self._receiver = BlobReceiver(size, sha256, sink)
        self._check = ProjectorStreamCheck(layout, size)

    def add(self, chunk: bytes) -> None:
        self._receiver.add(chunk)  # size bound, sha256, write
        self._check.add(chunk)

    def finish(self) -> None:
        self._receiver.finish()
        self._sink.truncate()  # at the bytes written: a reused spare file may have been longer
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()

    def discard(self) -> None:
        self._sink.close()
        self.temp.unlink(missing_ok=True)


class RunStore:
    """Reads and writes one run's state dir."""

    def __init__(self, root: Path, io_pool: ThreadPoolExecutor | None = None) -> None:
        self.root = Path(root)
        # Hashing, checks, writes and fsyncs of uploads: off the event loop, as parallel as the machine.
        self.io_pool = io_pool or ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="fedcmp-io")
        self._upload_locks: dict[tuple[int, str], asyncio.Lock] = {}
        self._encoded: EncodedGlobal | None = None  # the last global served, encoded once for every download
        self._encoded_lock = threading.Lock()

    # ---- layout -------------------------------------------------------------------------
    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def recipe_file(self) -> Path:
        return self.root / "recipe.json"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    def global_path(self, version: int) -> Path:
        return self.root / "global" / f"v{version}.safetensors"

    def strategy_path(self, round_index: int) -> Path:
        return self.root / "strategy" / f"r{round_index}.safetensors"

    def upload_dir(self, round_index: int) -> Path:
        return self.root / "uploads" / f"r{round_index}"

    @property
    def spare_dir(self) -> Path:
        """Tensor files of the last committed round's uploads, kept for the next round's uploads to
        overwrite: their pages are in the page cache, and overwriting cached pages costs a fraction
        of the CPU that writing new files does (docs/decisions.md)."""
        return self.root / "uploads" / "spare"

    # ---- run lifecycle ------------------------------------------------------------------
    def has_run(self) -> bool:
        return self.run_file.exists()

    def create(self, recipe_json: str, strategy: str) -> RunRecord:
        """Start a fresh run: the recipe and an empty commit record (global v0 comes when round 1 opens)."""
        if self.has_run():
            raise StateError(
                f"{self.root} already holds a run (see {self.run_file}); pass --resume to continue it "
                "or choose an empty --state-dir")
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.recipe_file, recipe_json.encode())
        record = RunRecord(strategy=strategy)
        self._write_record(record)
        return record

    def commit_initial_global(self, record: RunRecord, initial_global: dict[str, Tensor],
                              backbones: Backbones | None = None) -> RunRecord:
        """Fix the projector signature and backbones and write global v0 (when round 1 opens)."""
        shapes = {key: list(value.shape) for key, value in initial_global.items()}
        fixed = RunRecord(**{**asdict(record), "projector_shapes": shapes,
                             "backbones": asdict(backbones) if backbones else {}})
        save_params_file(self.global_path(0), initial_global, self._global_metadata(fixed, 0, initial_global))
        self._write_record(fixed)
        self.forget_encoded_global()  # a v0 written again (a shape chosen again) must not be served from the cache
        return fixed

    def forget_encoded_global(self) -> None:
        """Drop the encoded global (downloads under way keep theirs): when a round aggregates, its
        downloads are over, and the projector it holds would add to the aggregation's peak."""
        with self._encoded_lock:
            self._encoded = None

    def load(self) -> RunRecord:
        try:
            data = json.loads(self.run_file.read_text())
            return RunRecord(**data)
        except FileNotFoundError as error:
            raise StateError(f"{self.root} holds no run to resume (no {self.run_file.name})") from error
        except (json.JSONDecodeError, TypeError) as error:
            raise StateError(f"{self.run_file} is corrupt: {error}") from error

    def load_recipe_json(self) -> str:
        return self.recipe_file.read_text()

    def load_global(self, version: int) -> dict[str, Tensor]:
        """Global `version`'s float32 tensors, memory-mapped (page cache, read on touch), not read."""
        return map_projector_file(self.global_path(version))

    def save_recipe_json(self, recipe_json: str) -> None:
        """Replace the stored recipe (a resume that changed operational fields)."""
        write_atomic(self.recipe_file, recipe_json.encode())

    def encoded_global(self, version: int, wire_dtype: str) -> EncodedGlobal:
        """Global `version` in `wire_dtype`, encoded on first use and then shared (thread-safe; call off-loop).

        A float32 global file already is its float32 wire blob (the same tensors and provenance
        metadata, serialised the same way), so for float32 the file's bytes are read straight
        into the chunks; other wire dtypes decode the file and encode it again.
        """
        with self._encoded_lock:
            cached = self._encoded
            if cached is None or (cached.version, cached.wire_dtype) != (version, wire_dtype):
                self._encoded = cached = None  # the old version's chunks go before the new ones are read
                cached = self._encode_global(version, wire_dtype)
                self._encoded = cached
            return cached

    def _encode_global(self, version: int, wire_dtype: str) -> EncodedGlobal:
        path = self.global_path(version)
        if wire_dtype == "float32" and safetensors_dtypes(next(file_chunks(path))) == {SAFETENSORS_NAMES["float32"]}:
            size, sha256 = file_digest(path)  # first: every message carries them; then one piece at a time
            return EncodedGlobal.of(version, wire_dtype, file_chunks(path), size, sha256)
        parts = projector_parts(self.load_global(version), wire_dtype, load_params_metadata(path))
        size, digest = parts_digest(parts)
        return EncodedGlobal.of(version, wire_dtype, joined_chunks(parts), size, digest)

    def load_strategy_state(self, round_index: int) -> dict[str, Tensor]:
        """The strategy state committed with round `round_index` (>= 1; before it there is none)."""
        path = self.strategy_path(round_index)
        if not path.exists():
            raise StateError(f"{path} is missing: round {round_index} was committed without its strategy state")
        return load_params_file(path)

    def commit_round(self, record: RunRecord, round_index: int, new_global: dict[str, Tensor],
                     strategy_state: dict[str, Tensor], round_metrics: dict[str, Any]) -> RunRecord:
        """Atomically make `new_global` version `round_index`, with strategy state and metrics.

        The versions before the last two committed go first, right before the new files are
        written: pages freed then are taken again at once, which costs a fraction of the CPU that
        pages freed a round earlier cost (docs/decisions.md). So between commits the disk holds
        the committed version and the two before it.
        """
        self._drop_versions_before(round_index - 2)
        save_params_file(self.global_path(round_index), new_global,
                         self._global_metadata(record, round_index, new_global))
        save_params_file(self.strategy_path(round_index), strategy_state)
        committed = RunRecord(
            committed_round=round_index, global_version=round_index, strategy=record.strategy,
            projector_shapes=record.projector_shapes, backbones=record.backbones, history=[*record.history, round_metrics], final_metrics=dict(record.final_metrics), done=False)
        self._write_record(committed)
        self._append_metrics({"event": "round", **round_metrics})
        self._recycle_uploads(round_index)
        return committed

    def commit_final(self, record: RunRecord, final_metrics: dict[str, float]) -> RunRecord:
        finished = RunRecord(**{**asdict(record), "final_metrics": dict(final_metrics), "done": True})
        self._write_record(finished)
        self._append_metrics({"event": "final", "global_version": record.global_version, **final_metrics})
        shutil.rmtree(self.spare_dir, ignore_errors=True)  # no upload comes after DONE
        return finished

    # ---- uploads ------------------------------------------------------------------------
    def upload_path(self, round_index: int, client_id: str) -> Path:
        if not CLIENT_ID_PATTERN.fullmatch(client_id):
            raise ValueError(f"client id {client_id!r} is not a safe name (letters, digits, . _ -; max 128)")
        return self.upload_dir(round_index) / f"{client_id}.safetensors"

    def has_upload(self, round_index: int, client_id: str) -> bool:
        return self.upload_path(round_index, client_id).with_suffix(".json").exists()

    async def spill_upload(self, round_index: int, client_id: str, num_samples: int, metrics: dict[str, float],
                           size: int, sha256: str, chunks: AsyncIterator[bytes],
                           layout: BlobLayout) -> SpilledUpload | None:
        """Stream an upload to disk, verifying it on the way, then publish it atomically.

        `layout` is the run's projector in its wire dtype: a blob of another size is refused
        before a byte is written, and every chunk is checked as it arrives: the header against
        the layout, then every value finite, and at the end size and sha256. One stream at a
        time per (client, round) and each into its own temp file, so the bytes published are
        exactly the bytes checked. Returns None, reading no chunk, when an upload of
        (client, round) is already published. Raises BlobIntegrityError on a bad upload and
        UploadStorageError when the disk fails; either way nothing is left behind.
        """
        path = self.upload_path(round_index, client_id)
        if not layout.admits_size(size):
            raise BlobIntegrityError(layout.explain_size(size))
        if any(key[0] < round_index for key in self._upload_locks):  # a new round: forget the old one's locks
            self._upload_locks = {key: lock for key, lock in self._upload_locks.items() if key[0] >= round_index}
        lock = self._upload_locks.setdefault((round_index, client_id), asyncio.Lock())
        async with lock:
            if self.has_upload(round_index, client_id):
                return None
            upload = SpilledUpload(client_id, round_index, num_samples, metrics, path)
            sink = await self._off_loop(self._open_sink, path, size, sha256, layout)
            try:
                async for chunk in chunks:
                    await self._off_loop(sink.add, chunk)
                await self._off_loop(sink.finish)
                record = {"client_id": client_id, "round": round_index, "num_samples": num_samples,
                          "metrics": metrics, "size": size, "sha256": sha256.lower(), "checks": UPLOAD_CHECKS}
                await self._off_loop(self._publish, sink.temp, path, record)
            finally:
                await self._off_loop(sink.discard)
            return upload

    async def _off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """Run disk work on the I/O pool; a failing disk becomes an UploadStorageError."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.io_pool, work, *args)
        except OSError as error:
            raise UploadStorageError(f"the coordinator could not store the upload: {error.strerror or error}",
                                     error.errno) from error

    def _open_sink(self, path: Path, size: int, sha256: str, layout: BlobLayout) -> _UploadSink:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f".{path.name}.{secrets.token_hex(8)}.part"
        if self._take_spare(temp):
            fd = os.open(temp, os.O_WRONLY)  # overwritten from the start, cut to size when finished
        else:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return _UploadSink(self._spill_file(fd), temp, size, sha256, layout)

    def _take_spare(self, temp: Path) -> bool:
        """Rename a spare tensor file, if one is left, to `temp`; atomic, so concurrent uploads never
        take the same one."""
        try:
            spares = sorted(self.spare_dir.iterdir())
        except FileNotFoundError:
            return False
        for spare in spares:
            try:
                os.rename(spare, temp)
                return True
            except FileNotFoundError:  # another upload took it first
                continue
        return False

    def _spill_file(self, fd: int) -> BinaryIO:
        """The file object an upload is written through (the seam fault-injection tests replace)."""
        return os.fdopen(fd, "wb")

    @staticmethod
    def _publish(temp: Path, path: Path, record: dict[str, Any]) -> None:
        """Tensors first, then the header that lists them: a crash in between publishes nothing."""
        os.replace(temp, path)
        write_atomic(path.with_suffix(".json"), json.dumps(record).encode())

    def uploads(self, round_index: int) -> list[SpilledUpload]:
        """Every published upload of a round that passed the arrival checks.

        A header that does not parse, that records no checks, or whose tensors file is missing or
        of another size (e.g. spilled by an older server, or damaged on disk) is dropped, with
        its files, and named in the log: a poisoned upload never reaches an aggregation, also not
        after a restart.
        """
        directory = self.upload_dir(round_index)
        if not directory.exists():
            return []
        found = []
        for header_file in sorted(directory.glob("*.json")):
            try:
                found.append(read_upload_header(header_file, round_index))
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("dropped the spilled upload %s of round %d: %s", header_file.stem, round_index, error)
                header_file.unlink(missing_ok=True)
                header_file.with_suffix(".safetensors").unlink(missing_ok=True)
        return found

    # ---- internals ----------------------------------------------------------------------
    def _global_metadata(self, record: RunRecord, version: int, params: dict[str, Tensor]) -> dict[str, str]:
        """What global `version` says about itself: recipe, backbones, widths, round."""
        recipe = Recipe.from_json(self.load_recipe_json())
        backbones = Backbones(**record.backbones) if record.backbones else Backbones(recipe.vision_model, recipe.llm,
                                                                                    "", "")
        text_hidden, vision_hidden = params["linear_1.weight"].shape
        return ProjectorProvenance.of(recipe, backbones, vision_hidden, text_hidden, version).to_metadata()

    def _write_record(self, record: RunRecord) -> None:
        write_atomic(self.run_file, json.dumps(asdict(record), indent=1).encode())

    def _append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _drop_versions_before(self, oldest_kept: int) -> None:
        """Delete the globals and strategy states of versions before `oldest_kept`: no resume needs them."""
        for version, path in [*_versions(self.root / "global", "v"), *_versions(self.root / "strategy", "r")]:
            if version < oldest_kept:
                path.unlink(missing_ok=True)

    def _recycle_uploads(self, committed_round: int) -> None:
        """The uploads of committed rounds become spares (see `spare_dir`); their headers go."""
        committed = [directory for round_index, directory in _versions(self.root / "uploads", "r")
                     if round_index <= committed_round]
        self._keep_spares([file for directory in committed for file in directory.glob("*.safetensors")])
        for directory in committed:
            shutil.rmtree(directory, ignore_errors=True)
        fsync_dir(self.root)

    def _keep_spares(self, tensor_files: list[Path]) -> None:
        """Make `tensor_files` the spares: those the last round left unused are surplus and go."""
        self.spare_dir.mkdir(parents=True, exist_ok=True)
        for surplus in self.spare_dir.iterdir():
            surplus.unlink(missing_ok=True)
        for file in tensor_files:
            os.replace(file, self.spare_dir / f"{secrets.token_hex(8)}.safetensors")


def _versions(directory: Path, prefix: str) -> list[tuple[int, Path]]:
    """(N, path) of every `{prefix}{N}` or `{prefix}{N}.safetensors` entry in `directory`."""
    pattern = re.compile(rf"^{prefix}(\d+)(\.safetensors)?$")
    if not directory.exists():
        return []
    return [(int(match[1]), entry) for entry in directory.iterdir() if (match := pattern.match(entry.name))]


def read_upload_header(header_file: Path, round_index: int) -> SpilledUpload:
    """The SpilledUpload a published header describes; ValueError unless it records passed checks."""
    header = json.loads(header_file.read_text())
    if header.get("checks") != UPLOAD_CHECKS:
        raise ValueError(f"it records checks {header.get('checks')!r}, not {UPLOAD_CHECKS!r}")
    client_id, num_samples, metrics = header["client_id"], header["num_samples"], header["metrics"]
    if client_id != header_file.stem or header["round"] != round_index:
        raise ValueError(f"its header names client {client_id!r}, round {header['round']}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples {num_samples!r} is not a positive integer")
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in metrics.values()):
        raise ValueError("its metrics hold non-numbers or non-finite values")
    tensors = header_file.with_suffix(".safetensors")
    if tensors.stat().st_size != header["size"]:
        raise ValueError(f"{tensors.name} holds {tensors.stat().st_size} bytes, {header['size']} were verified")
    return SpilledUpload(client_id, round_index, num_samples, dict(metrics), tensors)
