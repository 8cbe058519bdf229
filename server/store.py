"""The coordinator's durable state dir: spilled uploads, committed rounds, resumable runs.

Layout under `--state-dir`:

    recipe.json                      the run's recipe (written once)
    run.json                         the commit record: the last committed round and what it names
    global/v{N}.safetensors          global projector versions (the committed one and its predecessor),
                                     with fedcmp's projector metadata (fedcmp.common.provenance)
    strategy/r{N}.safetensors        strategy state (momentum, moments, basis, counters) after round N
    uploads/r{N}/{client}.safetensors + .json    accepted client uploads, spilled as they arrive
    metrics.jsonl                    one JSON line per committed round (and the final evaluation)

Every file is written temp -> fsync -> rename; `run.json` is renamed last, so it is the commit
point: a crash at any moment leaves the previous commit intact and loadable.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, overload

import torch
from torch import Tensor

from fedcmp.common.codec import BlobIntegrityError, BlobReceiver, fsync_dir, load_params_file, save_params_file, write_atomic
from fedcmp.common.provenance import Backbones, ProjectorProvenance
from fedcmp.common.recipe import Recipe
from fedcmp.server.strategies import ClientUpdate

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # use with fullmatch


class StateError(RuntimeError):
    """The state dir cannot be used as asked (e.g. holds a run but --resume was not given)."""


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
        return ClientUpdate(upload.client_id, upload.num_samples, load_params_file(upload.path), upload.metrics)


def check_contents(params: dict[str, Tensor], expected_shapes: dict[str, list[int]]) -> None:
    """Raise BlobIntegrityError unless `params` has exactly the expected keys and shapes, all finite."""
    shapes = {key: list(value.shape) for key, value in params.items()}
    if shapes != expected_shapes:
        raise BlobIntegrityError(f"tensors {shapes} do not match the projector {expected_shapes}")
    bad = [key for key, value in params.items() if not torch.isfinite(value).all()]
    if bad:
        raise BlobIntegrityError(f"non-finite values (NaN/inf) in {', '.join(sorted(bad))}")


class RunStore:
    """Reads and writes one run's state dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

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
        return fixed

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
        return load_params_file(self.global_path(version))

    def save_recipe_json(self, recipe_json: str) -> None:
        """Replace the stored recipe (a resume that changed operational fields)."""
        write_atomic(self.recipe_file, recipe_json.encode())

    def load_strategy_state(self, round_index: int) -> dict[str, Tensor]:
        """The strategy state committed with round `round_index` (>= 1; before it there is none)."""
        path = self.strategy_path(round_index)
        if not path.exists():
            raise StateError(f"{path} is missing: round {round_index} was committed without its strategy state")
        return load_params_file(path)

    def commit_round(self, record: RunRecord, round_index: int, new_global: dict[str, Tensor],
                     strategy_state: dict[str, Tensor], round_metrics: dict[str, Any]) -> RunRecord:
        """Atomically make `new_global` version `round_index`, with strategy state and metrics."""
        save_params_file(self.global_path(round_index), new_global,
                         self._global_metadata(record, round_index, new_global))
        save_params_file(self.strategy_path(round_index), strategy_state)
        committed = RunRecord(
            committed_round=round_index, global_version=round_index, strategy=record.strategy,
            projector_shapes=record.projector_shapes, backbones=record.backbones, history=[*record.history, round_metrics], final_metrics=dict(record.final_metrics), done=False)
        self._write_record(committed)
        self._append_metrics({"event": "round", **round_metrics})
        self._prune(round_index)
        return committed

    def commit_final(self, record: RunRecord, final_metrics: dict[str, float]) -> RunRecord:
        finished = RunRecord(**{**asdict(record), "final_metrics": dict(final_metrics), "done": True})
        self._write_record(finished)
        self._append_metrics({"event": "final", "global_version": record.global_version, **final_metrics})
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
                           expected_shapes: dict[str, list[int]] | None = None) -> SpilledUpload:
        """Stream an upload's chunks to disk, verify size, digest and contents, then publish it atomically.

        The tensors land first and the small header file last, so a half-written upload is
        never listed. Raises BlobIntegrityError (and leaves nothing behind) on a bad transfer,
        or on tensors whose keys or shapes differ from `expected_shapes` or that hold NaN/inf:
        one bad upload must never reach, let alone poison, the aggregation.
        """
        path = self.upload_path(round_index, client_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.part-{os.getpid()}")
        try:
            with open(temp, "wb") as sink:
                receiver = BlobReceiver(size, sha256, sink)
                async for chunk in chunks:
                    receiver.add(chunk)
                receiver.finish()
                sink.flush()
                os.fsync(sink.fileno())
            if expected_shapes is not None:
                check_contents(load_params_file(temp), expected_shapes)
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        header = {"client_id": client_id, "round": round_index, "num_samples": num_samples, "metrics": metrics}
        write_atomic(path.with_suffix(".json"), json.dumps(header).encode())
        return SpilledUpload(client_id, round_index, num_samples, metrics, path)

    def uploads(self, round_index: int) -> list[SpilledUpload]:
        """Every published upload of a round (a crash mid-transfer leaves none of its bytes listed)."""
        directory = self.upload_dir(round_index)
        if not directory.exists():
            return []
        found = []
        for header_file in sorted(directory.glob("*.json")):
            header = json.loads(header_file.read_text())
            found.append(SpilledUpload(header["client_id"], header["round"], header["num_samples"],
                                       header["metrics"], header_file.with_suffix(".safetensors")))
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

    def _prune(self, committed_round: int) -> None:
        """Drop what no resume can need: global versions and state older than the predecessor, old uploads."""
        for stale in (self.global_path(committed_round - 2), self.strategy_path(committed_round - 2)):
            stale.unlink(missing_ok=True)
        shutil.rmtree(self.upload_dir(committed_round), ignore_errors=True)
        fsync_dir(self.root)
