"""Face landmarks, single-face tracking and square face crops.

Conventions used throughout:
  * landmarks are (478, 3) float arrays in mediapipe topology; x, y in pixels of the image they
    refer to, z relative depth scaled like x (mediapipe's normalised z times the image width);
  * pixel coordinates are continuous with pixel ``i`` covering [i, i+1), i.e. its centre at
    ``i + 0.5`` (mediapipe's normalised coordinates times the image size);
  * a crop box is ``(x0, y0, x1, y1)`` float in source pixels, square (x1-x0 == y1-y0), and may
    reach outside the frame (the outside is filled by the border mode).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from preprocessing.mp_models import (
    close_model,
    create_model,
    inference_logs_silenced,
    model_path,
)

NUM_LANDMARKS = 478
# The smallest face (its box side, as a fraction of the frame's long side) that BlazeFace finds
# over the whole frame every time: measured on the astronaut and Grace Hopper pasted at sizes
# from 8 % to 30 % into 512x384, 512x512 and 1920x1080 frames, faces of 14 % were found with
# scores 0.72-0.87 (12 % only sometimes), from 16 % on always (scores >= 0.84).
WHOLE_FRAME_MIN_FACE = 0.16
# A whole-frame detection this confident may let the keyframe skip its tiles (see detect).
CONFIDENT_FACE = 0.75
REJECT_REASONS = ("no_face", "multiple_faces", "face_too_small")


class ClipRejected(Exception):
    """A clip that cannot give one usable face track; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r} (known: {REJECT_REASONS})")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class FaceAnalyzer:
    """Per-frame faces of a clip (landmarks in frame pixels) with mediapipe, in two stages.

    1. Find faces: the BlazeFace short-range detector on keyframes (every ``detect_every``-th
       and the last), over the whole frame and over overlapping square tiles of the frame's
       short side and half of it. The detector only sees faces larger than ~15 % of its input,
       so without tiles a face of 200 px in a 1080p frame — or two people side by side — goes
       unseen; tiles push the limit down to ~7 % of the short side. A keyframe skips its
       tiles when the whole frame shows a face so large that any face the tiles could add
       would be under ``small_face_ratio`` of it (such faces never count as a second person
       in :func:`track_face` at its default ``second_face_min_ratio``); the tiles were most
       of the detection time, and most of the detector's false positives.
    2. Landmarks: detections are grouped into face regions; for each of the ``num_faces``
       largest, a square region of interest (the face's whole path plus a face size on each
       side) is cut from every frame and a fresh Face Landmarker runs over it in VIDEO mode
       (tracking and smoothing within the clip, never across clips). Its own detector and
       presence score drop detector false positives. Where the keyframes saw no other face
       near the region, the landmarker looks for one face: it then follows it by tracking
       and runs its detector only when the track is lost; looking for two (as it does where
       another face is near, so that face is still seen) runs its detector on every frame.
       The only face of a clip, when its detector can find it in the whole frame, is
       followed in the frames themselves: no region is cut.

    One analyzer per process. mediapipe objects are created per call in the calling process
    and never cross a fork (mediapipe hangs there); a use from a forked copy raises, and
    pickling an analyzer (spawn, Ray) sends only its settings.
    """

    def __init__(
        self,
        num_faces: int = 3,
        min_detection_confidence: float = 0.6,
        min_presence_confidence: float = 0.5,
        detect_every: int = 8,
        model: str | os.PathLike | None = None,
        detector_model: str | os.PathLike | None = None,
        small_face_ratio: float = 0.5,
    ) -> None:
        # Several faces, so a second person is seen (and the clip rejected), not ignored.
        self.num_faces = num_faces
        self.min_detection_confidence = min_detection_confidence
        self.min_presence_confidence = min_presence_confidence
        self.detect_every = detect_every
        self.small_face_ratio = small_face_ratio
        self.model = str(model or model_path("face_landmarker.task"))
        self.detector_model = str(detector_model or model_path("face_detection_short_range.tflite"))
        self._pid = os.getpid()
        self._closed = False
        self._detector = None

    def __reduce__(self):  # a fresh analyzer on the other side, never live mediapipe state
        return (
            FaceAnalyzer,
            (self.num_faces, self.min_detection_confidence, self.min_presence_confidence,
             self.detect_every, self.model, self.detector_model, self.small_face_ratio),
        )  # fmt: skip

    def __enter__(self) -> FaceAnalyzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._detector is not None and os.getpid() == self._pid:
            close_model(self._detector)
        self._detector = None
        self._closed = True

    def _check_process(self) -> None:
        if self._closed:
            raise RuntimeError("FaceAnalyzer is closed")
        if os.getpid() != self._pid:
            raise RuntimeError(
                "FaceAnalyzer used in a forked process; create one per worker (spawn or Ray)"
            )

    def detect(self, frame: np.ndarray) -> np.ndarray:
        """Face boxes (n, 5) float: x0, y0, x1, y1 in frame pixels, score; duplicates merged.

        The whole frame, then its tiles unless it shows a confident face whose
        ``small_face_ratio`` is still in the whole frame's reach (``WHOLE_FRAME_MIN_FACE``)."""
        self._check_process()
        h, w = frame.shape[:2]
        whole, *tiles = _tiles(h, w)
        found = self._detect_in(frame, [whole])
        largest = max(
            (max(b[2] - b[0], b[3] - b[1]) for b in found if b[4] >= CONFIDENT_FACE), default=0.0
        )
        if largest * self.small_face_ratio < WHOLE_FRAME_MIN_FACE * max(h, w):
            found += self._detect_in(frame, tiles)
        return _nms(np.array(found, np.float64).reshape(-1, 5), 0.3)

    def _detect_in(
        self, frame: np.ndarray, tiles: list[tuple[int, int, int, int]]
    ) -> list[tuple[float, float, float, float, float]]:
        """BlazeFace on each (x, y, width, height) part of ``frame``: boxes in frame pixels."""
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        if self._detector is None:
            options = vision.FaceDetectorOptions(
                base_options=BaseOptions(model_asset_path=self.detector_model),
                min_detection_confidence=self.min_detection_confidence,
            )
            self._detector = create_model(lambda: vision.FaceDetector.create_from_options(options))
        found = []
        for x, y, side_w, side_h in tiles:
            tile = np.ascontiguousarray(frame[y : y + side_h, x : x + side_w])
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=tile)
            with inference_logs_silenced():
                result = self._detector.detect(image)
            for det in result.detections:
                b = det.bounding_box
                found.append(
                    (x + b.origin_x, y + b.origin_y, x + b.origin_x + b.width,
                     y + b.origin_y + b.height, det.categories[0].score)
                )  # fmt: skip
        return found

    def _landmarker(self, num_faces: int):
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=self.model),
            running_mode=vision.RunningMode.VIDEO,
            num_faces=num_faces,
            min_face_detection_confidence=0.5,
            min_face_presence_confidence=self.min_presence_confidence,
            min_tracking_confidence=self.min_presence_confidence,
        )
        return create_model(lambda: vision.FaceLandmarker.create_from_options(options))

    def landmarks(self, frames: np.ndarray, fps: float) -> list[np.ndarray]:
        """Per frame an (n_faces, 478, 3) float32 array (n_faces may be 0), frame pixels."""
        import mediapipe as mp

        self._check_process()
        frames = _check_frames(frames)
        t = len(frames)
        keyframes = sorted({*range(0, t, max(1, self.detect_every)), t - 1})
        regions = _face_regions([self.detect(frames[i]) for i in keyframes])
        step_ms = 1000.0 / fps if fps > 0 else 40.0
        found: list[list[np.ndarray]] = [[] for _ in range(t)]
        h, w = frames.shape[1:3]
        for k, region in enumerate(regions[: self.num_faces]):
            box, size = region.box, region.size
            side = max(box[2] - box[0], box[3] - box[1]) + 2.0 * size
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            roi = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])
            # Two faces wherever another one was seen near this region (so it is still seen
            # when it overlaps), else one, which tracks instead of detecting on every frame.
            others = [r for j, r in enumerate(regions) if j != k]
            crowded = region.crowded or any(_overlaps(roi, r.reach) for r in others)
            if not others and not crowded and region.smallest >= WHOLE_FRAME_MIN_FACE * max(h, w):
                # The only face, and in the whole frame's reach: where the landmarker loses
                # the track its detector finds the face again in the frame itself, so the
                # frames go in as they are (no region to cut, no resampling).
                images: np.ndarray = frames
                origin, extent = np.zeros(2), np.array([w, h, w], np.float64)
            else:
                px = int(np.clip(round(side), 128, 512))
                images = crop_frames(frames, np.repeat(roi[None], t, 0), px, border="constant")
                origin, extent = roi[:2], np.full(3, side)
            landmarker = self._landmarker(2 if crowded else 1)
            try:
                for i, image in enumerate(images):
                    mp_image = mp.Image(
                        image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)
                    )
                    with inference_logs_silenced():
                        result = landmarker.detect_for_video(mp_image, int(round(i * step_ms)))
                    for face in result.face_landmarks:
                        # Normalised x, y, z (z scaled like x) -> frame pixels.
                        xyz = np.array([(p.x, p.y, p.z) for p in face], np.float64) * extent
                        xyz[:, :2] += origin
                        found[i].append(xyz.astype(np.float32))
            finally:
                close_model(landmarker)
        return [_dedupe(faces) for faces in found]


