"""Face embeddings: dlib's 128-d descriptor and ArcFace (ONNX), and a clip's identity embedding.

A :class:`FaceEmbedder` turns an RGB image into a face embedding (or ``None`` when it finds no
face) and scores two embeddings. Two ship here:

* :class:`DlibEmbedder` (default, no download): dlib's HOG face detector, its 5-point shape
  predictor and its 128-d ResNet face descriptor, from the ``face-recognition-models`` package.
  Similarity = 1 − Euclidean distance (dlib's own same-person threshold is distance 0.6, i.e.
  similarity 0.4; the same face re-photographed scores ≈ 0.8, two people ≈ 0.3).
* :class:`ArcFaceEmbedder`: an ArcFace ONNX model from a local path (insightface's
  112×112 recognition models, e.g. ``w600k_r50.onnx``), faces aligned on dlib's 68 landmarks to
  ArcFace's 5-point template; cosine similarity. Needs ``onnxruntime`` installed.

Anything with the same two methods plugs in. They live in ``preprocessing`` because the
preprocess stage stores one embedding per clip in the shards (``identity.npy``,
:func:`clip_identity`) for the portrait ReferenceNet's cross-attention; inference and
evaluation compute the same embedding from the portrait, and evaluation scores identity
similarity with them (``durian.evaluation.identity``).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

# The embedding width of each embedder (ArcFace: insightface's recognition models).
EMBEDDING_DIMS: dict[str, int] = {"dlib": 128, "arcface": 512}
# Frames of a clip tried for its identity embedding (dlib ~0.1 s each) before giving up.
IDENTITY_TRIES = 5

# dlib's HOG detector finds faces from ~80 px; evaluation crops are often 64-128 px, so small
# images are upscaled to this side before detection (cheap: ~5 ms at 256²).
MIN_DETECT_SIDE = 256


@runtime_checkable
class FaceEmbedder(Protocol):
    name: str

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        """Embedding of the largest face in an H×W×3 uint8 RGB image; None if none is found."""
        ...

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Higher = more alike."""
        ...


def face_recognition_models_dir() -> Path:
    """The model folder of ``face-recognition-models``, found without importing it (its
    ``__init__`` imports ``pkg_resources``, which newer setuptools dropped)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face-recognition-models is not installed (scripts/install.sh does it)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _upscaled(image: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(image, dtype=np.uint8)
    short = min(image.shape[:2])
    if short >= MIN_DETECT_SIDE:
        return image
    f = MIN_DETECT_SIDE / short
    size = (round(image.shape[1] * f), round(image.shape[0] * f))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)


class _DlibFaces:
    """Detection and landmarks shared by both embedders."""

    def __init__(self, landmarks: int = 5) -> None:
        import dlib

        models = face_recognition_models_dir()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(
            str(models / f"shape_predictor_{landmarks}_face_landmarks.dat")
        )

    def largest_face(self, image: np.ndarray):
        """(upscaled image, dlib full_object_detection) of the largest face, or None."""
        img = _upscaled(image)
        for upsample in (0, 1):  # the second pass finds smaller faces at 4× the cost
            dets = self.detector(img, upsample)
            if len(dets):
                box = max(dets, key=lambda r: r.area())
                return img, self.predictor(img, box)
        return None


class DlibEmbedder:
    """dlib's 128-d face descriptor; similarity = 1 − Euclidean distance."""

    name = "dlib"

    def __init__(self) -> None:
        import dlib

        self._faces = _DlibFaces(landmarks=5)
        self._model = dlib.face_recognition_model_v1(
            str(face_recognition_models_dir() / "dlib_face_recognition_resnet_model_v1.dat")
        )

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        found = self._faces.largest_face(image)
        if found is None:
            return None
        img, shape = found
        return np.asarray(self._model.compute_face_descriptor(img, shape), dtype=np.float64)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(1.0 - np.linalg.norm(np.asarray(a) - np.asarray(b)))


# ArcFace's alignment template (insightface ``arcface_dst``) for a 112×112 crop: left eye,
# right eye (as seen in the image), nose tip, left and right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def five_points_from_68(points: np.ndarray) -> np.ndarray:
    """ArcFace's 5 points from dlib's 68 (iBUG 300-W order): eye centres, nose tip, mouth
    corners."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])


def align_face(image: np.ndarray, points: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``image`` so its 5 points land on ArcFace's template (a similarity transform,
    least squares), as a size×size crop."""
    dst = ARCFACE_TEMPLATE * (size / 112.0)
    matrix, _ = cv2.estimateAffinePartial2D(
        np.asarray(points, np.float32), dst.astype(np.float32), method=cv2.LMEDS
    )
    if matrix is None:
        raise ValueError("could not fit a similarity transform to the face points")
    return cv2.warpAffine(
        np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0
    )


