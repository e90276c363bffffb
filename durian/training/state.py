"""Training state on disk: weights as safetensors (never pickled modules), optimizer state,
the step and the RNG states, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"
RNG = "rng.pt"


def save_training_state(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    step: int,
    extra: dict[str, Any] | None = None,
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS))
    if optimizer is not None:
        # Optimizer state is tensors + plain numbers; weights_only loading keeps it safe.
        torch.save(optimizer.state_dict(), directory / OPTIMIZER)
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        directory / RNG,
    )
    (directory / STATE).write_text(json.dumps({"step": int(step), **(extra or {})}, indent=2))


def load_training_state(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load weights (and optimizer, RNG) saved by :func:`save_training_state`; return its state."""
    directory = Path(directory)
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    if optimizer is not None and (directory / OPTIMIZER).exists():
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER, weights_only=True))
    if restore_rng and (directory / RNG).exists():
        rng = torch.load(directory / RNG, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return json.loads((directory / STATE).read_text())
