"""The training run's settings and the recipe: (model, training pairs, training run).

:class:`TrainConfig` holds everything :class:`durian.training.loop.Trainer` takes; the params
file's ``train`` section is a subclass of it (adding what only the orchestration reads: Ray
workers, checkpoint cadence, logging), so there is one set of defaults. A :class:`Recipe` is
the three configs that define what a run trains; :func:`config_hash` names it, and a saved model
folder records it (:data:`RECIPE_FILE`), so two ways of training (``durian run``, the
learns-transfer benchmark) can be shown to train the same model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from durian.data.pair_config import PairConfig
from durian.models.config import ModelConfig

RECIPE_FILE = "training_recipe.json"


class TrainConfig(BaseModel):
    """One stage's optimisation: what the trainer does with the model and the batches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Literal[1, 2] = 1
    steps: int = Field(30, ge=1)
    lr: float = Field(1e-4, gt=0, le=1.0)
    # diffusers.optimization schedules of the learning rate over ``steps``.
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0)  # AdamW's
    batch_size: int = Field(2, ge=1)  # per worker
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    # Speed/memory: autocast on GPU (fp16 adds a GradScaler; bf16 also works on CPU).
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    loader_workers: int = Field(0, ge=0, le=64)  # DataLoader processes per worker
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    noise_offset: float = Field(0.0, ge=0, le=1)
    # diffusers' timestep bias: "later" trains the noisiest timesteps (where few-step sampling
    # starts) ``multiplier`` times as often over the last ``portion`` of the schedule.
    timestep_bias: Literal["none", "later", "earlier"] = "none"
    timestep_bias_multiplier: float = Field(1.0, gt=0)
    timestep_bias_portion: float = Field(0.25, gt=0, le=1)
    ema: bool = False  # EMA of the trainable weights; exported instead of the raw weights
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    # Where the EMA copy lives: "same" as the model, or "cpu" (frees an fp32 copy of every
    # trained parameter on the GPU; costs a device-to-host copy of them per step).
    ema_device: Literal["same", "cpu"] = "same"
    # ZeRO-1: each data-parallel worker keeps 1/N of the optimizer state (torch's
    # ZeroRedundancyOptimizer); a checkpoint gathers it on rank 0.
    shard_optimizer: bool = False
    # Full sharding (torch's FSDP2, durian/training/sharding.py): each worker keeps 1/N of the
    # trained weights, gradients, AdamW state and EMA; instead of DDP and shard_optimizer.
    fsdp: bool = False
    init_from: str | None = None  # a save_pretrained folder to start from (stage 2: stage 1's)
    resume_data: Literal["skip", "reseed"] = "skip"  # data position on resume (see loop.py)

    @model_validator(mode="after")
    def _one_sharding(self) -> TrainConfig:
        if self.fsdp:
            if self.shard_optimizer:
                raise ValueError("fsdp shards the optimizer state already: drop shard_optimizer")
            if self.ema and self.ema_device == "cpu":
                raise ValueError("with fsdp the EMA is sharded like the weights: ema_device same")
            if self.mixed_precision == "fp16":
                # GradScaler finds infs per worker in its shard only: workers would disagree
                # on skipping a step.
                raise ValueError("fsdp trains in bf16 or fp32 (mixed_precision bf16 or no)")
        return self


def library_fields(config: BaseModel, cls: type[BaseModel]) -> dict[str, Any]:
    """The dump of ``config`` restricted to ``cls``'s fields (an app subclass adds its own)."""
    return config.model_dump(mode="json", include=set(cls.model_fields))


class Recipe(BaseModel):
    """What a training run trains: the model, the training pairs, the optimisation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    pair: PairConfig = PairConfig()
    train: TrainConfig = TrainConfig()

    def canonical(self) -> dict[str, Any]:
        """The library fields of the three sections as JSON data (an app subclass's extra
        fields, e.g. Ray's worker count, do not change what the model is)."""
        return {
            "model": library_fields(self.model, ModelConfig),
            "pair": library_fields(self.pair, PairConfig),
            "train": library_fields(self.train, TrainConfig),
        }

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of :meth:`canonical`: equal hashes, same recipe."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def save_recipe(folder: str | Path, recipe: Recipe) -> Path:
    """Write the recipe and its hash next to a saved model (:data:`RECIPE_FILE`)."""
    path = Path(folder) / RECIPE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"config_hash": recipe.config_hash(), **recipe.canonical()}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_recipe_hash(folder: str | Path) -> str | None:
    """The config hash a saved model folder records (None: saved without a recipe)."""
    path = Path(folder) / RECIPE_FILE
    return json.loads(path.read_text())["config_hash"] if path.exists() else None
