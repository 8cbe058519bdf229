"""A transformers Llava directory: `LlavaForConditionalGeneration` + tokenizer + `LlavaProcessor`.

The model is composed exactly as a client composes it (`fedcmp.client.model.ProjectorMLLM`:
the backbones' pretrained modules inside a `LlavaForConditionalGeneration`, `<image>` added to
the tokenizer when the LM lacks it), the exported projector is copied into
`multi_modal_projector`, and the whole is written with `save_pretrained`, so that
`LlavaForConditionalGeneration.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)`
load it and `generate` runs. Only `mlp2x_gelu` fits: transformers' `LlavaMultiModalProjector`
is always Linear-GELU-Linear, so a `linear` projector is refused.
"""
from __future__ import annotations

from pathlib import Path

from transformers import LlavaProcessor

from fedcmp.client.fingerprint import fingerprint_backbones
from fedcmp.client.model import ProjectorMLLM
from fedcmp.common.provenance import ProjectorProvenance, short
from fedcmp.common.recipe import Recipe
from fedcmp.export.source import ExportError, ProjectorFile

# CLIP-style towers put one CLS token before the patches; LlavaProcessor counts it as "additional".
CLS_TOKENS = 1


def check_transformers_exportable(projector: ProjectorFile) -> ProjectorProvenance:
    """The projector's provenance, or ExportError when transformers' Llava cannot hold it."""
    if projector.projector_type != "mlp2x_gelu":
        raise ExportError(f"{projector.path} is a {projector.projector_type!r} projector: transformers' Llava has "
                          "no such projector (its LlavaMultiModalProjector is always Linear-GELU-Linear, i.e. "
                          "mlp2x_gelu); export it with --format llava and load it in LLaVA "
                          "(--pretrain_mm_mlp_adapter mm_projector.bin --mm_projector_type linear)")
    if projector.provenance is None:
        raise ExportError(f"{projector.path} carries no fedcmp metadata, so its backbones, feature layer and "
                          "selection are unknown; export from the state dir or a projector file fedcmp wrote")
    return projector.provenance


def write_transformers_dir(projector: ProjectorFile, out: Path, vision_model: str | None = None,
                           llm: str | None = None, cache_dir: Path | None = None) -> list[Path]:
    """Compose, check and save the Llava directory; the backbones default to those the metadata names.

    Refuses backbones whose fingerprints differ from the ones the projector was trained against.
    """
    provenance = check_transformers_exportable(projector)
    vision_model = vision_model or provenance.vision_model
    llm = llm or provenance.llm
    found = fingerprint_backbones(vision_model, llm, cache_dir)
    for kind, trained, given, name in (
            ("vision tower", provenance.vision_fingerprint, found.vision_fingerprint, vision_model),
            ("LLM", provenance.llm_fingerprint, found.llm_fingerprint, llm)):
        if trained != given:
            raise ExportError(f"the {kind} {name!r} has fingerprint {short(given)}, but {projector.path} was trained "
                              f"against {short(trained)}; pass the backbone it was trained with "
                              "(--vision-model / --llm)")
    recipe = Recipe(vision_model=vision_model, llm=llm, projector_type=provenance.projector_type,
                    vision_feature_layer=provenance.vision_feature_layer,
                    vision_feature_select=provenance.vision_feature_select)
    model = ProjectorMLLM.from_pretrained(vision_model, llm, recipe, device="cpu", cache_dir=cache_dir)
    try:
        model.load_projector_params(projector.params)
    except ValueError as error:
        raise ExportError(f"{projector.path} does not fit these backbones: {error}") from error
    processor = LlavaProcessor(image_processor=model.image_processor, tokenizer=model.tokenizer,
                               patch_size=model.llava.config.vision_config.patch_size,
                               vision_feature_select_strategy=provenance.vision_feature_select,
                               num_additional_image_tokens=CLS_TOKENS)
    out.mkdir(parents=True, exist_ok=True)
    model.llava.save_pretrained(out)
    processor.save_pretrained(out)  # also saves the tokenizer (with <image>) and the image processor
    return sorted(out.iterdir())
