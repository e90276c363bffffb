"""Training state on disk: weights as safetensors (never pickled modules), the EMA weights, the
optimizer and grad-scaler state, the RNG states, the step and the data position, so an
interrupted run resumes where it stopped.

A checkpoint folder::

    model.safetensors   the full model state dict
    ema.safetensors     EMA of the trainable weights (only with ``train.ema``)
    optimizer.pt        optimizer state (tensors and numbers; loaded with weights_only)
    scaler.pt           fp16 GradScaler state (only with mixed_precision fp16 on GPU)
    rng.pt              torch / numpy / python RNG states
    state.json          {"step", "stage", "data": {"seed", "batches"}, ...}
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from durian.training.sharding import is_sharded, load_full, load_full_optimizer_state

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
OPTIMIZER = "optimizer.pt"
SCALER = "scaler.pt"
STATE = "state.json"
RNG = "rng.pt"


def trained_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the model's current stage trains (``requires_grad``), by name: what a
    checkpoint and the EMA hold."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views: give each its own copy.
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_training_state(
    directory: str | Path,
    weights: torch.nn.Module | dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    step: int,
    extra: dict[str, Any] | None = None,
    *,
    ema: dict[str, torch.Tensor] | None = None,
    scaler: dict[str, Any] | None = None,
) -> None:
    """``weights``: a model (all of it) or the named tensors a run changes (the rest is what the
    run started from; :func:`load_training_state` loads them over it). ``optimizer``: the
    optimizer, or its state already gathered (a sharded run's)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    save_file(_cpu_tensors(tensors), str(directory / WEIGHTS))
    if ema:
        save_file(_cpu_tensors(ema), str(directory / EMA_WEIGHTS))
    if optimizer is not None:
        # Optimizer state is tensors + plain numbers; weights_only loading keeps it safe.
        state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
        torch.save(state, directory / OPTIMIZER)
    if scaler:
        torch.save(scaler, directory / SCALER)
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        directory / RNG,
    )
    (directory / STATE).write_text(json.dumps({"step": int(step), **(extra or {})}, indent=2))


def read_state(directory: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a checkpoint (step, stage, data position …)."""
    return json.loads((Path(directory) / STATE).read_text())


def load_ema(directory: str | Path) -> dict[str, torch.Tensor] | None:
    """The EMA weights of a checkpoint, or None when it was trained without EMA."""
    path = Path(directory) / EMA_WEIGHTS
    return load_file(str(path)) if path.exists() else None


def load_scaler(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / SCALER
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def load_training_state(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimizer, RNG) saved by :func:`save_training_state` over ``model``;
    return its state. Every parameter ``model`` trains (``requires_grad``) must be in the file;
    the others keep the values the run started from. Tensors are read onto the CPU and moved by
    ``load_state_dict`` to each parameter's own device (every rank its own GPU)."""
    directory = Path(directory)
    weights = load_file(str(directory / WEIGHTS))
    sharded = is_sharded(model)
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unexpected = sorted(set(weights) - set(targets))
    lacking = sorted(set(trained_parameters(model)) - set(weights))
    if unexpected or lacking:
        raise ValueError(
            f"checkpoint {directory} does not match the model: {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(lacking)} trained parameters missing "
            f"(e.g. {lacking[:3]})"
        )
    if sharded:  # whole tensors into this worker's shards
        load_full({name: targets[name] for name in weights}, weights)
    else:
        model.load_state_dict(weights, strict=False)
    if optimizer is not None and (directory / OPTIMIZER).exists():
        state = torch.load(directory / OPTIMIZER, map_location="cpu", weights_only=True)
        if sharded:
            load_full_optimizer_state(model, optimizer, state)
        else:
            optimizer.load_state_dict(state)
    if restore_rng and (directory / RNG).exists():
        # numpy's and python's states are tuples holding arrays/ints: not weights_only material,
        # but the file is our own, written next to the weights.
        rng = torch.load(directory / RNG, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return read_state(directory)
