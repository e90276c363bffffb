"""The training loop, free of any orchestrator: Ray Train (``flows/train.py``), a plain
single-process loop (benchmarks) and tests all drive this same :class:`Trainer`.

Determinism and resumption. Every random draw of a step (VAE sample, noise, timesteps) comes
from a generator seeded by ``(seed, rank, step, micro-batch)``, and the data stream of a rank is
a pure function of the loader seed. A checkpoint records the step and the *data position* (the
loader seed and how many batches this rank has consumed from that stream). On resume:

* ``resume_data="skip"`` (default): rebuild the same stream and skip the consumed batches, so a
  resumed run sees exactly the batches an uninterrupted run would have seen and ends with the
  same weights. Skipping decodes the skipped samples (no model compute): cheap for the sample
  data, minutes-to-hours at the paper's 60k steps.
* ``resume_data="reseed"``: start a fresh stream with a seed derived from ``(seed, step)``: no
  replay of the batches already seen, no skipping cost, but not bit-identical to an
  uninterrupted run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers.optimization import get_scheduler

from durian.data.loader import make_loader
from durian.data.masks import MaskBank
from durian.data.pairs import PairConfig
from durian.models.durian_model import DurianModel
from durian.models.profiles import build_model, load_sd15, noise_scheduler_for
from durian.training.ema import EMA, copy_ema_weights
from durian.training.preview import predict_x0, preview_grid
from durian.training.state import (
    load_ema,
    load_scaler,
    load_training_state,
    read_state,
    save_training_state,
)
from durian.training.step import timestep_weights, training_loss

MixedPrecision = Literal["no", "fp16", "bf16"]
ResumeData = Literal["skip", "reseed"]


def model_from_config(
    profile: str,
    resolution: int,
    pretrained: str | None = None,
    image_encoder: str | None = None,
    motion_module: str | None = None,
) -> DurianModel:
    """The ``model`` section of params → a model: SD 1.5 weights from local folders when
    ``pretrained`` names one, else the profile's fresh initialisation."""
    if pretrained:
        return load_sd15(pretrained, image_encoder, motion_module, resolution=resolution)
    if profile == "sd15":
        # Without weights the sd15 shape is only useful for benchmarks; say it loudly.
        warnings.warn("profile sd15 without model.pretrained: random initialisation", stacklevel=2)
    model = build_model(profile, resolution=resolution)
    if motion_module:
        model.add_temporal_module(checkpoint=motion_module)
    return model


def build_training_model(config: dict[str, Any]) -> DurianModel:
    """The model a run starts from: ``init_from`` (a ``save_pretrained`` folder, e.g. the stage-1
    result for stage 2) when given, else :func:`model_from_config` of the ``model`` section.
    Seeded from ``seed`` alone, so every rank builds the same initial weights."""
    torch.manual_seed(int(config.get("seed", 0)))
    init_from = config.get("init_from")
    if init_from:
        model = DurianModel.from_pretrained(str(init_from))
        motion = config["model"].get("motion_module")
        if motion and model.temporal is None:
            model.add_temporal_module(checkpoint=motion)
        return model
    return model_from_config(**config["model"])


