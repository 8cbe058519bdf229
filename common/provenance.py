"""What a projector was trained against: backbone identity and the metadata every projector file carries.

`Backbones` names the frozen vision tower and LM (as the recipe or the site named them) with
their fingerprints (`fedcmp.client.fingerprint`). `ProjectorProvenance` is the safetensors
metadata of every projector file fedcmp writes — globals, uploads, exports — so a file found on
a disk says what it is: projector type and widths, backbones, feature layer and selection,
template, round, strategy and the sha256 of the recipe that produced it.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

from fedcmp.common.recipe import Recipe

METADATA_PREFIX = "fedcmp."
# The caption template of the LLaVA stage-1 (`plain`) sequence the client trains on.
TEMPLATE = "plain"


class ProvenanceError(ValueError):
    """Projector metadata that is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class Backbones:
    """The frozen backbones a projector sits between: names and fingerprints."""

    vision_model: str
    llm: str
    vision_fingerprint: str
    llm_fingerprint: str

    def describe(self) -> str:
        """e.g. `vision micro [3f2a9c01d4e5] + llm micro [77b0e1c2aa90]`."""
        return (f"vision {self.vision_model} [{short(self.vision_fingerprint)}] + "
                f"llm {self.llm} [{short(self.llm_fingerprint)}]")


def short(fingerprint: str) -> str:
    """The first 12 hex digits of a fingerprint, as logs and tables show it."""
    return fingerprint[:12] if fingerprint else "none"


def recipe_sha256(recipe: Recipe) -> str:
    """sha256 of the recipe's canonical JSON: equal recipes hash equal."""
    return hashlib.sha256(recipe.to_json().encode()).hexdigest()


@dataclass(frozen=True)
class ProjectorProvenance:
    """The metadata of one projector file (all values travel as strings in the safetensors header)."""

    projector_type: str
    vision_hidden: int
    text_hidden: int
    vision_model: str
    llm: str
    vision_fingerprint: str
    llm_fingerprint: str
    vision_feature_layer: int
    vision_feature_select: str
    template: str
    round: int
    strategy: str
    recipe_sha256: str

    @classmethod
    def of(cls, recipe: Recipe, backbones: Backbones, vision_hidden: int, text_hidden: int,
           round_index: int) -> ProjectorProvenance:
        return cls(
            projector_type=recipe.projector_type, vision_hidden=vision_hidden, text_hidden=text_hidden,
            vision_model=backbones.vision_model, llm=backbones.llm,
            vision_fingerprint=backbones.vision_fingerprint, llm_fingerprint=backbones.llm_fingerprint,
            vision_feature_layer=recipe.vision_feature_layer, vision_feature_select=recipe.vision_feature_select,
            template=TEMPLATE, round=round_index, strategy=recipe.strategy, recipe_sha256=recipe_sha256(recipe))

    @property
    def backbones(self) -> Backbones:
        return Backbones(self.vision_model, self.llm, self.vision_fingerprint, self.llm_fingerprint)

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata: `format: pt` (as transformers writes it) plus `fedcmp.<field>` keys."""
        return {"format": "pt", **{METADATA_PREFIX + key: str(value) for key, value in asdict(self).items()}}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str] | None, source: str) -> ProjectorProvenance:
        """Parse what `to_metadata` wrote; ProvenanceError names the first missing or malformed key."""
        metadata = metadata or {}
        values: dict[str, object] = {}
        for field in fields(cls):
            key = METADATA_PREFIX + field.name
            if key not in metadata:
                raise ProvenanceError(f"{source} carries no fedcmp metadata {key!r} (a projector file written by "
                                      "an older fedcmp, or by another tool)")
            try:
                values[field.name] = int(metadata[key]) if field.type == "int" else metadata[key]
            except ValueError as error:
                raise ProvenanceError(f"{source}: metadata {key}={metadata[key]!r} is not an integer") from error
        return cls(**values)  # type: ignore[arg-type]
