"""Reference augmentation (method note §3): spatial (random affine) and appearance (colour jitter).

Pure functions driven by an explicit ``np.random.Generator``. Masks are warped with their images
(nearest neighbour, so they stay binary and aligned); the areas a warp exposes are filled by a
cheap OpenCV inpainting by default (the paper outpaints with FLUX; a diffusers inpainting model
can be passed as ``fill``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

# A plug-in filler: (warped image, exposed-area mask) -> filled image.
FillFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]
FillMode = Literal["inpaint", "constant", "reflect"]


@dataclass(frozen=True)
class AffineParams:
    """A similarity about the image centre: rotate (degrees, counter-clockwise), scale, then
    translate by (tx, ty) fractions of the image width/height."""

    angle: float = 0.0
    scale: float = 1.0
    tx: float = 0.0
    ty: float = 0.0

    def matrix(self, shape: tuple[int, int]) -> np.ndarray:
        h, w = shape
        m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), self.angle, self.scale)
        m[0, 2] += self.tx * w
        m[1, 2] += self.ty * h
        return m


def random_affine_params(
    rng: np.random.Generator,
    max_translate: float = 0.05,
    max_scale: float = 0.1,
    max_rotate: float = 10.0,
) -> AffineParams:
    """Uniform rotation in ±``max_rotate`` degrees, scale in 1 ± ``max_scale``, translation in
    ±``max_translate`` of the image size."""
    angle, scale, tx, ty = rng.uniform(-1.0, 1.0, size=4)
    return AffineParams(
        angle=float(angle * max_rotate),
        scale=float(1.0 + scale * max_scale),
        tx=float(tx * max_translate),
        ty=float(ty * max_translate),
    )


def apply_affine(
    image: np.ndarray,
    mask: np.ndarray | None,
    params: AffineParams,
    fill: FillMode | FillFunction = "inpaint",
    interpolation: int = cv2.INTER_LINEAR,
    inpaint_radius: int = 3,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Warp ``image`` (H×W×C uint8) and ``mask`` (H×W, any dtype; may be None) by ``params``.
    The mask uses nearest neighbour and is 0 where the warp exposes new area. ``fill`` decides
    the image there: ``"inpaint"`` (cv2.inpaint, Telea), ``"constant"`` (black), ``"reflect"``,
    or a callable ``(image, exposed) -> image``."""
    h, w = image.shape[:2]
    matrix = params.matrix((h, w))
    border = cv2.BORDER_REFLECT_101 if fill == "reflect" else cv2.BORDER_CONSTANT
    warped = cv2.warpAffine(image, matrix, (w, h), flags=interpolation, borderMode=border)
    if image.ndim == 3 and warped.ndim == 2:
        warped = warped[..., None]  # cv2 drops a trailing 1-channel axis
    if fill == "inpaint" or callable(fill):
        # Exposed area = where no source pixel landed; warp a ones map to find it.
        valid = cv2.warpAffine(
            np.full((h, w), 255, np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST
        )
        exposed = valid == 0
        if exposed.any():
            if callable(fill):
                warped = fill(warped, exposed)
            else:
                warped = cv2.inpaint(
                    warped, exposed.astype(np.uint8), inpaint_radius, cv2.INPAINT_TELEA
                )
                if image.ndim == 3 and warped.ndim == 2:
                    warped = warped[..., None]
    elif fill not in ("constant", "reflect"):
        raise ValueError(f"unknown fill {fill!r} (inpaint, constant, reflect or a callable)")
    out_mask = None
    if mask is not None:
        out_mask = cv2.warpAffine(
            mask.astype(np.uint8),
            matrix,
            (w, h),
            flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        ).astype(mask.dtype)
    return warped, out_mask


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.02,
) -> np.ndarray:
    """Random brightness, contrast and saturation factors in 1 ± the given amount and a hue
    shift in ± ``hue`` turns, on an H×W×3 uint8 RGB image (masks are untouched)."""
    b, c, s, hshift = rng.uniform(-1.0, 1.0, size=4)
    img = image.astype(np.float32)
    img = img * (1.0 + b * brightness)
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img = (img - gray.mean()) * (1.0 + c * contrast) + gray.mean()
    gray = img @ np.array([0.299, 0.587, 0.114], np.float32)
    img = (img - gray[..., None]) * (1.0 + s * saturation) + gray[..., None]
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    shift = hshift * hue
    if abs(shift) * 180 >= 0.5:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)  # OpenCV hue is 0..179 for uint8
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(shift * 180))) % 180).astype(
            np.uint8
        )
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out
