"""The training recipe: one validated pydantic model the coordinator owns and sends to clients.

Loadable from YAML or JSON; every field can be overridden from the command line
(`--rounds 5` overrides `rounds`). Unknown fields and bad values are refused with a message
that names the field.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    # Unpinned, the first client's fingerprints become the run's.
    vision_fingerprint: str | None = Field(default=None, pattern=FINGERPRINT_PATTERN)
    llm_fingerprint: str | None = Field(default=None, pattern=FINGERPRINT_PATTERN)
    max_caption_tokens: int = Field(default=48, ge=4)

    # Federation.
    strategy: str = "fedavg"
    strategy_params: dict[str, float] = Field(default_factory=dict)
    rounds: int = Field(default=5, ge=1)
    min_clients: int = Field(default=2, ge=1)
    clients_per_round: int | None = Field(default=None, ge=1)  # None: every registered client
    round_timeout_s: float = Field(default=600.0, gt=0)
    quorum: float = Field(default=1.0, gt=0, le=1)  # fraction of selected clients needed at the deadline

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


def load_recipe(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read a YAML/JSON recipe (or the defaults) and apply non-None overrides on top."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
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
        data.update(loaded)
    data.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return _validated(data, source)


def _validated(data: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or 'recipe'}: {issue['msg']}" for issue in error.errors()
        )
        raise RecipeError(f"invalid recipe ({source}): {problems}") from error
