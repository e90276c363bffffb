"""Identity similarity: does the output still show the portrait's person?

The face embedders (dlib's 128-d descriptor, ArcFace ONNX) live in
:mod:`preprocessing.identity`, which the preprocess stage also uses for the shards' identity
embeddings; they are re-exported here for the evaluation's users. :func:`identity_similarity`
scores output frames against the portrait's embedding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from preprocessing.identity import (
    ARCFACE_TEMPLATE,
    MIN_DETECT_SIDE,
    ArcFaceEmbedder,
    DlibEmbedder,
    FaceEmbedder,
    align_face,
    cosine_similarity,
    face_recognition_models_dir,
    five_points_from_68,
    frame_subset,
    make_embedder,
)

__all__ = [
    "ARCFACE_TEMPLATE",
    "MIN_DETECT_SIDE",
    "ArcFaceEmbedder",
    "DlibEmbedder",
    "FaceEmbedder",
    "align_face",
    "cosine_similarity",
    "face_recognition_models_dir",
    "five_points_from_68",
    "frame_subset",
    "identity_similarity",
    "make_embedder",
]


def identity_similarity(
    embedder: FaceEmbedder,
    reference: np.ndarray | None,
    frames: Sequence[np.ndarray],
) -> tuple[float, str | None]:
    """Mean similarity between the reference embedding and each frame's face, over the frames
    where a face is found: (value, None), or (nan, why) when it cannot be measured."""
    if reference is None:
        return math.nan, "no face found in the portrait"
    sims = [embedder.similarity(reference, e) for e in map(embedder.embed, frames) if e is not None]
    if not sims:
        return math.nan, f"no face found in any of {len(frames)} output frames"
    return float(np.mean(sims)), None
