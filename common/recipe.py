"""The training recipe: one validated pydantic model the coordinator owns and sends to clients.

Loadable from YAML or JSON; every field can be overridden from the command line
(`--rounds 5` overrides `rounds`, see fedcmp.common.recipe_flags). Unknown fields and bad
values are refused with a message that names the field. On `--resume` only the
OPERATIONAL_FIELDS may change (`resumed_recipe`): the others define the model and training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedcmp.common.projector import PROJECTOR_TYPES


FINGERPRINT_PATTERN = r"^[0-9a-f]{64}$"  # a hex sha256


class RecipeError(ValueError):
    """A recipe that cannot be used; the message says which field and why."""


class Recipe(BaseModel):
    """Everything that defines a federated projector pre-training run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # Backbones: "micro" (the embedded zoo), a Hugging Face hub id, or a local directory.
    vision_model: str = "micro"
    llm: str = "micro"
    projector_type: str = "mlp2x_gelu"
    vision_feature_layer: int = -2  # LLaVA uses the penultimate layer of the vision tower
    vision_feature_select: Literal["default", "full"] = "default"  # default drops CLS
    # Pins: only clients whose backbone files have these fingerprints (fedcmp.client.fingerprint) may join.
    # Unpinned, those most live clients share when round 1 opens become the run's.
    vision_fingerprint: str | None = Field(default=None, pattern=FINGERPRINT_PATTERN)
    llm_fingerprint: str | None = Field(default=None, pattern=FINGERPRINT_PATTERN)
    max_caption_tokens: int = Field(default=48, ge=4)
    # Frozen vision features: computed once into a memory-mapped cache on disk, or by the tower on
    # every batch ("off"; a client may choose with --feature-cache). Both round them to feature_dtype.
    feature_cache: Literal["disk", "off"] = "disk"
    feature_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"

    # Federation.
    strategy: str = "fedavg"
    strategy_params: dict[str, float] = Field(default_factory=dict)
    rounds: int = Field(default=5, ge=1)
    min_clients: int = Field(default=2, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1)  # None: every registered client
    round_timeout_s: float = Field(default=600.0, gt=0)
    quorum: float = Field(default=1.0, gt=0, le=1)  # fraction of live selected clients needed at the deadline
    max_clients: int | None = Field(default=None, ge=1)  # None: no cap on registered clients

    # Liveness: clients heartbeat while they work; one not heard from for client_timeout_s is gone.
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    client_timeout_s: float = Field(default=60.0, gt=0)

    # Projector admission: widths pinned here fix the projector shape before any client registers;
    # otherwise the clients present when round 1 starts fix it (see docs/operations.md).
    vision_hidden: int | None = Field(default=None, ge=1)
    text_hidden: int | None = Field(default=None, ge=1)
    max_projector_params: int = Field(default=80_000_000, ge=1)  # LLaVA projectors of up to 70B LLMs fit
    # dtype of projector blobs on the wire, both ways; the server aggregates in float32 whatever it is.
    wire_dtype: Literal["float32", "bfloat16"] = "float32"

    # Local training.
    local_steps: int | None = Field(default=None, ge=1)  # None: derived from `epochs` (one pass overall)
    epochs: float = Field(default=1.0, gt=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=2e-3, gt=0)  # peak rate
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # over the whole run (LLaVA: cosine)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)  # of the run's steps (LLaVA: 0.03)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=16, ge=1)  # effective: examples per optimizer step
    micro_batch_size: int | None = Field(default=None, ge=1)  # examples per forward; None: batch_size
    proximal_mu: float = Field(default=0.0, ge=0)  # FedProx's mu/2 ||w - w_t||^2 on the client
    val_fraction: float = Field(default=0.1, ge=0, lt=1)  # carved from each client's data, never trained on
    # Precision and memory (fedcmp.client.precision): auto = bf16 on CUDA (fp16 where the GPU has no
    # bf16), fp32 on CPU; LLaVA's stage 1 trains in bf16.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False  # recompute the frozen LM's activations in the backward
    seed: int = 0

    @field_validator("projector_type")
    @classmethod
    def _known_projector(cls, value: str) -> str:
        if value not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector type {value!r}; known: {', '.join(PROJECTOR_TYPES)}")
        return value

    @model_validator(mode="after")
    def _liveness_is_consistent(self) -> Recipe:
        if self.client_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError(f"client_timeout_s ({self.client_timeout_s:g}) must be at least twice "
                             f"heartbeat_interval_s ({self.heartbeat_interval_s:g}), or live clients count as gone")
        if (self.vision_hidden is None) != (self.text_hidden is None):
            raise ValueError("vision_hidden and text_hidden pin the projector together: give both or neither")
        return self

    @property
    def forward_batch_size(self) -> int:
        """Examples per forward pass: `micro_batch_size`, never more than `batch_size`."""
        return min(self.batch_size, self.micro_batch_size or self.batch_size)

    def local_steps_for(self, num_train_samples: int) -> int:
        """Optimizer steps per round for a client holding `num_train_samples` examples.

        Without an explicit `local_steps`, the client makes `epochs` passes over its data across
        the whole run (one-pass collaborative SGD by default), spread evenly over the rounds.
        """
        if self.local_steps is not None:
            return self.local_steps
        total_batches = self.epochs * num_train_samples / self.batch_size
        return max(1, round(total_batches / self.rounds))

    def overridden(self, overrides: dict[str, Any], source: str) -> Recipe:
        """This recipe with the non-None `overrides` applied and validated (a RecipeError names the field)."""
        data = self.model_dump()
        data.update({key: value for key, value in overrides.items() if value is not None})
        return _validated(data, source)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return _validated(json.loads(text), "recipe sent by the coordinator")


