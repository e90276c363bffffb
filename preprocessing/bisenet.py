"""face-parsing.PyTorch's BiSeNet in plain torch, loading its published ``79999_iter.pth``.

The network (Yu et al., BiSeNet, ECCV 2018, as trained on CelebAMask-HQ by
zllrunning/face-parsing.PyTorch) has, under the parameter names of that state dict:

* ``cp`` — the context path: a ResNet-18 (``cp.resnet``, no classifier) giving features at
  1/8, 1/16 and 1/32 of the input; a global-average context vector (``cp.conv_avg``); one
  attention refinement module on each of the 1/16 and 1/32 features (``cp.arm16``,
  ``cp.arm32``); and a 3×3 head after each upsampling step (``cp.conv_head32``,
  ``cp.conv_head16``).
* no separate spatial path: that checkpoint feeds the ResNet's 1/8 feature in its place (its
  ``SpatialPath`` class is defined but never built, so the state dict has no ``sp.*`` keys).
* ``ffm`` — the feature fusion module over [spatial, context] at 1/8.
* ``conv_out`` — the output head (ConvBNReLU 3×3 then a 1×1 classifier, no bias), and the two
  training-only auxiliary heads ``conv_out16`` / ``conv_out32`` (kept so the state dict loads
  strictly; inference never runs them).

Every convolution is bias-free; every BatchNorm is a plain ``nn.BatchNorm2d``. The main logits
are upsampled to the input size (bilinear, corners aligned, as published). Input: RGB, ImageNet
mean/std, 512×512 in training (any size divisible by 32 runs).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from preprocessing.labels import LABELS
from preprocessing.torch_parser import TorchParser, files_sha256, pick_device

NUM_CLASSES = 19  # CelebAMask-HQ, in the order of preprocessing.labels
INPUT_SIZE = 512


class ConvBNReLU(nn.Module):
    """``conv`` (no bias) → ``bn`` → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet basic block; a 1×1 projection shortcut (``downsample``) where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18(nn.Module):
    """The backbone without pooling head or classifier: features at 1/8, 1/16, 1/32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3), keepdim=True)


class AttentionRefinementModule(nn.Module):
    """ARM: a 3×3 ConvBNReLU, re-weighted per channel by a sigmoid of its global mean."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, cout, 3)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_mean(feat))))


class ContextPath(nn.Module):
    """ResNet-18 + global context + two ARMs; returns (res 1/8, context 1/8, context 1/16)."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128, 3)
        self.conv_head16 = ConvBNReLU(128, 128, 3)
        self.conv_avg = ConvBNReLU(512, 128, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        # The 1×1 context vector broadcasts over the 1/32 map (nearest upsampling of 1×1).
        context = self.conv_avg(_global_mean(feat32))
        up32 = F.interpolate(self.arm32(feat32) + context, feat16.shape[2:], mode="nearest")
        up32 = self.conv_head32(up32)
        up16 = F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest")
        return feat8, self.conv_head16(up16), up32


class FeatureFusionModule(nn.Module):
    """FFM: 1×1 ConvBNReLU over the concatenation, plus a squeeze-excite style re-weighting."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, 1)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        weight = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_mean(feat)))))
        return feat + feat * weight


class BiSeNetOutput(nn.Module):
    """A segmentation head: 3×3 ConvBNReLU then a bias-free 1×1 classifier."""

    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(cin, mid, 3)
        self.conv_out = nn.Conv2d(mid, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """The face-parsing BiSeNet; ``forward`` gives the main logits (N, C, H, W) at input size."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, num_classes)
        # Auxiliary heads of training (deep supervision): part of the published state dict.
        self.conv_out16 = BiSeNetOutput(128, 64, num_classes)
        self.conv_out32 = BiSeNetOutput(128, 64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


class CheckpointError(ValueError):
    """A weights file that is not the expected checkpoint; the message names the file."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``torch.save``'d state dict (zip or legacy format), read without
    running pickled code; a ``module.`` prefix (saved from DataParallel) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"parser weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        # torch reports a cut-off file as a zip/unpickling error deep in its reader.
        why = " ".join(str(err).split())[:160]
        raise CheckpointError(
            f"{path.name}: not a readable torch state dict (truncated or another format?): {why}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path.name}: not a state dict of named tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def mismatch_report(expected: dict[str, torch.Size], found: dict[str, torch.Tensor]) -> str:
    """What differs between a model's state dict shapes and a checkpoint's ('' if nothing)."""

    def some(names: list[str]) -> str:
        more = f" (+{len(names) - 4} more)" if len(names) > 4 else ""
        return ", ".join(names[:4]) + more

    # BatchNorm's step counters are not weights (unused in eval; absent from some re-saves).
    missing = [k for k in expected if k not in found and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} instead of {tuple(expected[k])}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k])
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensors: {some(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors: {some(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {some(shapes)}")
    return "; ".join(parts)


def load_bisenet(path: str | os.PathLike, device: str | torch.device = "cpu") -> BiSeNet:
    """A :class:`BiSeNet` in eval mode with the state dict at ``path`` loaded strictly; a file
    that is not this network's checkpoint raises :class:`CheckpointError` naming the file and
    what does not match."""
    path = Path(path)
    state = read_state_dict(path)
    classifier = state.get("conv_out.conv_out.weight")
    num_classes = int(classifier.shape[0]) if classifier is not None else NUM_CLASSES
    model = BiSeNet(num_classes)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if problems := mismatch_report(expected, state):
        raise CheckpointError(
            f"{path.name} is not a face-parsing.PyTorch BiSeNet ({num_classes} classes) state "
            f"dict: {problems}"
        )
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked"):
            state.setdefault(key, torch.zeros_like(value))
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


class BiSeNetParser(TorchParser):
    """``preprocess.parser: bisenet``: face-parsing.PyTorch's ``79999_iter.pth`` (or any state
    dict of this network), run at its training input (512², ImageNet mean/std, RGB; another
    ``input_size`` divisible by 32 runs too)."""

    def __init__(
        self,
        weights: str | os.PathLike,
        *,
        batch_size: int = 8,
        device: str = "cpu",
        derive_beard: bool = True,
        input_size: int = INPUT_SIZE,
    ) -> None:
        path = Path(weights)
        self._settings = {"weights": str(path), "batch_size": batch_size, "device": device,
                          "derive_beard": derive_beard, "input_size": input_size}  # fmt: skip
        model = load_bisenet(path, pick_device(device))
        num_classes = model.conv_out.conv_out.out_channels
        super().__init__(
            model,
            name="bisenet",
            version=files_sha256(path)[:12],
            model_classes=list(LABELS[:num_classes]),
            input_size=input_size,
            batch_size=batch_size,
            derive_beard=derive_beard,
            device=device,
        )

    def __reduce__(self) -> tuple:  # reload from the file (Ray workers, spawn), not weights
        return (_rebuild, (self._settings,))


def _rebuild(settings: dict) -> BiSeNetParser:
    return BiSeNetParser(**settings)
