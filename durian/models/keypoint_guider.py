"""Keypoint guider: rendered facial-landmark images → a residual added after DNet's ``conv_in``.

A small conv encoder (AnimateAnyone's pose guider shape: 16-32-96-256 channels for SD 1.5, one
stride-2 step between consecutive widths) whose output conv is zero-initialised, so a freshly
built guider leaves DNet's output unchanged and pretrained SD behaviour is the starting point.

The residual enters DNet through a forward hook on ``conv_in`` (:class:`ConvInResidualHook`):
diffusers' ``UNet2DConditionModel`` has no native additive input after ``conv_in`` and the hook
keeps its forward and its state-dict keys untouched (SD weights still load as is). The hook holds
the residual only while one DNet call runs (:meth:`ConvInResidualHook.adding`): ``conv_in`` is
outside the blocks gradient checkpointing re-runs, so backward does not need it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class KeypointGuider(nn.Module):
    """(N, 3, H, W) landmark images in [0, 1] → (N, out_channels, H/2^k, W/2^k) features.

    ``k = len(block_out_channels) - 1`` stride-2 steps; pick it so the output matches DNet's
    latent size (3 steps for an 8× VAE, 2 for the tiny profile's 4× pixel-unshuffle).
    """

    def __init__(
        self, out_channels: int, block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    ) -> None:
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:], strict=True):
            blocks += [
                nn.Conv2d(c_in, c_in, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(c_in, c_out, 3, padding=1, stride=2),
                nn.SiLU(),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.conv_out = nn.Conv2d(chans[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero residual at start: DNet unchanged
        nn.init.zeros_(self.conv_out.bias)
        self.downscale = 2 ** (len(chans) - 1)

    def forward(self, keypoints: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.conv_in(keypoints * 2 - 1))  # [0,1] → [-1,1]
        return self.conv_out(self.blocks(x))


class ConvInResidualHook:
    """Adds ``self.residual`` (when set) to the output of the module it is registered on."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None

    @contextmanager
    def adding(self, residual: torch.Tensor | None) -> Iterator[None]:
        """Add ``residual`` during the calls inside the block, and nothing after it."""
        self.residual = residual
        try:
            yield
        finally:
            self.residual = None

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.residual is None:
            return output
        if self.residual.shape != output.shape:
            raise ValueError(
                f"keypoint features {tuple(self.residual.shape)} do not match conv_in output "
                f"{tuple(output.shape)}"
            )
        return output + self.residual.to(output.dtype)

    def register(self, conv_in: nn.Module) -> RemovableHandle:
        return conv_in.register_forward_hook(self)
