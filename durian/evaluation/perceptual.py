"""LPIPS, FID and FVD from feature extractors whose weights the user puts in a local folder.

Nothing is downloaded: :func:`find_weights` says which metrics the folder (``evaluate.
metric_weights``) allows and why the others are skipped. The expected files, by name:

* FID — ``inception-2015-12-05.pt``: the TorchScript Inception-v3 of the StyleGAN2-ADA metrics
  (the one clean-fid uses in its ``legacy_tensorflow`` mode). Called as
  ``model(x, return_features=True)`` with ``x`` float N×3×299×299 in [0, 255]; 2048-d pool
  features.
* FVD — ``i3d_torchscript.pt``: the TorchScript I3D of StyleGAN-V. Called as
  ``model(x, rescale=False, resize=False, return_features=True)`` with ``x`` float
  N×3×T×224×224 in [-1, 1]; 400-d features. Needs clips of ≥ 9 frames or so (its temporal
  pooling); a clip it cannot take skips the metric with the error as reason.
* LPIPS — a backbone plus the LPIPS v0.1 linear layers (``evaluate.lpips_net``):
  ``alex``: ``alexnet-owt-7be5be79.pth`` (torchvision's AlexNet state dict; only its
  ``features.*`` tensors are read) + ``lpips_alex.pth`` (``lpips/weights/v0.1/alex.pth`` from
  the ``lpips`` package: ``lin{k}.model.1.weight``); ``vgg``: ``vgg16-397923af.pth`` +
  ``lpips_vgg.pth``. The backbones are rebuilt here in plain torch (no torchvision).

With a handful of evaluation cases FID/FVD are dominated by their small-sample bias: compare
them only between evaluations with the same number of cases and frames.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FID_FILE = "inception-2015-12-05.pt"
FVD_FILE = "i3d_torchscript.pt"
LPIPS_FILES: dict[str, tuple[str, str]] = {
    "alex": ("alexnet-owt-7be5be79.pth", "lpips_alex.pth"),
    "vgg": ("vgg16-397923af.pth", "lpips_vgg.pth"),
}
FID_SIZE = 299
FVD_SIZE = 224


# ---------------------------------------------------------------- Fréchet distance


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of N×D features; needs N ≥ 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (N×D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½)``.

    Tr((s1 s2)^½) is the sum of the square roots of the eigenvalues of s1 s2 (real and ≥ 0 in
    exact arithmetic for PSD matrices): cheaper and steadier than ``scipy.linalg.sqrtm`` on the
    rank-deficient covariances a few samples give; round-off negatives are clipped to 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    eig = np.linalg.eigvals(s1 @ s2).real
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(d, 0.0)  # round-off can take an identical pair a hair below 0


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N×D, M×D)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# ---------------------------------------------------------------- FID / FVD feature extractors


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    # The published FID/FVD extractors exist only as TorchScript archives: torch.jit.load is
    # the one way to read them, whatever its deprecation notice says.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _to_float_nchw(frames: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 (or [0,1] float) → float N×3×H×W in [0, 255]."""
    a = np.asarray(frames)
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).float()
    return x if a.dtype == np.uint8 else x * 255.0


