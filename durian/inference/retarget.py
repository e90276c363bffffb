"""Cross-identity driving: the driver's motion, retargeted onto the portrait's own face.

Method note §4 [ours, default]: the motion of the driving landmarks *relative to the driving
video's first frame* is transferred onto the portrait's landmarks, normalised by face scale and
rotation, so the keypoints keep the portrait's face shape (eye distance, face width, jaw) and
only the driver's head motion and expression carry over. Per frame ``t`` of a driver ``D``:

* head motion ``S_t``: the similarity (rotation, scale, translation) taking ``D_0`` to ``D_t``,
  fitted on landmarks that move rigidly with the head;
* expression ``E_t = S_t⁻¹(D_t) − D_0``: what is left once the head motion is undone;
* with ``M`` the similarity from ``D_0`` to the portrait ``P`` (linear part ``L``), the
  retargeted frame is ``(M S_t M⁻¹)(P + L E_t)``: the expression rescaled and rotated into the
  portrait's face, then the head motion conjugated into portrait coordinates.

Frame 0 therefore gives exactly the portrait's landmarks. A LivePortrait-style retargeter can
replace this behind :class:`Retargeter`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from durian.data.masks import similarity_from_landmarks

# Landmarks that move with the skull but not with speech: eye corners, nose bridge and tip,
# forehead, cheeks and temples. Unlike the mask alignment set, no mouth corners or chin — an
# opening jaw must show up as expression, not as head motion.
HEAD_LANDMARKS: tuple[int, ...] = (33, 133, 362, 263, 168, 6, 197, 1, 4, 10, 234, 454, 127, 356)


@runtime_checkable
class Retargeter(Protocol):
    """(T, 478, 2|3) driver landmarks + (478, 2|3) portrait landmarks → (T, 478, 3)."""

    def __call__(self, driving: np.ndarray, portrait: np.ndarray) -> np.ndarray: ...


def _homogeneous(matrix: np.ndarray) -> np.ndarray:
    out = np.eye(3)
    out[:2] = matrix
    return out


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def _with_z(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, np.float64)
    if lm.shape[-1] == 2:
        lm = np.concatenate([lm, np.zeros(lm.shape[:-1] + (1,))], axis=-1)
    return lm


def retarget_landmarks(
    driving: np.ndarray, portrait: np.ndarray, expression: float = 1.0
) -> np.ndarray:
    """The driver's motion relative to its first frame, on the portrait's face (module doc).

    ``driving`` (T, 478, 2|3) and ``portrait`` (478, 2|3) may live in different pixel spaces
    (a driving frame vs. the portrait crop); the result (T, 478, 3) float32 is in the
    portrait's. ``expression`` scales the non-rigid part (0: head motion only)."""
    d = _with_z(driving)
    p = _with_z(portrait)
    if d.ndim != 3 or d.shape[1:] != p.shape or p.ndim != 2:
        raise ValueError(f"need driving (T,N,2|3) and portrait (N,2|3), got {d.shape}, {p.shape}")
    if not (np.isfinite(d).all() and np.isfinite(p).all()):
        raise ValueError("landmarks must be finite (interpolate missing frames first)")
    d0 = d[0]
    to_portrait = _homogeneous(similarity_from_landmarks(d0[:, :2], p[:, :2], HEAD_LANDMARKS))
    from_portrait = np.linalg.inv(to_portrait)
    linear = to_portrait[:2, :2]
    scale0 = float(np.sqrt(abs(np.linalg.det(linear))))
    out = np.empty_like(p, shape=(len(d),) + p.shape)
    for t, dt in enumerate(d):
        head = _homogeneous(similarity_from_landmarks(d0[:, :2], dt[:, :2], HEAD_LANDMARKS))
        scale_t = float(np.sqrt(abs(np.linalg.det(head[:2, :2]))))
        residual = _apply(np.linalg.inv(head), dt[:, :2]) - d0[:, :2]
        moved = p[:, :2] + expression * residual @ linear.T
        motion = to_portrait @ head @ from_portrait
        out[t, :, :2] = _apply(motion, moved)
        # z is not drawn in keypoint images; keep it consistent in scale for other consumers.
        dz = dt[:, 2] / scale_t - d0[:, 2]
        out[t, :, 2] = scale_t * (p[:, 2] + expression * scale0 * dz)
    return out.astype(np.float32)


def extend_to_length(sequence: np.ndarray, num_frames: int) -> np.ndarray:
    """``num_frames`` items of ``sequence`` (axis 0): cut, or played back and forth (ping-pong)
    when it is shorter, so the motion stays continuous instead of jumping back to the start."""
    n = len(sequence)
    if n == 0 or num_frames < 1:
        raise ValueError(f"need a non-empty sequence and num_frames >= 1, got {n}, {num_frames}")
    if n == 1:
        return np.repeat(sequence[:1], num_frames, axis=0)
    period = 2 * (n - 1)
    k = np.arange(num_frames) % period
    return sequence[np.where(k < n, k, period - k)]