def _tiles(h: int, w: int) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height): the whole frame, then square tiles of the short side and half
    of it, overlapping by half a tile."""
    out = [(0, 0, w, h)]
    short = min(h, w)
    for side in (short, short // 2):
        if side < 64 or (side == short and max(h, w) < 1.2 * short):
            continue  # too small to hold a detectable face / the same as the whole frame
        ny = int(np.ceil(max(h - side, 0) / (side / 2))) + 1
        nx = int(np.ceil(max(w - side, 0) / (side / 2))) + 1
        for y in np.linspace(0, h - side, ny).round().astype(int):
            for x in np.linspace(0, w - side, nx).round().astype(int):
                out.append((int(x), int(y), side, side))
    return out


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4,) with boxes b (n, 4)."""
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def _nms(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Boxes (n, 5) x0, y0, x1, y1, score kept by non-maximum suppression, best first."""
    if not len(boxes):
        return boxes
    xywh = [(float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])) for b in boxes]
    # Score threshold 0: the detector already dropped what is under its confidence.
    keep = cv2.dnn.NMSBoxes(xywh, boxes[:, 4].tolist(), 0.0, iou)
    return boxes[np.asarray(keep, int).reshape(-1)]


@dataclass(frozen=True)
class _Region:
    """One face's keyframe detections grouped (see :func:`_face_regions`)."""

    box: np.ndarray  # (4,) union of its boxes, frame pixels
    size: float  # its largest box side
    smallest: float  # its smallest box side
    crowded: bool  # two of its detections in one keyframe: two faces close together

    @property
    def reach(self) -> np.ndarray:
        """The union box grown by half a face on each side: where the face may be between
        keyframes."""
        return self.box + np.array([-1, -1, 1, 1]) * self.size / 2


def _overlaps(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]))


