"""Cross-identity evaluation cases with exact targets, cropped like training data.

A synthetic :class:`~synthetic.transfer.TransferCase` is rendered at full frame;
the model sees square face crops made by the preprocessing crop rule, so each part (portrait,
attribute image, target clip) is cropped around its own face exactly as preprocessing would.

Application-layer glue: it joins the synthetic data source (``synthetic``) to the library's
evaluation (``durian.evaluation.cases``), two packages that do not import each other.
"""

from __future__ import annotations

import numpy as np

from durian.evaluation.cases import EvalCase, make_eval_case
from preprocessing.faces import crop_boxes, crop_frames, crop_labels, landmarks_to_crop
from synthetic.transfer import TransferCase, make_transfer_cases


def _crop(
    frames: np.ndarray, labels: np.ndarray, landmarks: np.ndarray, size: int, margin: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes = crop_boxes(landmarks, margin=margin)
    return (
        crop_frames(frames, boxes, size),
        crop_labels(labels, boxes, size),
        landmarks_to_crop(landmarks, boxes, size),
    )


def cropped_eval_case(
    case: TransferCase, size: int, margin: float, num_frames: int = 4
) -> EvalCase:
    """The case at crop resolution, with ``num_frames`` target frames spread over the motion."""
    t = len(case.target_frames)
    picks = np.unique(np.linspace(0, t - 1, num=min(num_frames, t)).round().astype(int))
    p = _crop(case.portrait[None], case.portrait_labels[None], case.portrait_landmarks[None],
              size, margin)
    a = _crop(case.attribute_image[None], case.attribute_labels[None],
              case.attribute_landmarks[None], size, margin)
    tgt = _crop(case.target_frames[picks], case.target_labels[picks],
                case.driving_landmarks[picks], size, margin)
    return make_eval_case(
        case.case_id, case.category, tuple(x[0] for x in p), tuple(x[0] for x in a), tgt
    )


def cross_identity_cases(
    n: int, size: int, margin: float, seed: int, n_frames: int = 8, source_size: int = 128
) -> list[EvalCase]:
    """``n`` cross-identity cases (categories cycling) at crop resolution ``size``."""
    return [
        cropped_eval_case(c, size, margin)
        for c in make_transfer_cases(n, n_frames, source_size, seed)
    ]
