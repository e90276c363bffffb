"""Side-by-side evaluation rows: portrait | attribute | driving | output | target.

The references are shown as the model receives them (the portrait with its transfer region
removed, the attribute reference cut to its mask). :func:`side_by_side_frames` gives one row per
frame (the MP4s of an evaluation run); :func:`preview_row` is its first frame (the preview grid).
"""

from __future__ import annotations

import numpy as np

from durian.evaluation.cases import EvalCase, resize_frames


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return resize_frames(np.asarray(image).astype(np.uint8)[None], size)[0]


def _references(case: EvalCase, size: tuple[int, int]) -> list[np.ndarray]:
    return [
        _fit(case.portrait * (~case.portrait_mask[..., None]), size),
        _fit(case.attribute * case.attribute_mask[..., None], size),
    ]


def _row(refs: list[np.ndarray], kp: np.ndarray, out: np.ndarray, tgt: np.ndarray,
         size: tuple[int, int]) -> np.ndarray:
    return np.concatenate([*refs, _fit(kp, size), _fit(out, size), _fit(tgt, size)], axis=1)


def side_by_side_frames(case: EvalCase, output: np.ndarray) -> np.ndarray:
    """F×H×5W×3 uint8 for an F-frame output (H×W each tile, the output's size)."""
    if not len(output) == len(case.keypoints) == len(case.target):
        raise ValueError(
            f"{case.key}: {len(output)} output, {len(case.keypoints)} driving and "
            f"{len(case.target)} target frames differ"
        )
    size = output.shape[1:3]
    refs = _references(case, size)
    return np.stack(
        [
            _row(refs, kp, out, tgt, size)
            for kp, out, tgt in zip(case.keypoints, output, case.target, strict=True)
        ]
    )


def preview_row(case: EvalCase, output: np.ndarray) -> np.ndarray:
    """The first frame of :func:`side_by_side_frames`, built alone."""
    size = output.shape[1:3]
    return _row(_references(case, size), case.keypoints[0], output[0], case.target[0], size)
