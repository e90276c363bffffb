"""Exponential moving average of the trainable weights.

Only the parameters the stage trains are tracked (the frozen rest never changes), keyed by
their names in the model so that the shadow weights can be saved as safetensors, reloaded into a
fresh model and swapped in for export. The decay warms up as ``(1 + n) / (10 + n)`` (as
diffusers' ``EMAModel``), so early averages are not dominated by the random start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone().float()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        if not self.shadow:
            raise ValueError("EMA of a model with no trainable parameter")

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current trainable weights into the average (after optimizer.step)."""
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().float(), 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights plus the update count, all tensors (safetensors-ready)."""
        return {**self.shadow, "__ema_updates__": torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        updates = state.pop("__ema_updates__", None)
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]} ({len(missing)} in all)")
        for name, shadow in self.shadow.items():
            shadow.copy_(state[name])
        self.updates = int(updates) if updates is not None else 0

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averages."""
        copy_ema_weights(self.shadow, model)

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Use the EMA weights inside the block (e.g. for a preview), then restore."""
        params = dict(model.named_parameters())
        backup = {k: params[k].detach().clone() for k in self.shadow}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in backup.items():
                    params[k].copy_(v)


@torch.no_grad()
def copy_ema_weights(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Load EMA weights (as saved by :meth:`EMA.state_dict`) into ``model``'s parameters."""
    params = dict(model.named_parameters())
    unknown = [k for k in state if k != "__ema_updates__" and k not in params]
    if unknown:
        raise KeyError(f"EMA weights for parameters the model lacks: {unknown[:3]}")
    for name, value in state.items():
        if name != "__ema_updates__":
            params[name].copy_(value.to(params[name].dtype))
