"""Where an export starts: a state dir's committed global (or an older retained round) or one projector file.

The state dir is read as files, not through the server: `run.json` names the committed global
version, and round N's global is `global/v{N}.safetensors` (the store keeps the committed one
and the two before it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from fedcmp.common.codec import BlobIntegrityError, load_params_file, load_params_metadata
from fedcmp.common.projector import PROJECTOR_TYPES, projector_shapes
from fedcmp.common.provenance import ProjectorProvenance, ProvenanceError


class ExportError(ValueError):
    """An export that cannot be made as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ProjectorFile:
    """A projector's tensors (keyed `linear_1.weight`, ...) and what its metadata says about it."""

    path: Path
    params: dict[str, Tensor]
    provenance: ProjectorProvenance | None  # None: a file without fedcmp metadata

    @property
    def projector_type(self) -> str:
        """From the metadata, else from the keys (a `linear_2` makes it `mlp2x_gelu`)."""
        if self.provenance is not None:
            return self.provenance.projector_type
        return "mlp2x_gelu" if "linear_2.weight" in self.params else "linear"


def locate_projector(source: Path, round_index: int | None = None) -> Path:
    """The projector file an export reads: `source` itself, or a state dir's global of `round_index` (default: latest)."""
    if not source.exists():
        raise ExportError(f"{source} does not exist")
    if source.is_file():
        if round_index is not None:
            raise ExportError("--round selects a round of a state dir; the source given is a single file")
        return source
    run_file = source / "run.json"
    try:
        committed = int(json.loads(run_file.read_text())["global_version"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{source} is not a fedcmp state dir (cannot read the committed version from "
                          f"{run_file.name}: {error})") from error
    version = committed if round_index is None else round_index
    path = source / "global" / f"v{version}.safetensors"
    if version > committed or not path.exists():
        kept = sorted(int(found.stem[1:]) for found in (source / "global").glob("v*.safetensors"))
        raise ExportError(f"round {version} has no global projector in {source} (committed: round {committed}; "
                          f"rounds still on disk: {', '.join(map(str, kept)) or 'none'})")
    return path


def read_projector(path: Path) -> ProjectorFile:
    """Load a projector file and its metadata; refuse anything that is not a fedcmp projector."""
    try:
        params = load_params_file(path)
        metadata = load_params_metadata(path)
    except BlobIntegrityError as error:
        raise ExportError(str(error)) from error
    try:
        provenance = ProjectorProvenance.from_metadata(metadata, str(path))
    except ProvenanceError:
        provenance = None
    projector = ProjectorFile(path, params, provenance)
    first = params.get("linear_1.weight")
    if first is None or first.dim() != 2:
        raise ExportError(f"{path} holds no projector (expected linear_1.weight, got {', '.join(sorted(params))})")
    expected = projector_shapes(projector.projector_type, vision_hidden=first.shape[1], text_hidden=first.shape[0])
    got = {key: tuple(value.shape) for key, value in params.items()}
    if got != expected:
        raise ExportError(f"{path} is not a {projector.projector_type} projector ({', '.join(PROJECTOR_TYPES)} "
                          f"known): tensors {got}, expected {expected}")
    return projector
