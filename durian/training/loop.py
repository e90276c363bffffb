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
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler

from durian.data.loader import make_loader
from durian.data.masks import MaskBank
from durian.data.pairs import PairConfig
from durian.models.config import ModelConfig, identity_embedder_of
from durian.models.durian_model import DurianModel
from durian.models.profiles import model_from_config, noise_scheduler_for
from durian.pipelines.pipeline_durian import load_model, save_durian_pipeline
from durian.training.config import Recipe, TrainConfig, save_recipe
from durian.training.ema import EMA, copy_ema_weights
from durian.training.preview import predict_x0, preview_grid
from durian.training.sharding import full_optimizer_state, full_tensors, shard_model
from durian.training.state import (
    load_ema,
    load_scaler,
    load_training_state,
    read_state,
    save_training_state,
    trained_parameters,
)
from durian.training.step import timestep_weights, training_loss


def build_training_model(
    model: ModelConfig, init_from: str | None = None, seed: int = 0, stage: int = 1
) -> DurianModel:
    """The model a run of ``stage`` starts from: ``init_from`` (a ``save_pretrained`` folder,
    e.g. the stage-1 result for stage 2) when given, else :func:`model_from_config`; the motion
    module is read for stage 2 only. Seeded from ``seed`` alone, so every rank builds the same
    initial weights."""
    torch.manual_seed(int(seed))
    if init_from:
        built = load_model(init_from)
        if stage == 2 and model.motion_module and built.temporal is None:
            built.add_temporal_module(checkpoint=model.motion_module)
        return built
    return model_from_config(model, stage)


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig
) -> torch.optim.Optimizer:
    """AdamW (its fused kernel on CUDA: in place, without the fp32 temporaries of the default
    step — a copy of every trained parameter, ~10 GB in stage 1 at sd15 size); with
    ``shard_optimizer`` in a data-parallel run of several workers, torch's
    ZeroRedundancyOptimizer over it (each worker keeps 1/N of the moments, ZeRO-1)."""
    fused = bool(params) and all(p.is_cuda for p in params)
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "fused": fused or None}
    if cfg.shard_optimizer and data_parallel():
        with warnings.catch_warnings():  # its functional optimizers use deprecated torch.jit
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.distributed.optim import ZeroRedundancyOptimizer
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def data_parallel() -> bool:
    """Whether this process is one of several data-parallel workers (torch.distributed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def half_frozen(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Keep the parameters the stage does not train in ``dtype`` (fp16/bf16, under autocast):
    the VAE and CLIP in stage 1, everything but the motion module in stage 2. Trained
    parameters stay fp32 for the optimizer."""
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


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
    identity_embedder: str | None = None  # the face embedder the model reads (None: CLIP)

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
            identity_embedder=self.identity_embedder,
        )
        return iter(loader)

    def fixed_batch(self, seed: int, size: int) -> dict[str, Any]:
        """One batch that does not depend on the rank or the run's progress (for previews)."""
        loader = make_loader(
            self.shards, self.pair, batch_size=size, rank=0, world_size=1, seed=seed,
            mask_bank=self.mask_bank, identity_embedder=self.identity_embedder,
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
        config: TrainConfig | None = None,
        *,
        rank: int = 0,
        device: torch.device | str | None = None,
        preview_timestep: int = 500,
        fixed_noise: bool = False,
        **settings: Any,
    ) -> None:
        """``config`` (default: :class:`TrainConfig`'s defaults) with ``settings`` (its fields,
        validated) over it: ``Trainer(model, batches, steps=20, lr=2e-3)``."""
        base = config if config is not None else TrainConfig()
        if settings:
            base = type(base).model_validate({**base.model_dump(), **settings})
        self.config = cfg = base
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device)
        self.stage = cfg.stage
        self.total_steps = cfg.steps
        self.grad_accum = cfg.grad_accum
        self.seed = cfg.seed
        self.rank = rank
        self.max_grad_norm = cfg.max_grad_norm
        self.resume_data = cfg.resume_data
        self.preview_timestep = preview_timestep
        # Every step draws the same noise and timesteps (overfitting checks of one batch).
        self.fixed_noise = fixed_noise
        self.step = 0
        self.start_step = 0
        # Set by from_config: the recipe's hash, recorded in checkpoints (None: built by hand).
        self.config_hash: str | None = None
        model.set_stage(cfg.stage)
        if cfg.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        self.amp_dtype = _amp_dtype(cfg.mixed_precision, self.device)
        if self.amp_dtype is not None:
            half_frozen(model, self.amp_dtype)
        # Full sharding replaces the trained parameters by shards: before the optimizer.
        self.sharded = cfg.fsdp and data_parallel()
        if self.sharded:
            shard_model(model, cfg.stage)
        self._gathered: dict[str, Any] | None = None  # a sharded run's whole state, to save
        self.params = list(model.trainable_parameters(cfg.stage))
        self.optimizer = make_optimizer(self.params, cfg)
        # diffusers' schedules (constant, cosine, linear …), stepped once per optimiser step;
        # a pure function of the step, so a resumed run continues the same curve.
        self.lr_scheduler = get_scheduler(
            cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.steps,
        )  # fmt: skip
        self.scheduler = noise_scheduler_for(model)
        weights = timestep_weights(
            self.scheduler.config.num_train_timesteps, cfg.timestep_bias,
            cfg.timestep_bias_multiplier, cfg.timestep_bias_portion,
        )  # fmt: skip
        self.loss_module: torch.nn.Module = LossModule(
            model, self.scheduler, cfg.noise_offset, weights
        )
        fp16 = self.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None
        self.ema_device = "cpu" if cfg.ema_device == "cpu" else None
        self.ema = EMA(model, cfg.ema_decay, device=self.ema_device) if cfg.ema else None
        self.source = batches if isinstance(batches, BatchSource) else None
        self._given = None if self.source is not None else batches
        self._stream: Iterator[dict[str, Any]] | None = None
        # Data position: the loader seed of the current stream and the batches consumed from it.
        self.data_seed = cfg.seed
        self.data_batches = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        recipe: Recipe,
        shards: list[str],
        mask_bank: str | Path | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> Trainer:
        """Model, data and optimisation of a :class:`Recipe` over ``shards`` (with the mask bank
        at ``mask_bank`` when it exists): what ``flows/train.py`` runs in each Ray worker and
        ``benchmarks/learns_transfer.py`` runs per variant."""
        train = recipe.train
        model = build_training_model(recipe.model, train.init_from, train.seed, train.stage)
        bank = MaskBank.load(mask_bank) if mask_bank and Path(mask_bank).exists() else None
        source = BatchSource(
            shards=list(shards),
            pair=recipe.pair.at(recipe.model.resolution),
            batch_size=train.batch_size,
            rank=rank,
            world_size=world_size,
            mask_bank=bank,
            num_workers=train.loader_workers,
            identity_embedder=identity_embedder_of(model.config),
        )
        trainer = cls(model, source, train, rank=rank, device=device)
        trainer.config_hash = recipe.config_hash()
        return trainer

    def wrap(self, wrapper: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap the loss module (e.g. DDP via ``ray.train.torch.prepare_model``); not when the
        model is sharded (FSDP synchronises the gradients itself)."""
        if not self.sharded:
            self.loss_module = wrapper(self.loss_module)

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path) -> None:
        """A checkpoint of what the run changes: the trained parameters (the frozen ones are
        those the run started from), optimizer, EMA, scaler, step and data position."""
        if self.sharded and self._gathered is None:
            raise RuntimeError("a sharded run saves what gather_for_checkpoint gathered")
        gathered, self._gathered = self._gathered or {}, None
        save_training_state(
            directory,
            gathered.get("weights") or self.trained_weights(),
            gathered.get("optimizer") or self.optimizer,
            self.step,
            extra={
                "stage": self.stage,
                "data": {"seed": self.data_seed, "batches": self.data_batches},
                "config_hash": self.config_hash,
                **({"optimizer_keys": "names"} if self.sharded else {}),
            },
            ema=gathered.get("ema") or (self.ema.state_dict() if self.ema is not None else None),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
        )

    def gather_for_checkpoint(self) -> None:
        """Collective, on every rank before rank 0 saves: a ZeRO-1 optimizer's state is
        gathered on rank 0; a sharded model's weights, EMA and optimizer state are gathered
        whole (:mod:`durian.training.sharding`). Nothing to do otherwise."""
        consolidate = getattr(self.optimizer, "consolidate_state_dict", None)
        if consolidate is not None:  # ZeroRedundancyOptimizer
            consolidate(to=0)
        if self.sharded:
            self._gathered = {
                "weights": full_tensors(self.trained_weights()),
                "optimizer": full_optimizer_state(self.model, self.optimizer),
                "ema": full_tensors(self.ema.state_dict()) if self.ema is not None else None,
            }

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """The parameters this stage trains, by name (what a checkpoint holds)."""
        return trained_parameters(self.model)

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer, EMA, scaler, step and data position from a checkpoint."""
        state = read_state(directory)
        if int(state.get("stage", self.stage)) != self.stage:
            raise ValueError(
                f"checkpoint {directory} is of stage {state['stage']}, this run trains stage "
                f"{self.stage}: start stage 2 from the exported stage-1 model (train.init_from)"
            )
        if (state.get("optimizer_keys") == "names") != self.sharded:
            raise ValueError(
                f"checkpoint {directory} was written by a run with train.fsdp "
                f"{'on' if not self.sharded else 'off'}: resume it with the same setting"
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
                self.ema = EMA(self.model, self.ema.decay, device=self.ema_device)
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
        with self._autocast():  # frozen parts may be kept in half precision
            prediction = predict_x0(
                self.model, self.scheduler, batch, self.preview_timestep, seed=self.seed
            )
        return preview_grid(batch, prediction)


def export_checkpoint(
    checkpoint_dir: str | Path,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    use_ema: bool | None = None,
) -> dict[str, Any]:
    """Turn a training checkpoint of ``recipe`` into a pipeline folder (the EMA
    weights when the checkpoint has them and ``use_ema``, default ``recipe.train.ema``) with the
    recipe and its hash beside it; returns the checkpoint's state."""
    state = read_state(checkpoint_dir)
    stage = int(state.get("stage", 1))
    model = build_training_model(
        recipe.model, recipe.train.init_from, recipe.train.seed, stage
    )  # the frozen weights: those the run started from
    model.set_stage(stage)  # stage 2 inserts the temporal module whose weights it holds
    load_training_state(checkpoint_dir, model, restore_rng=False)
    use_ema = recipe.train.ema if use_ema is None else use_ema
    ema = load_ema(checkpoint_dir) if use_ema else None
    if ema is not None:
        copy_ema_weights(ema, model)
    state["exported_ema"] = ema is not None
    save_durian_pipeline(model, out_dir)
    save_recipe(out_dir, recipe)
    return state
