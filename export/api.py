"""`export_projector`: one call from a state dir or projector file to the LLaVA and transformers layouts."""
from __future__ import annotations

import logging
from pathlib import Path

from fedcmp.export.llava import write_llava_projector
from fedcmp.export.source import ExportError, locate_projector, read_projector
from fedcmp.export.transformers_dir import check_transformers_exportable, write_transformers_dir

log = logging.getLogger("fedcmp.export")

FORMATS = ("llava", "transformers")
LLAVA_SUBDIR = "llava"
TRANSFORMERS_SUBDIR = "transformers"


def export_projector(source: Path, out: Path, formats: tuple[str, ...] | None = None, round_index: int | None = None,
                     vision_model: str | None = None, llm: str | None = None,
                     cache_dir: Path | None = None) -> dict[str, list[Path]]:
    """Write `out/llava/mm_projector.{bin,safetensors}` and/or the Llava directory `out/transformers/`.

    `formats` None means every format the projector fits (`linear`: LLaVA only); naming
    `transformers` for a `linear` projector raises ExportError. Returns the files per format.
    """
    unknown = set(formats or ()) - set(FORMATS)
    if unknown:
        raise ExportError(f"unknown export format(s) {', '.join(sorted(unknown))}; known: {', '.join(FORMATS)}")
    projector = read_projector(locate_projector(Path(source), round_index))
    if formats is None:
        formats = FORMATS if projector.projector_type == "mlp2x_gelu" else ("llava",)
    if "transformers" in formats:
        check_transformers_exportable(projector)  # refuse before writing anything
    metadata = projector.provenance.to_metadata() if projector.provenance else None
    written: dict[str, list[Path]] = {}
    if "llava" in formats:
        written["llava"] = write_llava_projector(projector.params, projector.projector_type, Path(out) / LLAVA_SUBDIR,
                                                 metadata)
    if "transformers" in formats:
        written["transformers"] = write_transformers_dir(projector, Path(out) / TRANSFORMERS_SUBDIR, vision_model, llm,
                                                         cache_dir)
    log.info("exported %s (%s) to %s", projector.path, projector.projector_type,
             ", ".join(f"{name}: {Path(out) / name}" for name in written))
    return written