class ArcFaceEmbedder:
    """An ArcFace ONNX model (input 1×3×112×112 RGB, (x − 127.5) / 127.5); cosine similarity."""

    name = "arcface"

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"ArcFace model {path} not found")
        try:
            import onnxruntime
        except ImportError as err:
            raise ImportError("ArcFace needs onnxruntime (pip install onnxruntime)") from err
        self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._faces = _DlibFaces(landmarks=68)

    def embed(self, image: np.ndarray) -> np.ndarray | None:
        found = self._faces.largest_face(image)
        if found is None:
            return None
        img, shape = found
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        crop = align_face(img, five_points_from_68(points)).astype(np.float32)
        blob = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]
        return np.asarray(self._session.run(None, {self._input: blob})[0][0], dtype=np.float64)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        return cosine_similarity(a, b)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def make_embedder(kind: str, arcface_model: str | Path | None = None) -> FaceEmbedder:
    """``dlib`` or ``arcface`` (with the ONNX path); raises with the reason when unavailable."""
    if kind == "dlib":
        return DlibEmbedder()
    if kind == "arcface":
        if arcface_model is None:
            raise ValueError("arcface needs its model file (arcface_model: a local .onnx path)")
        return ArcFaceEmbedder(arcface_model)
    raise ValueError(f"unknown face embedder {kind!r}")


def frame_subset(num_frames: int, limit: int) -> np.ndarray:
    """``limit`` frame indices spread evenly over ``num_frames`` (all when limit is 0)."""
    if limit <= 0 or limit >= num_frames:
        return np.arange(num_frames)
    return np.unique(np.linspace(0, num_frames - 1, num=limit).round().astype(int))


def parse_embedder_spec(spec: str) -> tuple[str, str | None]:
    """``dlib`` | ``arcface:<path>`` | ``none`` (the ``preprocess.identity_embedder`` setting) →
    (kind, ArcFace model path or None)."""
    kind, _, path = spec.partition(":")
    if spec in ("dlib", "none") or (kind == "arcface" and path.strip()):
        return kind, path.strip() or None
    raise ValueError(f"{spec!r}: expected dlib, arcface:<path of a local .onnx> or none")


_THREAD = threading.local()


def embedder_for(spec: str) -> FaceEmbedder | None:
    """The embedder a ``preprocess.identity_embedder`` setting names (None for ``none``), made
    once per thread: loading dlib's models takes ~0.7 s, and one dlib network must not run in
    two threads at once (it keeps its layer outputs in the object)."""
    kind, path = parse_embedder_spec(spec)
    if kind == "none":
        return None
    cache = _THREAD.__dict__.setdefault("embedders", {})
    if spec not in cache:
        cache[spec] = make_embedder(kind, path)
    return cache[spec]


def identity_frames(num_frames: int, tries: int = IDENTITY_TRIES) -> list[int]:
    """The frames :func:`clip_identity` tries, in order: ``tries`` spread over the clip, the
    one nearest its middle first."""
    middle = (num_frames - 1) / 2
    return sorted(frame_subset(num_frames, tries).tolist(), key=lambda t: (abs(t - middle), t))


def clip_identity(
    frames: np.ndarray, embedder: FaceEmbedder, tries: int = IDENTITY_TRIES
) -> tuple[np.ndarray | None, int | None]:
    """A clip's identity embedding (float32) and the frame it was computed on, or (None, None)
    when no tried frame shows a face to the embedder.

    One frame, not a mean over frames: training pairs it with a random frame of the clip as the
    portrait, and inference computes it from one portrait image the same way. The middle frame
    comes first because it lies farthest from the clip's ends, where a cut or a face entering
    the picture shows up; the others are the fallback when the embedder's detector (dlib's
    frontal HOG) misses the face there (a turned head)."""
    for t in identity_frames(len(frames), tries):
        embedding = embedder.embed(frames[t])
        if embedding is not None:
            return np.asarray(embedding, np.float32), t
    return None, None
