"""One clip in, one training sample out: face track -> square crop -> landmarks -> parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from preprocessing.faces import (
    ClipRejected,
    FaceAnalyzer,
    crop_boxes,
    crop_frames,
    crop_labels,
    face_size,
    landmarks_to_crop,
    track_face,
)
from preprocessing.labels import LABELS
from preprocessing.parsing import FaceParser

__all__ = ["ClipRejected", "ProcessedClip", "process_clip"]


@dataclass
class ProcessedClip:
    frames: np.ndarray  # (T, size, size, 3) uint8
    parsing: np.ndarray  # (T, size, size) uint8, label schema of preprocessing.labels
    landmarks: np.ndarray  # (T, 478, 3) float32, x/y in crop pixels, z scaled alike
    boxes: np.ndarray  # (T, 4) float64 (x0, y0, x1, y1) square crop boxes in source pixels
    parser_name: str
    parser_version: str
    parser_classes: list[str] = field(default_factory=lambda: list(LABELS))
    # Frames with another sizeable face that was not persistent enough to reject the clip.
    stray_face_frames: list[int] = field(default_factory=list)

    def meta(self) -> dict[str, Any]:
        """The crop/parser part of a shard sample's json (plain JSON types)."""
        return {
            "crop_boxes": np.round(self.boxes, 2).tolist(),
            "parser": {
                "name": self.parser_name,
                "version": self.parser_version,
                "classes": list(self.parser_classes),
            },
            "stray_face_frames": [int(i) for i in self.stray_face_frames],
        }


def process_clip(
    frames: np.ndarray,
    *,
    fps: float,
    size: int,
    margin: float,
    min_face_size: float,
    parser: FaceParser | None,
    analyzer: FaceAnalyzer | None,
    ground_truth: dict[str, np.ndarray] | None = None,
    max_missing_fraction: float = 0.2,
    smooth_window: int = 5,
    second_face_min_ratio: float = 0.5,
    second_face_min_fraction: float = 0.5,
) -> ProcessedClip:
    """Crop one clip around its single face and label it; raises ClipRejected.

    Landmarks come from ``analyzer`` — or, for synthetic videos, from ``ground_truth``:
    ``{"landmarks": (T,478,3) source pixels, "parsing": (T,H,W) uint8 source labels}``; then
    no detector or parser runs, the labels are cropped with nearest neighbour and the parser
    is recorded as ``ground_truth`` (version ``ground_truth["version"]`` if given). The same
    face-size rule applies either way. ``second_face_*``: when another face rejects the clip
    (see :func:`preprocessing.faces.track_face`); the frames where one was seen without
    rejecting it are ``stray_face_frames``.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    stray: list[int] = []
    if ground_truth is not None:
        track = np.asarray(ground_truth["landmarks"], np.float32)
        labels = np.asarray(ground_truth["parsing"])
        if track.shape != (t, 478, 3) or labels.shape != (t, h, w):
            raise ValueError(
                f"ground truth must be landmarks (T,478,3) and parsing (T,H,W) for frames "
                f"{frames.shape}, got {track.shape} and {labels.shape}"
            )
        median = float(np.median(face_size(track)))
        if median < min_face_size:
            raise ClipRejected(
                "face_too_small", f"median face size {median:.0f}px < {min_face_size:.0f}px"
            )
    else:
        if analyzer is None or parser is None:
            raise ValueError("process_clip needs an analyzer and a parser without ground_truth")
        per_frame = analyzer.landmarks(frames, fps)
        found = track_face(
            per_frame, min_face_size, max_missing_fraction,
            second_face_min_ratio, second_face_min_fraction,
        )  # fmt: skip
        track, stray = found.landmarks, list(found.stray_frames)

    boxes = crop_boxes(track, margin=margin, smooth_window=smooth_window)
    crops = crop_frames(frames, boxes, size)
    crop_lms = landmarks_to_crop(track, boxes, size)
    if ground_truth is not None:
        return ProcessedClip(
            frames=crops,
            parsing=crop_labels(labels, boxes, size),
            landmarks=crop_lms,
            boxes=boxes,
            parser_name="ground_truth",
            parser_version=str(ground_truth.get("version", "exact")),
            parser_classes=list(ground_truth.get("classes", LABELS)),
            stray_face_frames=stray,
        )
    assert parser is not None  # checked above; keeps type checkers informed
    return ProcessedClip(
        frames=crops,
        parsing=parser.parse(crops, crop_lms).astype(np.uint8),
        landmarks=crop_lms,
        boxes=boxes,
        parser_name=parser.name,
        parser_version=parser.version,
        parser_classes=list(parser.classes),
        stray_face_frames=stray,
    )
