"""Side-by-side evaluation videos: portrait | attribute | driving | output | target per frame.

The references are shown as the model receives them (the portrait with its transfer region
removed, the attribute reference cut to its mask), like ``cases.preview_row``, whose image is
this video's first frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from durian.evaluation.cases import EvalCase


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = np.asarray(image).astype(np.uint8)
    if image.shape[:2] == size:
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def side_by_side_frames(case: EvalCase, output: np.ndarray) -> np.ndarray:
    """F×H×5W×3 uint8 for an F-frame output (H×W each tile, the output's size)."""
    size = output.shape[1:3]
    portrait = _fit(case.portrait * (~case.portrait_mask[..., None]), size)
    attribute = _fit(case.attribute * case.attribute_mask[..., None], size)
    if not len(output) == len(case.keypoints) == len(case.target):
        raise ValueError(
            f"{case.key}: {len(output)} output, {len(case.keypoints)} driving and "
            f"{len(case.target)} target frames differ"
        )
    return np.stack(
        [
            np.concatenate(
                [portrait, attribute, _fit(kp, size), _fit(out, size), _fit(tgt, size)], axis=1
            )
            for kp, out, tgt in zip(case.keypoints, output, case.target, strict=True)
        ]
    )
