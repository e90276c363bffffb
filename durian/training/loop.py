"""The training loop, free of any orchestrator: Ray Train (``flows/train.py``), a plain
single-process loop (benchmarks) and tests all drive this same :class:`Trainer`."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from durian.data.loader import make_loader
from durian.data.pairs import PairConfig
from durian.models.durian_model import DurianModel
from durian.models.profiles import build_model, load_sd15, make_noise_scheduler
from durian.training.state import load_training_state, save_training_state
from durian.training.step import training_loss


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


class LossModule(torch.nn.Module):
    """The model whose forward is the training loss, so DDP wraps one ordinary forward."""

    def __init__(self, model: torch.nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.model = model
        self.scheduler = scheduler

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return training_loss(self.model, self.scheduler, batch)


class Trainer:
    def __init__(
        self,
        model: torch.nn.Module,
        batches: Iterator[dict[str, Any]],
        *,
        stage: int,
        steps: int,
        lr: float,
        grad_accum: int = 1,
    ) -> None:
        self.model = model
        self.stage = stage
        self.total_steps = steps
        self.grad_accum = grad_accum
        self.step = 0
        model.set_stage(stage)
        self.optimizer = torch.optim.AdamW(list(model.trainable_parameters(stage)), lr=lr)
        self.loss_module: torch.nn.Module = LossModule(model, make_noise_scheduler())
        self.batches = batches

    @classmethod
    def from_config(cls, config: dict[str, Any], rank: int = 0, world_size: int = 1) -> Trainer:
        """Build model and data from the worker config that ``flows/train.py`` assembles."""
        torch.manual_seed(config["seed"] + rank)
        model = model_from_config(**config["model"])
        pair = PairConfig(
            resolution=config["model"]["resolution"],
            num_frames=config["frames"],
            min_gap=config.get("min_gap", 4),
        )
        loader = make_loader(
            config["shards"],
            pair,
            batch_size=config["batch_size"],
            num_workers=0,
            rank=rank,
            world_size=world_size,
            seed=config["seed"],
            mask_bank=config.get("mask_bank"),
        )
        return cls(
            model,
            iter(loader),
            stage=config["stage"],
            steps=config["steps"],
            lr=config["lr"],
            grad_accum=config.get("grad_accum", 1),
        )

    def wrap(self, wrapper: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
        """Wrap the loss module (e.g. DDP via ``ray.train.torch.prepare_model``)."""
        self.loss_module = wrapper(self.loss_module)

    def save(self, directory: str | Path) -> None:
        save_training_state(directory, self.model, self.optimizer, self.step,
                            extra={"stage": self.stage})

    def load(self, directory: str | Path) -> None:
        self.step = int(load_training_state(directory, self.model, self.optimizer)["step"])

    def steps(self) -> Iterator[dict[str, float]]:
        """Run the remaining optimisation steps, yielding stats after each."""
        self.loss_module.train()
        while self.step < self.total_steps:
            self.optimizer.zero_grad(set_to_none=True)
            total, samples = 0.0, 0
            for batch in itertools.islice(self.batches, self.grad_accum):
                loss = self.loss_module(batch) / self.grad_accum
                loss.backward()
                total += float(loss.detach())
                samples += int(batch["target"].shape[0])
            self.optimizer.step()
            self.step += 1
            yield {
                "step": self.step,
                "loss": total,
                "samples": samples,
                "lr": self.optimizer.param_groups[0]["lr"],
            }


def export_checkpoint(
    checkpoint_dir: str | Path, model_config: dict[str, Any], out_dir: str | Path
) -> dict[str, Any]:
    """Turn a training checkpoint into a ``save_pretrained`` model folder."""
    model = model_from_config(**model_config)
    state = load_training_state(checkpoint_dir, model, restore_rng=False)
    model.save_pretrained(str(out_dir))
    return state