def _face_regions(per_keyframe: list[np.ndarray]) -> list[_Region]:
    """Group keyframe detections into faces, largest face first."""
    dets = [(k, d) for k, ds in enumerate(per_keyframe) for d in ds]
    dets.sort(key=lambda kd: -max(kd[1][2] - kd[1][0], kd[1][3] - kd[1][1]))
    groups: list[list[tuple[int, np.ndarray]]] = []
    for k, d in dets:
        size = max(d[2] - d[0], d[3] - d[1])
        centre = (d[:2] + d[2:4]) / 2
        for g in groups:
            last = g[0][1]
            near = np.linalg.norm(centre - (last[:2] + last[2:4]) / 2) < size
            if near or _box_iou(d, np.array([last]))[0] > 0.2:
                g.append((k, d))
                break
        else:
            groups.append([(k, d)])
    out = []
    for g in groups:
        arr = np.array([d for _, d in g])
        union = np.array([*arr[:, :2].min(0), *arr[:, 2:4].max(0)])
        sides = np.maximum(arr[:, 2] - arr[:, 0], arr[:, 3] - arr[:, 1])
        keyframes = [k for k, _ in g]
        crowded = len(set(keyframes)) < len(keyframes)
        out.append(_Region(union, float(sides.max()), float(sides.min()), crowded))
    return out


