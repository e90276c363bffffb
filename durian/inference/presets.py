"""Built-in motion presets: driving landmark sequences made from the portrait's own face.

A preset needs no driving video: it moves the portrait's landmarks (its neutral face) with a
procedural head pose (3D rotation about a pivot inside the head, orthographic projection, small
translations) and mouth opening (lower lip and jaw moved along the face's vertical axis). The
result is already in portrait coordinates and keeps the portrait's face shape, like retargeted
video motion does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Lower lip (outer 146…375, inner 95…324) from mediapipe's FACE_LANDMARKS_LIPS; corners
# (61, 291, 78, 308) excluded: they stay put when the jaw opens.
LOWER_LIP: tuple[int, ...] = (
    146, 91, 181, 84, 17, 314, 405, 321, 375,
    95, 88, 178, 87, 14, 317, 402, 318, 324,
)  # fmt: skip
EYE_OUTER = (33, 263)  # the subject's right / left outer eye corners
MOUTH_CORNERS = (61, 291)
CHIN, FOREHEAD = 152, 10


@dataclass(frozen=True)
class PoseTrack:
    """Per-frame motion in degrees / face widths / 0..1 mouth opening, all (T,) arrays."""

    yaw: np.ndarray
    pitch: np.ndarray
    roll: np.ndarray
    tx: np.ndarray
    ty: np.ndarray
    mouth: np.ndarray


def _wave(t: np.ndarray, period_s: float, phase: float = 0.0) -> np.ndarray:
    return np.sin(2 * np.pi * t / period_s + phase)


def _still(t: np.ndarray) -> PoseTrack:
    z = np.zeros_like(t)
    return PoseTrack(z, z, z, z, z, z)


def _nod(t: np.ndarray) -> PoseTrack:
    z = np.zeros_like(t)
    pitch = 12.0 * _wave(t, 1.6)
    return PoseTrack(z, pitch, z, z, 0.01 * _wave(t, 1.6), z)


def _turn(t: np.ndarray) -> PoseTrack:
    z = np.zeros_like(t)
    yaw = 22.0 * _wave(t, 3.0)
    return PoseTrack(yaw, 2.0 * _wave(t, 1.5), z, 0.02 * _wave(t, 3.0), z, z)


def _tilt(t: np.ndarray) -> PoseTrack:
    z = np.zeros_like(t)
    return PoseTrack(z, z, 10.0 * _wave(t, 2.4), z, z, z)


def _talk(t: np.ndarray) -> PoseTrack:
    # Syllables at ~4 Hz under a slower phrase envelope, with small head motion as people do.
    syllables = np.abs(_wave(t, 0.5))
    phrase = 0.55 + 0.45 * np.abs(_wave(t, 2.2, 0.7))
    return PoseTrack(
        3.0 * _wave(t, 2.7),
        2.5 * _wave(t, 1.3),
        1.5 * _wave(t, 3.1),
        np.zeros_like(t),
        np.zeros_like(t),
        0.8 * syllables * phrase,
    )


PRESETS: dict[str, Callable[[np.ndarray], PoseTrack]] = {
    "still": _still,
    "nod": _nod,
    "turn": _turn,
    "tilt": _tilt,
    "talk": _talk,
}


def _face_axes(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit x (subject's right → left eye) and y (towards the chin) axes, and face width."""
    x = lm[EYE_OUTER[1], :2] - lm[EYE_OUTER[0], :2]
    width = float(np.linalg.norm(x))
    if width <= 1e-6:
        raise ValueError("degenerate landmarks: eye corners coincide")
    x = x / width
    y = np.array([-x[1], x[0]])
    if np.dot(lm[CHIN, :2] - lm[FOREHEAD, :2], y) < 0:
        y = -y
    return x, y, width


def open_mouth(landmarks: np.ndarray, amount: np.ndarray | float) -> np.ndarray:
    """Lower lip and jaw moved down the face by ``amount`` (0 closed … 1 wide open) per frame:
    (478, 3) → (T, 478, 3). The weight of a landmark falls off away from the chin's column and
    is zero above the mouth corners, so cheeks and the upper lip stay."""
    lm = np.asarray(landmarks, np.float64)
    amount = np.atleast_1d(np.asarray(amount, np.float64))
    x_axis, y_axis, eye_width = _face_axes(lm)
    centre = lm[list(MOUTH_CORNERS), :2].mean(0)
    rel = lm[:, :2] - centre
    u, v = rel @ x_axis, rel @ y_axis
    v_chin = max(float((lm[CHIN, :2] - centre) @ y_axis), 1e-6)
    half_mouth = max(abs(float((lm[MOUTH_CORNERS[1], :2] - centre) @ x_axis)), 1e-6)
    jaw = np.clip(v / (0.4 * v_chin), 0, 1) * np.exp(-((u / (1.1 * eye_width)) ** 2))
    lip = np.clip(1 - (u / half_mouth) ** 2, 0, 1)
    weight = jaw.copy()
    weight[list(LOWER_LIP)] = np.maximum(jaw[list(LOWER_LIP)], lip[list(LOWER_LIP)])
    drop = 0.35 * v_chin * amount[:, None, None] * weight[None, :, None] * y_axis
    out = np.repeat(lm[None], len(amount), axis=0)
    out[:, :, :2] += drop
    return out


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    a, b, c = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_landmarks(landmarks: np.ndarray, track: PoseTrack) -> np.ndarray:
    """Apply a :class:`PoseTrack` to neutral (478, 3) landmarks → (T, 478, 3) float32."""
    lm = np.asarray(landmarks, np.float64)
    if lm.shape != (478, 3):
        raise ValueError(f"need (478, 3) landmarks, got {lm.shape}")
    faces = open_mouth(lm, track.mouth)
    _, _, eye_width = _face_axes(lm)
    face_width = float(np.ptp(lm[:, 0]))
    # Pivot inside the head: behind the face surface by about half a face width (z grows away
    # from the camera in mediapipe's convention).
    pivot = np.array([*lm[:, :2].mean(0), np.median(lm[:, 2]) + 0.5 * face_width])
    out = np.empty_like(faces)
    for t in range(len(faces)):
        rot = _rotation(track.yaw[t], track.pitch[t], track.roll[t])
        shift = np.array([track.tx[t], track.ty[t], 0.0]) * 2.2 * eye_width
        out[t] = (faces[t] - pivot) @ rot.T + pivot + shift
    return out.astype(np.float32)


def preset_landmarks(name: str, landmarks: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """The preset ``name`` played for ``num_frames`` frames at ``fps`` on the portrait's
    neutral landmarks (478, 3) → (T, 478, 3) float32; frame 0 is the neutral face (plus the
    preset's pose at t = 0, which is neutral for every built-in preset)."""
    if name not in PRESETS:
        raise KeyError(f"unknown motion preset {name!r} (known: {', '.join(PRESETS)})")
    if num_frames < 1 or fps <= 0:
        raise ValueError(f"need num_frames >= 1 and fps > 0, got {num_frames}, {fps}")
    t = np.arange(num_frames, dtype=np.float64) / fps
    return pose_landmarks(landmarks, PRESETS[name](t))
