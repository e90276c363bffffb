"""Training-free baselines for attribute transfer, evaluated like the model.

* :func:`copy_paste_transfer`: the reference's attribute pixels pasted into the portrait, both
  moved to each driving frame by the landmark similarity (the "copy-paste" the paper's masking
  is meant to beat, method note §5). The portrait's own attribute is not removed: there is
  nothing to fill it with that would not be a model.
"""

from __future__ import annotations

import cv2
import numpy as np

from durian.data.masks import similarity_from_landmarks
from durian.evaluation.cases import EvalCase


def _warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], border: int) -> np.ndarray:
    h, w = size
    return cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=border)


def copy_paste_transfer(case: EvalCase) -> np.ndarray:
    """(F, H, W, 3) uint8: per driving frame, the portrait warped onto the driving landmarks
    with the attribute reference's masked pixels, warped the same way, pasted over it."""
    size = case.portrait.shape[:2]
    alpha_src = case.attribute_mask.astype(np.float32)
    frames = []
    for drive in case.driving_landmarks:
        m_port = similarity_from_landmarks(case.portrait_landmarks, drive)
        m_attr = similarity_from_landmarks(case.attribute_landmarks, drive)
        base = _warp(case.portrait, m_port, size, cv2.BORDER_REPLICATE).astype(np.float32)
        attr = _warp(case.attribute, m_attr, size, cv2.BORDER_REPLICATE).astype(np.float32)
        alpha = _warp(alpha_src, m_attr, size, cv2.BORDER_CONSTANT)[..., None]
        frames.append(np.clip(base * (1 - alpha) + attr * alpha, 0, 255).round())
    return np.stack(frames).astype(np.uint8)