def _dedupe(faces: list[np.ndarray]) -> np.ndarray:
    """Drop faces found twice (overlapping regions of interest): box IoU > 0.5, keep larger."""
    if not faces:
        return np.zeros((0, NUM_LANDMARKS, 3), np.float32)
    faces = sorted(faces, key=lambda f: -float(face_size(f)))
    kept: list[np.ndarray] = []
    for f in faces:
        if not kept or _box_iou(face_box(f), face_box(np.stack(kept))).max() <= 0.5:
            kept.append(f)
    return np.stack(kept)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T,H,W,3) uint8, got {frames.shape} {frames.dtype}")
    return frames


def face_box(landmarks: np.ndarray) -> np.ndarray:
    """Axis-aligned box (x0, y0, x1, y1) of landmarks (..., 478, 3)."""
    xy = landmarks[..., :2]
    return np.concatenate([xy.min(axis=-2), xy.max(axis=-2)], axis=-1)


def face_size(landmarks: np.ndarray) -> np.ndarray:
    """The longer side of the landmark box, in pixels."""
    b = face_box(landmarks)
    return np.maximum(b[..., 2] - b[..., 0], b[..., 3] - b[..., 1])


def _match(prev: np.ndarray, faces: np.ndarray) -> int | None:
    """Index of the face continuing the track whose last landmarks are ``prev``, or None."""
    if len(faces) == 0:
        return None
    pb = face_box(prev)
    boxes = face_box(faces)
    ious = _box_iou(pb, boxes)
    best = int(ious.argmax())
    if ious[best] > 0.1:
        return best
    # No overlap (fast motion, or a frame skipped): fall back to the nearest centre, within
    # one face size, so a far-away stranger never takes over the track.
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    d = np.linalg.norm(centres - (pb[:2] + pb[2:]) / 2, axis=1)
    best = int(d.argmin())
    return best if d[best] < face_size(prev) else None


@dataclass(frozen=True)
class FaceTrack:
    """The one face a clip is about, and the frames where another sizeable face was seen."""

    landmarks: np.ndarray  # (T, 478, 3) float32, frame pixels, gaps linearly interpolated
    # Frames with another face >= second_face_min_ratio x the tracked one, in a clip that was
    # kept because no such face was persistent (a false detection, a passer-by).
    stray_frames: tuple[int, ...] = ()


def _link(per_frame: Sequence[np.ndarray]) -> list[dict[int, int]]:
    """Every face of the clip linked into tracks (frame -> face index) in one forward pass.

    A track continues from its last landmarks by ``_match`` (so across frames where it is
    missing); larger faces claim their continuation first; an unclaimed face starts a track.
    """
    tracks: list[dict[int, int]] = []
    last: list[np.ndarray] = []
    for i, faces in enumerate(per_frame):
        free = list(range(len(faces)))
        for k in sorted(range(len(tracks)), key=lambda k: -float(face_size(last[k]))):
            if not free:
                break
            j = _match(last[k], faces[free])
            if j is not None:
                tracks[k][i] = free.pop(j)
                last[k] = faces[tracks[k][i]]
        for j in free:
            tracks.append({i: j})
            last.append(faces[j])
    return tracks


