"""The keypoint image: 478 mediapipe face landmarks drawn as coloured part outlines.

This is THE renderer shared by preprocessing, training and inference, so a keypoint image means
the same thing everywhere (AniPortrait-style guidance, method note §2 "Keypoint guider").
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

# Part name -> RGB colour. One distinct colour per part lets the guider tell left from right and
# eyes from lips even where outlines touch.
PART_COLORS: dict[str, tuple[int, int, int]] = {
    "face_oval": (255, 255, 255),
    "left_eyebrow": (255, 128, 0),
    "right_eyebrow": (0, 255, 128),
    "left_eye": (255, 0, 0),
    "right_eye": (0, 255, 0),
    "left_iris": (255, 0, 255),
    "right_iris": (0, 255, 255),
    "nose": (255, 255, 0),
    "lips": (0, 0, 255),
}

_MEDIAPIPE_NAMES: dict[str, str] = {
    "face_oval": "FACE_LANDMARKS_FACE_OVAL",
    "left_eyebrow": "FACE_LANDMARKS_LEFT_EYEBROW",
    "right_eyebrow": "FACE_LANDMARKS_RIGHT_EYEBROW",
    "left_eye": "FACE_LANDMARKS_LEFT_EYE",
    "right_eye": "FACE_LANDMARKS_RIGHT_EYE",
    "left_iris": "FACE_LANDMARKS_LEFT_IRIS",
    "right_iris": "FACE_LANDMARKS_RIGHT_IRIS",
    "nose": "FACE_LANDMARKS_NOSE",
    "lips": "FACE_LANDMARKS_LIPS",
}


@lru_cache(maxsize=1)
def part_connections() -> dict[str, np.ndarray]:
    """Part name -> (E, 2) int array of landmark index pairs, from mediapipe's topology.
    Imported lazily: mediapipe takes ~0.4 s to import and only these constants are needed."""
    from mediapipe.tasks.python.vision import FaceLandmarksConnections as conns

    return {
        part: np.array([(c.start, c.end) for c in getattr(conns, name)], dtype=np.int64)
        for part, name in _MEDIAPIPE_NAMES.items()
    }


_SHIFT = 4  # sub-pixel bits for cv2.line: endpoints at 1/16 px keep slow motion visible


def render_keypoints(
    landmarks: np.ndarray, size: tuple[int, int], thickness: int = 1
) -> np.ndarray:
    """Draw (478, 2|3) landmarks (x, y in pixels of an image of ``size`` = (H, W)) as an
    anti-aliased H×W×3 uint8 RGB image on black; z is ignored."""
    h, w = size
    canvas = np.zeros((h, w, 3), np.uint8)
    points = np.asarray(landmarks, dtype=np.float64)[:, :2]
    if not np.isfinite(points).all():
        return canvas  # a frame with no detected face: nothing to draw
    fixed = np.round(points * (1 << _SHIFT)).astype(np.int64)
    # Far out-of-frame points would overflow cv2's int coordinates; clip well outside the canvas.
    limit = (4 * max(h, w)) << _SHIFT
    fixed = np.clip(fixed, -limit, limit)
    for part, edges in part_connections().items():
        color = PART_COLORS[part]
        for a, b in edges:
            cv2.line(
                canvas,
                (int(fixed[a, 0]), int(fixed[a, 1])),
                (int(fixed[b, 0]), int(fixed[b, 1])),
                color,
                thickness,
                cv2.LINE_AA,
                _SHIFT,
            )
    return canvas


def render_keypoint_sequence(
    landmarks: np.ndarray, size: tuple[int, int], thickness: int = 1
) -> np.ndarray:
    """(T, 478, 2|3) landmarks -> (T, H, W, 3) uint8 keypoint images."""
    return np.stack([render_keypoints(lm, size, thickness) for lm in landmarks])
