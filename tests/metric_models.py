"""Tiny stand-ins for the metric weights (same file names, call conventions and layouts as
the real ones), written into a folder so the real loaders read them."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from durian.evaluation.perceptual import FID_FILE, FVD_FILE, LPIPS_FILES, LPIPSBackbone


class TinyInception(nn.Module):
    """Stands in for inception-2015-12-05.pt: the same call, per-channel means as features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class TinyI3D(nn.Module):
    """Stands in for i3d_torchscript.pt (N×3×T×H×W in [-1, 1])."""

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4))


def write_metric_weights(folder: Path, net: str = "alex") -> Path:
    """FID and FVD TorchScripts and an LPIPS backbone (random, torchvision's layout, with a
    classifier key the loader must ignore) plus LPIPS v0.1-style linear layers."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the real extractors are TorchScript: so are these
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyInception()).save(str(folder / FID_FILE))
        torch.jit.script(TinyI3D()).save(str(folder / FVD_FILE))
    torch.manual_seed(0)
    backbone = LPIPSBackbone(net)
    state = backbone.state_dict()
    state["classifier.1.weight"] = torch.zeros(3, 3)
    backbone_file, linear_file = LPIPS_FILES[net]
    torch.save(state, folder / backbone_file)
    lin = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) + 0.1
        for k, c in enumerate(backbone.channels)
    }
    torch.save(lin, folder / linear_file)
    return folder