def track_face(
    per_frame: Sequence[np.ndarray],
    min_face_size: float,
    max_missing_fraction: float = 0.2,
    second_face_min_ratio: float = 0.5,
    second_face_min_fraction: float = 0.5,
) -> FaceTrack:
    """The one dominant face of a clip, gaps linearly interpolated, and its stray frames.

    All faces are linked into tracks by box IoU (nearest centre as fallback); the main track
    is the one with the most screen presence (sum of its face sizes over frames), so a large
    face seen in a few frames does not take over from the face seen throughout. Another face
    *counts* in a frame when its size is >= ``second_face_min_ratio`` x the main face's (its
    size interpolated where missing); smaller background faces never count. Raises
    ClipRejected:
      * ``no_face``: no face anywhere, or the main track is missing in more than
        ``max_missing_fraction`` of the frames;
      * ``multiple_faces``: one other track (the same face, followed like the main one)
        counts in at least ``second_face_min_fraction`` of the frames — a second person.
        Counting per track, not per frame, keeps false detections that jump around (and a
        passer-by seen in fewer frames) from adding up to a rejection; such frames are kept
        and listed in ``stray_frames``. A single image (T=1) is rejected for any face that
        counts;
      * ``face_too_small``: the median tracked face size is below ``min_face_size`` pixels.
    """
    t = len(per_frame)
    if t == 0:
        raise ValueError("empty clip")
    if not second_face_min_ratio > 0:
        raise ValueError(f"second_face_min_ratio must be > 0, got {second_face_min_ratio}")
    if not 0 < second_face_min_fraction <= 1:
        raise ValueError(
            f"second_face_min_fraction must be in (0, 1], got {second_face_min_fraction}"
        )
    sizes = [face_size(f) if len(f) else np.zeros(0) for f in per_frame]
    if not any(len(s) for s in sizes):
        raise ClipRejected("no_face", f"no face in any of {t} frames")
    tracks = _link(per_frame)
    main = max(tracks, key=lambda tr: sum(float(sizes[i][j]) for i, j in tr.items()))
    present = np.array([i in main for i in range(t)])
    missing = 1.0 - present.mean()
    if missing > max_missing_fraction:
        raise ClipRejected(
            "no_face", f"face missing in {missing:.0%} of frames (max {max_missing_fraction:.0%})"
        )
    idx = np.flatnonzero(present)
    main_size = np.interp(np.arange(t), idx, [sizes[i][main[i]] for i in idx])
    stray: set[int] = set()
    for tr in tracks:
        if tr is main:
            continue
        frames = [i for i, j in tr.items() if sizes[i][j] >= second_face_min_ratio * main_size[i]]
        stray.update(frames)
        if frames and len(frames) / t >= second_face_min_fraction:
            ratio = max(sizes[i][tr[i]] / main_size[i] for i in frames)
            raise ClipRejected(
                "multiple_faces",
                f"a second face in {len(frames)} of {t} frames (from frame {frames[0]}; "
                f"up to {ratio:.2f}x the main face; rejected from "
                f"{second_face_min_fraction:.0%} of frames at >= {second_face_min_ratio:g}x)",
            )
    track = np.zeros((t, NUM_LANDMARKS, 3), np.float32)
    for i, j in main.items():
        track[i] = per_frame[i][j]
    median_size = float(np.median(face_size(track[present])))
    if median_size < min_face_size:
        raise ClipRejected(
            "face_too_small", f"median face size {median_size:.0f}px < {min_face_size:.0f}px"
        )
    if not present.all():
        # Per coordinate linear interpolation over time; np.interp holds the end values.
        flat = track.reshape(t, -1)
        for k in range(flat.shape[1]):
            flat[:, k] = np.interp(np.arange(t), idx, flat[idx, k])
    return FaceTrack(track, tuple(sorted(stray)))


