"""mediapipe's canonical face mesh and the FaceMesh topology the renderer draws from.

The 468-vertex canonical face model (centimetres; x to the subject's left = image right,
y up, z towards the camera) ships here as ``canonical_face_model.npz``: it is Google's
Apache-2.0 data (see ``CANONICAL_FACE_MODEL_NOTICE.md``), taken from
``geometry_pipeline_metadata_landmarks.binarypb`` inside the Face Landmarker model bundle
``face_landmarker.task`` by :func:`extract_canonical_mesh`. Nothing is downloaded at run time.

The polygon index lists (face oval, eyes, brows, lips, irises, nose) come from
``mediapipe.tasks.python.vision.FaceLandmarksConnections`` so the synthetic faces use exactly
the topology a real landmarker produces.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MESH_FILE = Path(__file__).with_name("canonical_face_model.npz")
N_MESH = 468
N_LANDMARKS = 478
# Iris landmarks: 468 right-iris centre + 469..472 ring, 473 left-iris centre + 474..477 ring.
RIGHT_IRIS_CENTER, LEFT_IRIS_CENTER = 468, 473


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def _proto_fields(buf: bytes):
    """Yield (field number, value) of a serialized protobuf message (no schema needed)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def extract_canonical_mesh(task_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read (vertices (468,3) float32 cm, triangles (898,3) int32) from a face_landmarker.task.

    GeometryPipelineMetadata.canonical_mesh (field 1) is a Mesh3d whose vertex_buffer
    (field 3) holds x, y, z, u, v per vertex and index_buffer (field 4) the triangles.
    Used once to produce ``canonical_face_model.npz``; kept for provenance.
    """
    with zipfile.ZipFile(task_path) as bundle:
        meta = bundle.read("geometry_pipeline_metadata_landmarks.binarypb")
    mesh = next(v for f, w, v in _proto_fields(meta) if f == 1 and w == 2)
    floats: list[float] = []
    indices: list[int] = []
    for field, wire, value in _proto_fields(mesh):
        if field == 3:
            if wire == 5:
                floats.append(float(np.frombuffer(value, "<f4")[0]))
            else:  # packed encoding
                floats.extend(np.frombuffer(value, "<f4").tolist())
        elif field == 4:
            if wire == 0:
                indices.append(value)
            else:
                j = 0
                while j < len(value):
                    v, j = _varint(value, j)
                    indices.append(v)
    vertex_buffer = np.asarray(floats, np.float32).reshape(-1, 5)
    if len(vertex_buffer) != N_MESH:
        raise ValueError(f"expected {N_MESH} vertices, found {len(vertex_buffer)}")
    return vertex_buffer[:, :3].copy(), np.asarray(indices, np.int32).reshape(-1, 3)


@lru_cache(maxsize=1)
def canonical_mesh() -> tuple[np.ndarray, np.ndarray]:
    """The canonical vertices (468,3) float32 and triangles (898,3) int32 (read-only)."""
    with np.load(MESH_FILE) as data:
        vertices, triangles = data["vertices"], data["triangles"]
    vertices.setflags(write=False)
    triangles.setflags(write=False)
    return vertices, triangles


def _connections(name: str) -> list[tuple[int, int]]:
    from mediapipe.tasks.python.vision import FaceLandmarksConnections

    return [(c.start, c.end) for c in getattr(FaceLandmarksConnections, name)]


def _chains(edges: list[tuple[int, int]]) -> list[list[int]]:
    """Split an edge set into maximal paths or cycles of vertices (cycles end where they start)."""
    adjacency: dict[int, list[int]] = {}
    for a, b in edges:
        adjacency.setdefault(a, []).append(b)
        adjacency.setdefault(b, []).append(a)
    unused = {frozenset(e) for e in edges}
    chains = []
    # Start paths at degree-1 vertices first so open chains are walked end to end.
    starts = sorted(adjacency, key=lambda v: (len(adjacency[v]) != 1, v))
    for start in starts:
        while any(frozenset((start, n)) in unused for n in adjacency[start]):
            chain, here = [start], start
            while True:
                step = next((n for n in adjacency[here] if frozenset((here, n)) in unused), None)
                if step is None:
                    break
                unused.discard(frozenset((here, step)))
                chain.append(step)
                here = step
            chains.append(chain)
    return chains


def _split_loop(loop: list[int], vertices: np.ndarray) -> tuple[list[int], list[int]]:
    """Split a closed contour at its two x-extreme corners into (upper, lower) paths.

    Both paths run from the smaller-x corner to the larger-x corner.
    """
    ring = loop[:-1] if loop[0] == loop[-1] else loop
    xs = vertices[ring, 0]
    a, b = int(np.argmin(xs)), int(np.argmax(xs))
    n = len(ring)
    path1 = [ring[(a + i) % n] for i in range((b - a) % n + 1)]
    path2 = [ring[(a - i) % n] for i in range((a - b) % n + 1)]
    if vertices[path1, 1].mean() < vertices[path2, 1].mean():
        path1, path2 = path2, path1
    return path1, path2


@dataclass(frozen=True)
class Topology:
    """Ordered index lists of the FaceMesh regions, derived from FaceLandmarksConnections."""

    face_oval: tuple[int, ...]
    left_eye_upper: tuple[int, ...]
    left_eye_lower: tuple[int, ...]
    right_eye_upper: tuple[int, ...]
    right_eye_lower: tuple[int, ...]
    left_brow: tuple[int, ...]  # closed polygon
    right_brow: tuple[int, ...]
    lips_outer_upper: tuple[int, ...]
    lips_outer_lower: tuple[int, ...]
    lips_inner_upper: tuple[int, ...]
    lips_inner_lower: tuple[int, ...]
    nose: tuple[int, ...]  # vertices of the nose connection set
    left_iris: tuple[int, ...]  # ring, 4 vertices
    right_iris: tuple[int, ...]

    @property
    def left_eye(self) -> tuple[int, ...]:
        return self.left_eye_upper + self.left_eye_lower[::-1][1:-1]

    @property
    def right_eye(self) -> tuple[int, ...]:
        return self.right_eye_upper + self.right_eye_lower[::-1][1:-1]


def _brow_polygon(edges: list[tuple[int, int]], vertices: np.ndarray) -> tuple[int, ...]:
    chains = _chains(edges)
    if len(chains) != 2:
        raise ValueError("expected two brow chains")
    # Orient both chains lateral -> medial, then walk one out and the other back.
    oriented = [c if abs(vertices[c[0], 0]) > abs(vertices[c[-1], 0]) else c[::-1] for c in chains]
    return tuple(oriented[0] + oriented[1][::-1])


@lru_cache(maxsize=1)
def topology() -> Topology:
    vertices, _ = canonical_mesh()
    oval = _chains(_connections("FACE_LANDMARKS_FACE_OVAL"))[0]
    left_eye = _split_loop(_chains(_connections("FACE_LANDMARKS_LEFT_EYE"))[0], vertices)
    right_eye = _split_loop(_chains(_connections("FACE_LANDMARKS_RIGHT_EYE"))[0], vertices)
    lip_loops = _chains(_connections("FACE_LANDMARKS_LIPS"))
    if len(lip_loops) != 2:
        raise ValueError("expected outer and inner lip loops")
    # The outer lip loop spans a larger x range than the inner one.
    lip_loops.sort(key=lambda c: -np.ptp(vertices[[v for v in c if v < N_MESH], 0]))
    outer = _split_loop(lip_loops[0], vertices)
    inner = _split_loop(lip_loops[1], vertices)
    nose = sorted({v for e in _connections("FACE_LANDMARKS_NOSE") for v in e})
    left_iris = _chains(_connections("FACE_LANDMARKS_LEFT_IRIS"))[0][:-1]
    right_iris = _chains(_connections("FACE_LANDMARKS_RIGHT_IRIS"))[0][:-1]
    return Topology(
        face_oval=tuple(oval[:-1]),
        left_eye_upper=tuple(left_eye[0]),
        left_eye_lower=tuple(left_eye[1]),
        right_eye_upper=tuple(right_eye[0]),
        right_eye_lower=tuple(right_eye[1]),
        left_brow=_brow_polygon(_connections("FACE_LANDMARKS_LEFT_EYEBROW"), vertices),
        right_brow=_brow_polygon(_connections("FACE_LANDMARKS_RIGHT_EYEBROW"), vertices),
        lips_outer_upper=tuple(outer[0]),
        lips_outer_lower=tuple(outer[1]),
        lips_inner_upper=tuple(inner[0]),
        lips_inner_lower=tuple(inner[1]),
        nose=tuple(nose),
        left_iris=tuple(sorted(left_iris)),
        right_iris=tuple(sorted(right_iris)),
    )
