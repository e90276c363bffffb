"""Exponential moving average of the trainable weights: diffusers' ``EMAModel`` inside.

Only the parameters the stage trains are tracked (the frozen rest never changes), keyed by
their names in the model so that the shadow weights can be saved as safetensors (the format of
``ema.safetensors`` in a checkpoint: the named tensors plus ``__ema_updates__``), reloaded into a
fresh model and swapped in for export. The decay warms up as ``(1 + n) / (10 + n)``, capped at
``decay`` (``EMAModel``'s default schedule: the first update copies the weights), so early
averages are not dominated by the random start. The shadow weights are float32 whatever the
model's dtype: a bf16 average would round away updates smaller than 1/256 of a weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from durian.training.sharding import load_full
from durian.training.state import trained_parameters

_UPDATES = "__ema_updates__"


class EMA:
    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        warmup: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        """``device``: where the averages live (default: with the parameters); e.g. the CPU, to
        keep an fp32 copy of the trained weights off the GPU."""
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.names = list(trained_parameters(model))
        if not self.names:
            raise ValueError("EMA of a model with no trainable parameter")
        params = self._params(model)
        # Without warmup the decay is constant: min_decay pins it, and update_after_step=-1
        # keeps EMAModel from making the first update a plain copy (its decay 0 at step 0).
        self.device = torch.device(device) if device is not None else None
        self._ema = EMAModel(
            [p.detach().float().to(self.device or p.device) for p in params],
            decay=self.decay,
            min_decay=0.0 if warmup else self.decay,
            update_after_step=0 if warmup else -1,
        )

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[name] for name in self.names]

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (EMAModel's own tensors, not copies)."""
        return dict(zip(self.names, self._ema.shadow_params, strict=True))

    @property
    def updates(self) -> int:
        return self._ema.optimization_step

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies."""
        return self._ema.get_decay(self._ema.optimization_step + 1)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current trainable weights into the average (after optimizer.step)."""
        params = self._params(model)
        if self.device is not None and params and params[0].device != self.device:
            # EMAModel averages parameters that require grad (it copies the others): the
            # copies on the averages' device stay Parameters.
            params = [nn.Parameter(p.detach().to(self.device)) for p in params]
        self._ema.step(params)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights plus the update count, all tensors (safetensors-ready)."""
        return {**self.shadow, _UPDATES: torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        updates = state.pop(_UPDATES, None)
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]} ({len(missing)} in all)")
        load_full(self.shadow, state)  # into the shards when the model is sharded
        self._ema.optimization_step = int(updates) if updates is not None else 0

    def to(self, device: torch.device | str) -> EMA:
        self._ema.to(device=device)
        return self

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averages."""
        self._ema.copy_to(self._params(model))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Use the EMA weights inside the block (e.g. for a preview), then restore."""
        params = self._params(model)
        self._ema.store(params)
        self._ema.copy_to(params)
        try:
            yield
        finally:
            self._ema.restore(params)


@torch.no_grad()
def copy_ema_weights(state: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Load EMA weights (as saved by :meth:`EMA.state_dict`) into ``model``'s parameters."""
    params = dict(model.named_parameters())
    unknown = [k for k in state if k != _UPDATES and k not in params]
    if unknown:
        raise KeyError(f"EMA weights for parameters the model lacks: {unknown[:3]}")
    for name, value in state.items():
        if name != _UPDATES:
            params[name].copy_(value.to(params[name].dtype))