@torch.no_grad()
def inception_features(
    model: torch.nn.Module, frames: np.ndarray, batch_size: int = 16
) -> np.ndarray:
    """Pool features (N×D) of N×H×W×3 frames. Frames are resized to 299² (antialiased
    bilinear, which keeps a constant shift exact) and passed in [0, 255], the TorchScript's
    convention."""
    out = []
    for i in range(0, len(frames), batch_size):
        x = _to_float_nchw(frames[i : i + batch_size])
        x = F.interpolate(
            x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
        out.append(model(x, return_features=True).reshape(len(x), -1).double().numpy())
    return np.concatenate(out, axis=0)


def _resize_center_crop(video: torch.Tensor, size: int) -> torch.Tensor:
    """T×3×H×W: shorter side to ``size`` then a centred square crop (StyleGAN-V's FVD input)."""
    h, w = video.shape[-2:]
    scale = size / min(h, w)
    th, tw = max(size, math.ceil(h * scale)), max(size, math.ceil(w * scale))
    video = F.interpolate(
        video, size=(th, tw), mode="bilinear", align_corners=False, antialias=True
    )
    top, left = (th - size) // 2, (tw - size) // 2
    return video[..., top : top + size, left : left + size]


@torch.no_grad()
def i3d_features(model: torch.nn.Module, videos: Sequence[np.ndarray]) -> np.ndarray:
    """Features (N×D) of N videos (each T×H×W×3, T may differ): 224² crops in [-1, 1],
    1×3×T×224×224 per call."""
    out = []
    for video in videos:
        x = _resize_center_crop(_to_float_nchw(video), FVD_SIZE) / 127.5 - 1.0
        x = x.permute(1, 0, 2, 3).unsqueeze(0)  # 1×3×T×H×W
        feats = model(x, rescale=False, resize=False, return_features=True)
        out.append(feats.reshape(1, -1).double().numpy())
    return np.concatenate(out, axis=0)


# ---------------------------------------------------------------- LPIPS


def _normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt((x**2).sum(dim=1, keepdim=True)) + eps)


def lpips_from_features(
    features_a: Sequence[torch.Tensor],
    features_b: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
) -> torch.Tensor:
    """LPIPS given the backbone's feature maps (one N×C×H×W per layer) of both images and the
    per-channel linear weights (C, or 1×C×1×1): for each layer, unit-normalise every pixel's
    feature vector along channels, square the difference, weight channels, average over
    space; sum over layers. One value per image pair (N,)."""
    total = torch.zeros(features_a[0].shape[0], dtype=torch.float64)
    for fa, fb, w in zip(features_a, features_b, weights, strict=True):
        d = (_normalize_channels(fa.double()) - _normalize_channels(fb.double())) ** 2
        total = total + (d * w.double().reshape(1, -1, 1, 1)).sum(dim=1).mean(dim=(1, 2))
    return total


# torchvision's layer layouts, so its state dicts load key for key; LPIPS taps the ReLU after
# each stage (the slice ends below are indices into ``features``).
_ALEX = [
    ("C", 3, 64, 11, 4, 2),
    ("R",),
    ("M",),
    ("C", 64, 192, 5, 1, 2),
    ("R",),
    ("M",),
    ("C", 192, 384, 3, 1, 1),
    ("R",),
    ("C", 384, 256, 3, 1, 1),
    ("R",),
    ("C", 256, 256, 3, 1, 1),
    ("R",),
]
_ALEX_TAPS = (2, 5, 8, 10, 12)
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG16_TAPS = (4, 9, 16, 23, 30)


def _vgg16_layers() -> list:
    layers, c = [], 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(("M2",))
        else:
            layers += [("C", c, v, 3, 1, 1), ("R",)]
            c = v
    return layers


