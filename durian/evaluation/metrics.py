"""Image metrics over the whole frame or a region (a boolean mask), on uint8 or [0,1] arrays.

Region metrics average only the pixels inside the mask; an empty region gives ``nan`` (a
metric that cannot be measured is reported missing, never as a number).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    return image.astype(np.float64)


def _region(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape[:2], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match image {shape[:2]}")
    return mask


def l1(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean absolute error in [0,1] units over the region."""
    p, t = _as_float(pred), _as_float(target)
    region = _region(mask, p.shape)
    if not region.any():
        return float("nan")
    return float(np.abs(p - t)[region].mean())


def psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB (peak 1.0) over the region; ``inf`` for identical inputs."""
    p, t = _as_float(pred), _as_float(target)
    region = _region(mask, p.shape)
    if not region.any():
        return float("nan")
    mse = float(((p - t) ** 2)[region].mean())
    return float("inf") if mse == 0 else float(10.0 * np.log10(1.0 / mse))


def ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM (Gaussian window, as in Wang et al.) over the region's pixels."""
    p, t = _as_float(pred), _as_float(target)
    region = _region(mask, p.shape)
    if not region.any():
        return float("nan")
    _, smap = structural_similarity(
        p, t, data_range=1.0, channel_axis=-1 if p.ndim == 3 else None,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True,
    )
    if smap.ndim == 3:
        smap = smap.mean(axis=-1)
    return float(smap[region].mean())


def region_metrics(
    pred: np.ndarray, target: np.ndarray, regions: dict[str, np.ndarray | None]
) -> dict[str, float]:
    """L1, PSNR and SSIM for each named region: ``{"l1": …, "psnr_attr": …, …}``."""
    out: dict[str, float] = {}
    for name, mask in regions.items():
        suffix = f"_{name}" if name else ""
        out[f"l1{suffix}"] = l1(pred, target, mask)
        out[f"psnr{suffix}"] = psnr(pred, target, mask)
        out[f"ssim{suffix}"] = ssim(pred, target, mask)
    return out


def temporal_flicker(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean absolute difference between the frame-to-frame changes of ``pred`` and of
    ``target`` (F×H×W×C): 0 when the output changes over time exactly as the ground truth does;
    flicker (or frozen output while the target moves) raises it. ``nan`` for a single frame."""
    p, t = _as_float(pred), _as_float(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ")
    if len(p) < 2:
        return float("nan")
    return float(np.abs(np.diff(p, axis=0) - np.diff(t, axis=0)).mean())


def landmark_distance(
    pred: np.ndarray, target: np.ndarray, normaliser: float | np.ndarray | None = None
) -> float:
    """Motion fidelity: mean Euclidean distance between corresponding 2D landmarks (…×N×2+),
    divided by ``normaliser`` (e.g. the inter-ocular distance) when given. Frames whose
    landmarks are missing (NaN) are skipped; ``nan`` when none is left."""
    p = np.asarray(pred, dtype=np.float64)[..., :2]
    t = np.asarray(target, dtype=np.float64)[..., :2]
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} differ")
    d = np.linalg.norm(p - t, axis=-1)
    if normaliser is not None:
        d = d / np.asarray(normaliser, dtype=np.float64)[..., None]
    d = d[np.isfinite(d)]
    return float(d.mean()) if d.size else float("nan")