# Fields `--resume` may change: how the run is operated, not what it trains.
OPERATIONAL_FIELDS = frozenset({"rounds", "min_clients", "quorum", "round_timeout_s", "max_clients",
                                "heartbeat_interval_s", "client_timeout_s"})


def load_recipe(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML/JSON recipe (or the defaults) and apply non-None overrides on top.

    An override key `field.key` sets one entry of a dict field (`strategy_params.rho`).
    """
    data = read_recipe_file(path) if path is not None else {}
    return _validated(apply_overrides(data, overrides or {}), str(path) if path is not None else "defaults")


def resumed_recipe(stored: Recipe, path: Path | None, overrides: dict[str, Any]) -> Recipe:
    """The recipe a resumed run continues with: the stored one, with operational changes only.

    `path` (a recipe file) and `overrides` are read as for a fresh run, on top of the stored
    recipe when no file is given. Any difference outside OPERATIONAL_FIELDS is refused with a
    message naming the fields.
    """
    data = read_recipe_file(path) if path is not None else stored.model_dump()
    asked = _validated(apply_overrides(data, overrides), "resume")
    changed = sorted(name for name in Recipe.model_fields if getattr(asked, name) != getattr(stored, name))
    fixed = [name for name in changed if name not in OPERATIONAL_FIELDS]
    if fixed:
        kept = ", ".join(f"{name}={getattr(stored, name)!r}" for name in fixed)
        raise RecipeError(f"--resume cannot change {', '.join(fixed)}: they define the model and its training "
                          f"(the stored recipe has {kept}); only {', '.join(sorted(OPERATIONAL_FIELDS))} may "
                          "change; start a new --state-dir to change the others")
    return asked


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`data` with the non-None `overrides` on top; `field.key` keys set one entry of a dict field."""
    merged = dict(data)
    for key, value in overrides.items():
        if value is None:
            continue
        name, dot, entry = key.partition(".")
        if not dot:
            merged[name] = value
            continue
        field = Recipe.model_fields.get(name)
        current = merged.get(name, field.get_default(call_default_factory=True) if field else {})
        if not isinstance(current, dict):
            raise RecipeError(f"cannot set {key}: recipe field {name} is not a mapping")
        merged[name] = {**current, entry: value}
    return merged


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The mapping a YAML/JSON recipe file holds (RecipeError when it cannot be read or is not one)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror}") from error
    try:
        loaded = yaml.safe_load(text) if Path(path).suffix in {".yaml", ".yml"} else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise RecipeError(f"recipe {path} is not valid {Path(path).suffix[1:].upper() or 'JSON'}: {error}") from error
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise RecipeError(f"recipe {path} must be a mapping of field: value, got {type(loaded).__name__}")
    return loaded


def _validated(data: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or 'recipe'}: {issue['msg']}" for issue in error.errors()
        )
        raise RecipeError(f"invalid recipe ({source}): {problems}") from error