class LPIPSBackbone(nn.Module):
    """AlexNet or VGG16 ``features`` in plain torch, returning the five LPIPS taps."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in LPIPS_FILES:
            raise ValueError(f"unknown LPIPS net {net!r}; expected one of {list(LPIPS_FILES)}")
        spec, self.taps = (_ALEX, _ALEX_TAPS) if net == "alex" else (_vgg16_layers(), _VGG16_TAPS)
        modules: list[nn.Module] = []
        for s in spec:
            if s[0] == "C":
                modules.append(nn.Conv2d(s[1], s[2], s[3], stride=s[4], padding=s[5]))
            elif s[0] == "R":
                modules.append(nn.ReLU())
            elif s[0] == "M":
                modules.append(nn.MaxPool2d(3, 2))
            else:
                modules.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*modules)

    @property
    def channels(self) -> list[int]:
        """Channels of each tap (the last convolution before it)."""
        convs = [
            (i, m.out_channels) for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)
        ]
        return [[c for i, c in convs if i < end][-1] for end in self.taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, start = [], 0
        for end in self.taps:
            x = self.features[start:end](x)
            taps.append(x)
            start = end
        return taps


class LPIPS(nn.Module):
    """LPIPS v0.1 (Zhang et al. 2018): inputs in [-1, 1], the LPIPS scaling layer, the
    backbone's taps and :func:`lpips_from_features`."""

    # The LPIPS scaling layer's constants (ImageNet statistics in [-1, 1] units).
    SHIFT = (-0.030, -0.088, -0.188)
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, backbone: LPIPSBackbone, weights: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.weights = [w.detach().reshape(-1).float() for w in weights]
        self.register_buffer("shift", torch.tensor(self.SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).reshape(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa = self.backbone((a - self.shift) / self.scale)
        fb = self.backbone((b - self.shift) / self.scale)
        return lpips_from_features(fa, fb, self.weights)

    def distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Per-frame LPIPS of two N×H×W×3 uint8 (or [0,1]) stacks, N values."""
        x = _to_float_nchw(a) / 127.5 - 1.0
        y = _to_float_nchw(b) / 127.5 - 1.0
        return self(x, y).numpy()


def load_lpips(backbone_path: str | Path, linear_path: str | Path, net: str = "alex") -> LPIPS:
    """Build LPIPS from torchvision's backbone state dict and the LPIPS v0.1 linear layers."""
    backbone = LPIPSBackbone(net)
    state = torch.load(str(backbone_path), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if k.startswith("features.")}
    backbone.load_state_dict(state, strict=True)
    lin = torch.load(str(linear_path), map_location="cpu", weights_only=True)
    weights = []
    for k, c in enumerate(backbone.channels):
        key = f"lin{k}.model.1.weight"
        if key not in lin:
            raise KeyError(f"{linear_path}: no {key} (expected the LPIPS v0.1 layout)")
        if lin[key].numel() != c:
            raise ValueError(f"{linear_path}: {key} has {lin[key].numel()} weights, layer has {c}")
        weights.append(lin[key])
    return LPIPS(backbone, weights)


# ---------------------------------------------------------------- the weights folder


@dataclass
class PerceptualModels:
    """The extractors a weights folder allows, and for every other metric why it is skipped."""

    lpips: LPIPS | None = None
    inception: torch.nn.Module | None = None
    i3d: torch.nn.Module | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def find_weights(
    folder: str | Path | None, lpips_net: str = "alex"
) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Which of ``lpips``/``fid``/``fvd`` have their files in ``folder``: (found paths, skip
    reasons), one of the two for each metric."""
    needed = {"lpips": list(LPIPS_FILES[lpips_net]), "fid": [FID_FILE], "fvd": [FVD_FILE]}
    if folder is None:
        reason = "evaluate.metric_weights is not set (no local weights folder)"
        return {}, dict.fromkeys(needed, reason)
    folder = Path(folder)
    if not folder.is_dir():
        return {}, dict.fromkeys(needed, f"weights folder {folder} does not exist")
    found, skipped = {}, {}
    for metric, names in needed.items():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            skipped[metric] = f"{', '.join(missing)} not in {folder}"
        else:
            found[metric] = [folder / n for n in names]
    return found, skipped


def load_perceptual(folder: str | Path | None, lpips_net: str = "alex") -> PerceptualModels:
    """Load what the folder holds; a file that fails to load skips its metric with the error."""
    found, skipped = find_weights(folder, lpips_net)
    models = PerceptualModels(skipped=skipped)
    for metric, files in found.items():
        try:
            if metric == "lpips":
                models.lpips = load_lpips(files[0], files[1], lpips_net)
            elif metric == "fid":
                models.inception = load_torchscript(files[0])
            else:
                models.i3d = load_torchscript(files[0])
        except Exception as err:  # noqa: BLE001 - any loading failure means "skip, say why"
            models.skipped[metric] = f"could not load {files[0].name}: {err}"
    return models