def step_generator(seed: int, rank: int, step: int, micro: int = 0) -> torch.Generator:
    """The CPU generator of one micro-batch: a pure function of where it is in the run."""
    state = np.random.SeedSequence([int(seed), int(rank), int(step), int(micro)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def reseeded_data_seed(seed: int, step: int) -> int:
    """The loader seed of a stream restarted at ``step`` (``resume_data="reseed"``)."""
    return int(np.random.SeedSequence([int(seed), int(step), 0xDA7A]).generate_state(1)[0])


@dataclass
class BatchSource:
    """A rank's batches as a deterministic stream per loader seed (see the module docstring)."""

    shards: list[str]
    pair: PairConfig
    batch_size: int
    rank: int = 0
    world_size: int = 1
    mask_bank: MaskBank | None = None
    num_workers: int = 0

    def stream(self, seed: int) -> Iterator[dict[str, Any]]:
        loader = make_loader(
            self.shards,
            self.pair,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            rank=self.rank,
            world_size=self.world_size,
            seed=seed,
            mask_bank=self.mask_bank,
        )
        return iter(loader)

    def fixed_batch(self, seed: int, size: int) -> dict[str, Any]:
        """One batch that does not depend on the rank or the run's progress (for previews)."""
        loader = make_loader(
            self.shards, self.pair, batch_size=size, rank=0, world_size=1, seed=seed,
            mask_bank=self.mask_bank,
        )  # fmt: skip
        return next(iter(loader))


class LossModule(torch.nn.Module):
    """The model whose forward is the training loss, so DDP wraps one ordinary forward."""

    def __init__(
        self,
        model: torch.nn.Module,
        scheduler: Any,
        noise_offset: float = 0.0,
        timestep_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.scheduler = scheduler
        self.noise_offset = noise_offset
        self.timestep_weights = timestep_weights

    def forward(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return training_loss(
            self.model, self.scheduler, batch, generator, noise_offset=self.noise_offset,
            timestep_weights=self.timestep_weights,
        )  # fmt: skip


def _amp_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if mixed_precision == "no":
        return None
    if mixed_precision == "bf16":
        return torch.bfloat16
    if mixed_precision == "fp16":
        if device.type != "cuda":
            # fp16 autocast + GradScaler is a GPU recipe; on CPU bf16 is the reduced precision.
            warnings.warn("mixed_precision fp16 needs a GPU: training in fp32", stacklevel=3)
            return None
        return torch.float16
    raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {mixed_precision!r}")


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


class Trainer:
    """Optimisation of one stage of :class:`DurianModel`.

    ``batches`` is a :class:`BatchSource` (resumable data position) or any iterable of batches
    (tests, benchmarks: consumed as given, no position bookkeeping).
    """

    def __init__(
        self,
        model: DurianModel,
        batches: BatchSource | Iterable[dict[str, Any]],
        *,
        stage: int,
        steps: int,
        lr: float,
        grad_accum: int = 1,
        seed: int = 0,
        rank: int = 0,
        device: torch.device | str | None = None,
        mixed_precision: MixedPrecision = "no",
        gradient_checkpointing: bool = False,
        ema_decay: float | None = None,
        max_grad_norm: float = 0.0,
        noise_offset: float = 0.0,
        weight_decay: float = 0.01,
        resume_data: ResumeData = "skip",
        preview_timestep: int = 500,
        fixed_noise: bool = False,
        lr_scheduler: str = "constant",
        lr_warmup_steps: int = 0,
        timestep_bias: str = "none",
        timestep_bias_multiplier: float = 1.0,
        timestep_bias_portion: float = 0.25,
    ) -> None:
        if resume_data not in ("skip", "reseed"):
            raise ValueError(f"resume_data must be skip or reseed, got {resume_data!r}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device)
        self.stage = stage
        self.total_steps = steps
        self.grad_accum = grad_accum
        self.seed = seed
        self.rank = rank
        self.max_grad_norm = max_grad_norm
        self.resume_data = resume_data
        self.preview_timestep = preview_timestep
        # Every step draws the same noise and timesteps (overfitting checks of one batch).
        self.fixed_noise = fixed_noise
        self.step = 0
        self.start_step = 0
        model.set_stage(stage)
        if gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        self.params = list(model.trainable_parameters(stage))
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        # diffusers' schedules (constant, cosine, linear …), stepped once per optimiser step;
        # a pure function of the step, so a resumed run continues the same curve.
        self.lr_scheduler = get_scheduler(
            lr_scheduler, self.optimizer, num_warmup_steps=lr_warmup_steps,
            num_training_steps=steps,
        )  # fmt: skip
        self.scheduler = noise_scheduler_for(model)
        weights = timestep_weights(
            self.scheduler.config.num_train_timesteps, timestep_bias, timestep_bias_multiplier,
            timestep_bias_portion,
        )  # fmt: skip
        self.loss_module: torch.nn.Module = LossModule(model, self.scheduler, noise_offset, weights)
        self.amp_dtype = _amp_dtype(mixed_precision, self.device)
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.ema = EMA(model, ema_decay) if ema_decay else None
        self.source = batches if isinstance(batches, BatchSource) else None
        self._given = None if self.source is not None else batches
        self._stream: Iterator[dict[str, Any]] | None = None
        # Data position: the loader seed of the current stream and the batches consumed from it.
        self.data_seed = seed
        self.data_batches = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        config: dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> Trainer:
        """Build model and data from the worker config that ``flows/train.py`` assembles."""
        model = build_training_model(config)
        resolution = config["model"]["resolution"]
        pair = PairConfig(
            resolution=resolution,
            num_frames=config["frames"],
            frame_stride=config.get("frame_stride", 1),
            min_gap=config.get("min_gap", 4),
        )
        bank_path = config.get("mask_bank")
        bank = MaskBank.load(bank_path) if bank_path and Path(bank_path).exists() else None
        source = BatchSource(
            shards=list(config["shards"]),
            pair=pair,
            batch_size=config["batch_size"],
            rank=rank,
            world_size=world_size,
            mask_bank=bank,
            num_workers=config.get("loader_workers", 0),
        )
        ema = config.get("ema_decay") if config.get("ema") else None
        return cls(
            model,
            source,
            stage=config["stage"],
            steps=config["steps"],
            lr=config["lr"],
            grad_accum=config.get("grad_accum", 1),
            seed=config["seed"],
            rank=rank,
            device=device,
            mixed_precision=config.get("mixed_precision", "no"),
            gradient_checkpointing=config.get("gradient_checkpointing", False),
            ema_decay=ema,
            max_grad_norm=config.get("max_grad_norm", 0.0),
            noise_offset=config.get("noise_offset", 0.0),
            resume_data=config.get("resume_data", "skip"),
            lr_scheduler=config.get("lr_scheduler", "constant"),
            lr_warmup_steps=config.get("lr_warmup_steps", 0),
            timestep_bias=config.get("timestep_bias", "none"),
            timestep_bias_multiplier=config.get("timestep_bias_multiplier", 1.0),
            timestep_bias_portion=config.get("timestep_bias_portion", 0.25),
        )

    def wrap(self, wrapper: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap the loss module (e.g. DDP via ``ray.train.torch.prepare_model``)."""
        self.loss_module = wrapper(self.loss_module)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path) -> None:
        save_training_state(
            directory,
            self.model,
            self.optimizer,
            self.step,
            extra={
                "stage": self.stage,
                "data": {"seed": self.data_seed, "batches": self.data_batches},
            },
            ema=self.ema.state_dict() if self.ema is not None else None,
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
        )

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, EMA, scaler, step and data position from a checkpoint."""
        state = read_state(directory)
        if int(state.get("stage", self.stage)) != self.stage:
            raise ValueError(
                f"checkpoint {directory} is of stage {state['stage']}, this run trains stage "
                f"{self.stage}: start stage 2 from the exported stage-1 model (train.init_from)"
            )
        load_training_state(directory, self.model, self.optimizer)
        self.step = self.start_step = int(state["step"])
        # The schedule steps once per optimiser step, so its position is the step; the current
        # rate itself is in the optimizer state.
        self.lr_scheduler.last_epoch = self.step
        if self.ema is not None:
            ema = load_ema(directory)
            if ema is not None:
                self.ema.load_state_dict(ema)
            else:  # EMA switched on mid-run: start averaging from the restored weights
                self.ema = EMA(self.model, self.ema.decay)
        if self.scaler is not None and (scaler := load_scaler(directory)) is not None:
            self.scaler.load_state_dict(scaler)
        data = state.get("data") or {}
        if self.resume_data == "skip" and data:
            self.data_seed, self.data_batches = int(data["seed"]), int(data["batches"])
        else:
            self.data_seed, self.data_batches = reseeded_data_seed(self.seed, self.step), 0
        self._stream = None
        return state

    # ------------------------------------------------------------------ training
    def _batches(self) -> Iterator[dict[str, Any]]:
        if self._stream is None:
            if self.source is None:
                self._stream = iter(self._given)  # type: ignore[arg-type]
            else:
                self._stream = self.source.stream(self.data_seed)
                for _ in range(self.data_batches):  # see the module docstring: "skip"
                    next(self._stream)
        return self._stream

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def steps(self) -> Iterator[dict[str, float]]:
        """Run the remaining optimisation steps, yielding stats after each."""
        self.loss_module.train()
        batches = self._batches()
        while self.step < self.total_steps:
            self.optimizer.zero_grad(set_to_none=True)
            total, samples = 0.0, 0
            for micro in range(self.grad_accum):
                batch = _to_device(next(batches), self.device)
                self.data_batches += 1
                at = 0 if self.fixed_noise else self.step
                generator = step_generator(self.seed, self.rank, at, micro)
                # Only the last micro-batch synchronises gradients across DDP ranks.
                last = micro == self.grad_accum - 1
                no_sync = getattr(self.loss_module, "no_sync", None)
                sync = nullcontext() if last or no_sync is None else no_sync()
                with sync:
                    with self._autocast():
                        loss = self.loss_module(batch, generator) / self.grad_accum
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                total += float(loss.detach())
                samples += int(batch["target"].shape[0])
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = float("nan")
            if self.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
            lr = self.optimizer.param_groups[0]["lr"]  # this step's rate
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.lr_scheduler.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model)
            yield {
                "step": self.step,
                "loss": total,
                "samples": samples,
                "lr": lr,
                "grad_norm": grad_norm,
            }

    # ------------------------------------------------------------------ preview
    def preview_batch(self, size: int = 4) -> dict[str, Any]:
        """A fixed batch (same for every run of this seed, resumed or not) for previews."""
        if self.source is None:
            raise ValueError("previews need a BatchSource")
        return self.source.fixed_batch(self.seed + 10_007, min(size, 4))

    def preview(self, batch: dict[str, Any]) -> np.ndarray:
        """The preview grid (see :mod:`durian.training.preview`) with the current weights."""
        prediction = predict_x0(
            self.model, self.scheduler, batch, self.preview_timestep, seed=self.seed
        )
        return preview_grid(batch, prediction)


def export_checkpoint(
    checkpoint_dir: str | Path,
    model_config: dict[str, Any],
    out_dir: str | Path,
    *,
    use_ema: bool = True,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Turn a training checkpoint into a ``save_pretrained`` model folder (the EMA weights
    when the checkpoint has them and ``use_ema``); returns the checkpoint's state."""
    state = read_state(checkpoint_dir)
    model = build_training_model({"model": model_config, "init_from": init_from})
    if int(state.get("stage", 1)) == 2:
        model.set_stage(2)  # inserts the temporal module whose weights the checkpoint holds
    load_training_state(checkpoint_dir, model, restore_rng=False)
    ema = load_ema(checkpoint_dir) if use_ema else None
    if ema is not None:
        copy_ema_weights(ema, model)
    state["exported_ema"] = ema is not None
    model.save_pretrained(str(out_dir))
    return state