def select_track(
    per_frame: Sequence[np.ndarray],
    min_face_size: float,
    max_missing_fraction: float = 0.2,
    second_face_min_ratio: float = 0.5,
    second_face_min_fraction: float = 0.5,
) -> np.ndarray:
    """The landmarks (T, 478, 3) float32 of :func:`track_face` (same rules, same errors)."""
    return track_face(
        per_frame, min_face_size, max_missing_fraction,
        second_face_min_ratio, second_face_min_fraction,
    ).landmarks  # fmt: skip


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over axis 0 with edge padding (keeps length)."""
    if window <= 1 or len(x) <= 1:
        return x.copy()
    window = min(window, 2 * len(x) - 1) | 1  # odd, and no wider than the padded signal
    pad = window // 2
    padded = np.pad(x, [(pad, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    kernel = np.ones(window) / window
    return np.stack(
        [np.convolve(padded[:, k], kernel, mode="valid") for k in range(x.shape[1])], axis=1
    )


def crop_boxes(
    landmarks: np.ndarray,
    margin: float = 0.5,
    smooth_window: int = 5,
    lift: float = 0.1,
) -> np.ndarray:
    """Square crop boxes (T, 4) float64 as (x0, y0, x1, y1) in source pixels.

    side = face size * (1 + 2 * margin), i.e. ``margin`` face sizes of context on each side;
    the centre is the landmark box centre raised by ``lift`` face sizes so that hair (above the
    landmarks) fits. Centre and side are smoothed over ``smooth_window`` frames (moving
    average) so the crop does not jitter with the landmarks.
    """
    box = face_box(np.asarray(landmarks, np.float64))
    size = np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1])
    cx = (box[:, 0] + box[:, 2]) / 2
    cy = (box[:, 1] + box[:, 3]) / 2 - lift * size
    side = size * (1 + 2 * margin)
    cx, cy, side = _smooth(np.stack([cx, cy, side], axis=1), smooth_window).T
    return np.stack([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], axis=1)


def _affine(box: np.ndarray, size: int) -> np.ndarray:
    # Continuous coords: u = (x - x0) * s. warpAffine works on pixel indices whose centres sit
    # at continuous i + 0.5, hence the half-pixel terms.
    s = size / (box[2] - box[0])
    return np.array(
        [[s, 0.0, (0.5 - box[0]) * s - 0.5], [0.0, s, (0.5 - box[1]) * s - 0.5]], np.float64
    )


def crop_frames(
    frames: np.ndarray,
    boxes: np.ndarray,
    size: int,
    border: Literal["replicate", "constant"] = "replicate",
) -> np.ndarray:
    """Crop and resize every frame to (T, size, size, 3) uint8 (bilinear; area when shrinking)."""
    frames = _check_frames(frames)
    mode = cv2.BORDER_REPLICATE if border == "replicate" else cv2.BORDER_CONSTANT
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, (frame, box) in enumerate(zip(frames, boxes, strict=True)):
        shrink = (box[2] - box[0]) / size
        src = frame
        m = _affine(box, size)
        if shrink > 2:
            # Pre-shrink with INTER_AREA so a large face is not aliased by bilinear sampling.
            f = shrink / 2  # leaves a bilinear factor of 2, which does not alias
            src = cv2.resize(frame, None, fx=1 / f, fy=1 / f, interpolation=cv2.INTER_AREA)
            sx = frame.shape[1] / src.shape[1]
            sy = frame.shape[0] / src.shape[0]
            m = m @ np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
        out[i] = cv2.warpAffine(
            src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=mode, borderValue=0
        )
    return out


def crop_labels(labels: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crop label maps (T, H, W) to (T, size, size) uint8, nearest neighbour, outside = 0."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (T,H,W), got {labels.shape}")
    out = np.empty((len(labels), size, size), np.uint8)
    for i, (lab, box) in enumerate(zip(labels.astype(np.uint8), boxes, strict=True)):
        out[i] = cv2.warpAffine(
            lab, _affine(box, size), (size, size), flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )  # fmt: skip
    return out


def landmarks_to_crop(landmarks: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Landmarks (T, 478, 3) from source to crop pixels; z scaled by the same factor."""
    landmarks = np.asarray(landmarks, np.float64)
    boxes = np.asarray(boxes, np.float64)
    s = size / (boxes[:, 2] - boxes[:, 0])
    out = np.empty_like(landmarks)
    out[..., 0] = (landmarks[..., 0] - boxes[:, None, 0]) * s[:, None]
    out[..., 1] = (landmarks[..., 1] - boxes[:, None, 1]) * s[:, None]
    out[..., 2] = landmarks[..., 2] * s[:, None]
    return out.astype(np.float32)
