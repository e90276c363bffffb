"""Rasterise a synthetic portrait from the 478 FaceMesh landmarks, with exact label maps.

How a frame is made:
1. The canonical face mesh is deformed per identity (face/jaw width, eyes, nose, mouth, lips),
   then per frame (blinks move the upper lids, the jaw drops to open the mouth); irises are
   placed at the eye centres. Attribute geometry (skull, hair, hat, glasses, ears, beard) is
   built in the same canonical centimetres so it follows each identity's head.
2. Everything is rotated (roll, yaw, pitch about a pivot inside the head), scaled and
   projected orthographically; landmarks are (x, y) in output pixels, z in pixels, negative
   towards the camera (mediapipe's convention).
3. Layers are painted back to front (painter's algorithm) as *material ids* into one map at
   ``supersample``× resolution; each material belongs to one label class. Colour is computed
   from the material map afterwards, so a pixel's colour and its label can never disagree.
4. Downsampling averages colours (anti-aliasing) and takes each block's majority label
   (ties go to the block's centre sample).

Layer order, back to front: background < hair behind < neck < cloth < far ear < skull+face
skin < near ear < nose < brows < eyes < lips/mouth < beard < glasses < hair front < hat.
(Hair hanging behind the head is painted under the neck and clothes, where it physically is.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from preprocessing.labels import CLASS, NUM_CLASSES
from synthetic.mesh import N_LANDMARKS, N_MESH, canonical_mesh, topology
from synthetic.params import (
    Attributes,
    Background,
    Beard,
    Glasses,
    Hair,
    Hat,
    Identity,
    Motion,
    Pose,
    random_background,
)

SUPERSAMPLE = 3
FACE_HEIGHT_CM = 17.66  # forehead (10) to chin (152) of the canonical mesh
PIVOT = np.array([0.0, 0.0, -4.0])  # head rotation centre, inside the skull
SKULL_C = np.array([0.0, 1.8, -3.0])
SKULL_R = np.array([8.1, 10.6, 9.5])

# Materials: (name, label class). Several materials may share a class (sclera/iris/pupil).
MATERIALS: tuple[tuple[str, str], ...] = (
    ("background", "background"), ("hair_back", "hair"), ("neck", "neck"), ("cloth", "cloth"),
    ("ear_l", "l_ear"), ("ear_r", "r_ear"), ("skin", "skin"), ("nose", "nose"),
    ("nostril", "nose"), ("brow_l", "l_brow"), ("brow_r", "r_brow"), ("sclera_l", "l_eye"),
    ("sclera_r", "r_eye"), ("iris_l", "l_eye"), ("iris_r", "r_eye"), ("pupil_l", "l_eye"),
    ("pupil_r", "r_eye"), ("mouth", "mouth"), ("teeth", "mouth"), ("u_lip", "u_lip"),
    ("l_lip", "l_lip"), ("beard", "beard"), ("lens", "eye_g"), ("frame", "eye_g"),
    ("hair", "hair"), ("hat", "hat"), ("hat_band", "hat"),
)
M: dict[str, int] = {name: i for i, (name, _) in enumerate(MATERIALS)}
MAT_CLASS = np.array([CLASS[c] for _, c in MATERIALS], np.uint8)

# A distinct flat colour per label class, for checking labels against pixels.
FLAT_PALETTE = np.array(
    [(0, 0, 0), (230, 180, 140), (120, 60, 20), (60, 120, 20), (250, 250, 250), (0, 0, 250),
     (250, 0, 250), (250, 250, 0), (0, 250, 250), (125, 0, 0), (0, 125, 0), (0, 0, 125),
     (250, 0, 0), (0, 250, 0), (125, 125, 0), (0, 125, 125), (125, 0, 125), (125, 125, 125),
     (60, 60, 190), (190, 60, 60)], np.uint8)
assert len(FLAT_PALETTE) == NUM_CLASSES


# ----------------------------------------------------------------------------- geometry


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _local_scale(v: np.ndarray, center: np.ndarray, sigma: float, factor_xy) -> np.ndarray:
    """Scale vertices about ``center`` in x/y with a Gaussian falloff (keeps the mesh smooth)."""
    d2 = ((v[:, :2] - center[:2]) ** 2).sum(1)
    w = np.exp(-d2 / (2 * sigma**2))[:, None]
    out = v.copy()
    out[:, :2] = center[:2] + (v[:, :2] - center[:2]) * (1 + (np.asarray(factor_xy) - 1) * w)
    return out


def _id_scale(points: np.ndarray, identity: Identity) -> np.ndarray:
    """Canonical attribute geometry → this identity's head size."""
    return points * np.array([identity.face_width, identity.face_length, identity.face_width])


@lru_cache(maxsize=256)
def identity_mesh(identity: Identity) -> np.ndarray:
    """The canonical mesh deformed to this identity's face shape, (468, 3) cm."""
    v0, _ = canonical_mesh()
    topo = topology()
    v = v0.astype(np.float64)
    for eye in (topo.left_eye, topo.right_eye):
        v = _local_scale(v, v0[list(eye)].mean(0), 1.3, identity.eye_size)
    v = _local_scale(v, np.array([0.0, -1.0]), 1.4, (identity.nose_width, identity.nose_length))
    v = _local_scale(v, np.array([0.0, -4.3]), 1.5, (identity.mouth_width, 1.0))
    # Lips: push the outer contours away from the mouth line.
    upper = [i for i in topo.lips_outer_upper[1:-1]]
    lower = [i for i in topo.lips_outer_lower[1:-1]]
    v[upper, 1] += (identity.lip_thickness - 1) * 0.45
    v[lower, 1] -= (identity.lip_thickness - 1) * 0.55
    # Brows: thicker by lifting the upper brow line; raise both lines by brow_raise.
    for brow in (topo.left_brow, topo.right_brow):
        half = len(brow) // 2
        v[list(brow[half:]), 1] += (identity.brow_thickness - 1) * 0.45
        v[list(brow), 1] += identity.brow_raise
    # Jaw width grows towards the chin.
    jaw = np.clip((-2.0 - v[:, 1]) / 7.0, 0, 1)
    v[:, 0] *= 1 + (identity.jaw_width - 1) * jaw
    v = _id_scale(v, identity)
    v.setflags(write=False)
    return v


@lru_cache(maxsize=1)
def _expression_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-vertex jaw weights and the eyelid index pairs (upper lid → lower lid)."""
    v0, _ = canonical_mesh()
    topo = topology()
    y_corner = v0[61, 1]
    jaw = _smoothstep((y_corner - v0[:, 1]) / 1.2)
    jaw *= 1 - 0.6 * np.clip(np.abs(v0[:, 0]) / 7.7, 0, 1) ** 2
    jaw[list(topo.lips_outer_upper) + list(topo.lips_inner_upper)] = 0.0
    lower = [i for i in topo.lips_outer_lower[1:-1] + topo.lips_inner_lower[1:-1]]
    jaw[lower] = 1.0
    up = np.array(topo.left_eye_upper[1:-1] + topo.right_eye_upper[1:-1])
    lo = np.array(topo.left_eye_lower[1:-1] + topo.right_eye_lower[1:-1])
    left = np.array([True] * (len(topo.left_eye_upper) - 2) + [False] * (len(up) // 2))
    return jaw, up, lo, left


def posed_mesh(identity: Identity, pose: Pose) -> np.ndarray:
    """Identity mesh with this frame's expression (blinks, jaw), canonical cm, (468, 3)."""
    v = identity_mesh(identity).copy()
    jaw, up, lo, left = _expression_weights()
    v[:, 1] -= pose.mouth_open * 1.5 * identity.face_length * jaw
    blink = np.where(left, pose.blink_left, pose.blink_right)[:, None]
    v[up] = v[up] + (v[lo] - v[up]) * 0.92 * blink
    return v


def _eye_centers(identity: Identity) -> np.ndarray:
    """(2, 3): left eye centre, right eye centre (open eyes)."""
    v = identity_mesh(identity)
    topo = topology()
    return np.stack([v[list(topo.left_eye)].mean(0), v[list(topo.right_eye)].mean(0)])


def _iris_geometry(identity: Identity, pose: Pose, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Iris centres (2, 3) [left, right] and rings (2, n, 3), facing the camera."""
    centers = _eye_centers(identity).copy()
    centers[:, 0] += pose.gaze_x * 0.45 * identity.eye_size
    centers[:, 1] += pose.gaze_y * 0.25 * identity.eye_size
    centers[:, 2] += 0.25
    radius = 0.58 * identity.eye_size
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([np.cos(angle), np.sin(angle), np.zeros(n)], 1) * radius
    return centers, centers[:, None, :] + ring[None]


def _rotation(pose: Pose) -> np.ndarray:
    r, y, p = np.radians([pose.roll, pose.yaw, pose.pitch])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Camera:
    """Rigid head transform + orthographic projection into output pixels."""

    rotation: np.ndarray
    scale: float  # output pixels per cm
    cx: float
    cy: float

    @classmethod
    def for_pose(cls, pose: Pose, height: int, width: int) -> _Camera:
        return cls(_rotation(pose), pose.scale * height / FACE_HEIGHT_CM,
                   pose.tx * width, pose.ty * height)

    def rotate(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, np.float64) - PIVOT) @ self.rotation.T + PIVOT

    def project(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) cm → (n, 3): x, y output pixels, z pixels (negative = towards camera)."""
        p = self.rotate(points)
        return np.stack([self.cx + self.scale * p[:, 0], self.cy - self.scale * p[:, 1],
                         -self.scale * p[:, 2]], 1)

    def xy(self, points: np.ndarray) -> np.ndarray:
        return self.project(points)[:, :2]

    def body_xy(self, points: np.ndarray, width: int) -> np.ndarray:
        """Points in the body's frame (cm, no head rotation); the body follows the head
        horizontally at 60 % so the neck bends a little."""
        bx = width / 2 + 0.6 * (self.cx - width / 2)
        pts = np.asarray(points, np.float64)
        return np.stack([bx + self.scale * pts[:, 0], self.cy - self.scale * pts[:, 1]], 1)


def landmarks_for_pose(identity: Identity, pose: Pose, size: int | tuple[int, int]) -> np.ndarray:
    """The 478 FaceMesh landmarks (x, y, z) in output pixels for this identity and pose."""
    h, w = _hw(size)
    cam = _Camera.for_pose(pose, h, w)
    return _landmarks(cam, posed_mesh(identity, pose), identity, pose)


def _landmarks(cam: _Camera, mesh: np.ndarray, identity: Identity, pose: Pose) -> np.ndarray:
    centers, rings = _iris_geometry(identity, pose)
    out = np.empty((N_LANDMARKS, 3), np.float64)
    out[:N_MESH] = cam.project(mesh)
    # 468 + 469..472: right iris (subject's right = the right-eye contour); 473..477: left.
    out[468] = cam.project(centers[1:2])[0]
    out[469:473] = cam.project(rings[1])
    out[473] = cam.project(centers[0:1])[0]
    out[474:478] = cam.project(rings[0])
    # Mediapipe's z is relative to the face, not absolute depth.
    out[:, 2] -= out[:N_MESH, 2].mean()
    return out.astype(np.float32)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


# ------------------------------------------------------------------ canonical attribute shapes


def _arc(rx: float, ry: float, cy: float, z: float, y_min: float, n: int = 48,
         bump: float = 0.0, bumps: int = 14) -> np.ndarray:
    """Points on the coronal ellipse around the head, right side → over the top → left side,
    keeping y ≥ y_min (cm)."""
    t0 = np.arcsin(np.clip((y_min - cy) / ry, -1, 1))
    t = np.linspace(t0, np.pi - t0, n)
    r = 1 + bump * np.sin(bumps * t)
    return np.stack([rx * r * np.cos(t), cy + ry * r * np.sin(t), np.full(n, z)], 1)


def _skull_z(x: np.ndarray, y: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """z of the skull's front surface at (x, y) (cm), optionally grown outward."""
    rx, ry, rz = SKULL_R + grow
    q = 1 - (x / rx) ** 2 - ((y - SKULL_C[1]) / ry) ** 2
    return SKULL_C[2] + rz * np.sqrt(np.clip(q, 0, 1))


def _front_curve(xs: np.ndarray, ys: np.ndarray, lift: float) -> np.ndarray:
    return np.stack([xs, ys, _skull_z(xs, ys) + lift], 1)


def _jagged(n: int, amplitude: float, seed: float) -> np.ndarray:
    i = np.arange(n)
    return amplitude * (0.5 + 0.5 * np.sin(2.7 * i + seed)) * (i % 2)


def skull_polygon() -> np.ndarray:
    return _arc(SKULL_R[0], SKULL_R[1], SKULL_C[1], SKULL_C[2], y_min=-1.5)


def hair_shapes(hair: Hair) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(behind-the-head polygons, in-front polygons), canonical cm."""
    rx, ry = SKULL_R[0] + hair.volume, SKULL_R[1] + hair.volume
    cy = SKULL_C[1]
    behind: list[np.ndarray] = []
    front: list[np.ndarray] = []
    z_back = SKULL_C[2] - 3.0
    hl = hair.hairline
    style = hair.style
    if style in ("short", "bun"):
        behind.append(_arc(rx, ry, cy, z_back, y_min=-0.5))
        side_y, sideburn_y = 3.0, 0.8
    elif style == "curly":
        behind.append(_arc(rx, ry, cy, z_back, y_min=-5.0, bump=0.035, n=96, bumps=18))
        side_y, sideburn_y = 1.0, 0.0
    else:  # bob, long: hair falls down behind the neck and as locks beside the face
        bottom = -7.0 - 0.25 * hair.length if style == "bob" else -9.4 - hair.length
        spread = 0.4 if style == "bob" else 1.5
        arc = _arc(rx, ry, cy, z_back, y_min=1.0)
        n = 9
        xs = np.linspace(rx + spread, -(rx + spread), n)
        ys = bottom - _jagged(n, 1.2, hair.wave * 5) - 0.5 * np.cos(np.linspace(-1.2, 1.2, n))
        tail = np.stack([xs, ys, np.full(n, z_back)], 1)
        behind.append(np.concatenate([arc, [[-rx, 1.0, z_back]], tail, [[rx, 1.0, z_back]]]))
        side_y, sideburn_y = 1.0, None
    if style == "bun":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        r = 2.6 + 0.4 * hair.volume
        behind.append(np.stack([r * np.cos(t), cy + ry + 0.6 + r * np.sin(t),
                                np.full(32, z_back - 2)], 1))

    # The cap: silhouette arc over the top, then the hairline across the forehead.
    top = 9.3 + hl
    temple_x, temple_y = 6.4, 5.6 + 0.5 * hl
    xs = np.linspace(-temple_x, temple_x, 21)
    ys = top - (top - temple_y) * np.abs(xs / temple_x) ** 2.5
    hairline = _front_curve(xs, ys, 0.3)
    cap_arc = _arc(rx, ry, cy, SKULL_C[2], y_min=side_y, n=48,
                   bump=0.035 if style == "curly" else 0.0, bumps=18)
    if sideburn_y is not None:
        left = [[-7.4, sideburn_y, -1.2]]
        right = [[7.4, sideburn_y, -1.2]]
        front.append(np.concatenate([cap_arc, left, hairline, right]))
    else:
        bottom = -7.0 - 0.25 * hair.length if style == "bob" else -9.4 - hair.length
        outer = rx + (0.3 if style == "bob" else 0.9)
        lock_l = np.array([[-outer, bottom, -1.0], [-6.8, bottom + 0.6, -0.5],
                           [-6.6, -8.5, -0.5], [-7.55, -3.0, -1.2], [-7.4, 2.0, -1.2]])
        lock_r = lock_l[::-1] * np.array([-1, 1, 1])
        front.append(np.concatenate([cap_arc, lock_l, hairline, lock_r]))
    if hair.fringe != "none":
        xs = np.linspace(-temple_x + 0.2, temple_x - 0.2, 15)
        if hair.fringe == "straight":
            ys = 5.7 + 0.3 * np.abs(xs / temple_x) ** 2 + _jagged(15, 0.5, hair.wave * 3)
        else:  # swept from the subject's right down towards the left
            ys = 5.4 + 2.2 * (xs + temple_x) / (2 * temple_x) + _jagged(15, 0.4, hair.wave * 3)
        ys = np.minimum(ys, top - (top - temple_y) * np.abs(xs / temple_x) ** 2.5 - 0.2)
        lower = _front_curve(xs, ys, 0.5)
        upper = _front_curve(xs[::-1], np.full(15, top + 0.5) - 0.8 * np.abs(xs[::-1]) / 6, 0.4)
        front.append(np.concatenate([lower, upper]))
    return behind, front


def hat_shapes(hat: Hat) -> list[tuple[str, np.ndarray, float]]:
    """(material, polygon, line thickness cm or 0 for filled) in paint order, canonical cm."""
    cy, (rx, ry, _) = SKULL_C[1], SKULL_R
    h = hat.height
    out: list[tuple[str, np.ndarray, float]] = []
    if hat.style == "beanie":
        band_y = 6.6
        crown = _arc(rx + 1.0, ry * h + 1.4, cy, SKULL_C[2], y_min=3.8)
        xs = np.linspace(-rx - 0.6, rx + 0.6, 25)
        band = _front_curve(xs, np.full(25, band_y), 0.8)
        out.append(("hat", np.concatenate([crown, band[:1] * [1, 0, 1] + [0, 3.8, 0],
                                           band, band[-1:] * [1, 0, 1] + [0, 3.8, 0]]), 0.0))
        cuff_top = _front_curve(xs[::-1], np.full(25, band_y + 1.6), 0.9)
        out.append(("hat_band", np.concatenate([band, cuff_top]), 0.0))
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        top_y = cy + ry * h + 1.4
        out.append(("hat_band", np.stack([1.8 * np.cos(t), top_y + 1.0 + 1.8 * np.sin(t),
                                          np.full(24, SKULL_C[2])], 1), 0.0))
    elif hat.style == "cap":
        band_y = 7.4
        crown = _arc(rx + 0.6, ry * h + 0.8, cy, SKULL_C[2], y_min=4.6)
        xs = np.linspace(-rx + 0.2, rx - 0.2, 25)
        band = _front_curve(xs, np.full(25, band_y), 0.5)
        out.append(("hat", np.concatenate([crown, band]), 0.0))
        vx = np.linspace(-6.2, 6.2, 25)
        reach = 6.5 * np.sqrt(np.clip(1 - (vx / 6.6) ** 2, 0, 1))
        base = _front_curve(vx, np.full(25, band_y), 0.5)
        tip = base + np.stack([0.05 * vx, -0.35 * reach, reach], 1)
        out.append(("hat_band", np.concatenate([base, tip[::-1]]), 0.0))
    else:  # fedora: brim disc, crown, band
        brim_y = 7.0
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        brim = np.stack([(rx + 4.5) * np.cos(t), np.full(48, brim_y),
                         SKULL_C[2] + (SKULL_R[2] + 4.5) * np.sin(t)], 1)
        out.append(("hat", brim, 0.0))
        out.append(("hat", np.concatenate([brim, brim[:1]]), 0.5))
        top = brim_y + 7.5 * h
        crown = np.array([[rx + 0.2, brim_y, SKULL_C[2]], [rx - 0.6, top - 0.6, SKULL_C[2]],
                          [rx - 1.8, top, SKULL_C[2]], [0, top - 0.9, SKULL_C[2]],
                          [-rx + 1.8, top, SKULL_C[2]], [-rx + 0.6, top - 0.6, SKULL_C[2]],
                          [-rx - 0.2, brim_y, SKULL_C[2]]])
        out.append(("hat", crown, 0.0))
        band = np.array([[rx + 0.15, brim_y, SKULL_C[2]], [rx - 0.05, brim_y + 1.4, SKULL_C[2]],
                         [-rx + 0.05, brim_y + 1.4, SKULL_C[2]], [-rx - 0.15, brim_y, SKULL_C[2]]])
        out.append(("hat_band", band, 0.0))
    return out


def _lens_outline(shape: str, size: float, n: int = 40) -> np.ndarray:
    """Right-eye lens outline in the glasses plane, (n, 2) cm around the eye centre
    (x grows towards the temple)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    if shape == "round":
        pts = np.stack([2.05 * c, 2.0 * s], 1)
    elif shape == "rect":  # superellipse: a rounded rectangle
        e = 0.25
        pts = np.stack([2.45 * np.sign(c) * np.abs(c) ** e, 1.6 * np.sign(s) * np.abs(s) ** e], 1)
    elif shape == "aviator":  # teardrop: full at the top, drooping at the lower inside
        pts = np.stack([2.3 * c, 1.9 * s - 0.55 * (s < 0) * (1 - c) * np.abs(s)], 1)
        pts[:, 1] += 0.25
    else:  # cateye: upswept outer-top corner
        pts = np.stack([2.35 * c, 1.6 * s + 0.7 * np.clip(c, 0, 1) ** 2 * np.clip(s, 0, 1)], 1)
    return pts * size


def glasses_shapes(glasses: Glasses, identity: Identity) -> dict[str, list[np.ndarray]]:
    """Lens polygons and frame polylines (cm, the identity's head) keyed by material."""
    centers = _eye_centers(identity)
    z = 5.6 * identity.face_width
    lenses, frames = [], []
    inner_tops = []
    for side, center in (("left", centers[0]), ("right", centers[1])):
        outline = _lens_outline(glasses.shape, glasses.lens_size)
        # Outline x grows towards the temple: the left eye (x > 0) keeps it, the right flips.
        sign = 1.0 if side == "left" else -1.0
        pts = np.stack([center[0] + sign * outline[:, 0], center[1] + 0.1 + outline[:, 1],
                        np.full(len(outline), z)], 1)
        lenses.append(pts)
        frames.append(np.concatenate([pts, pts[:1]]))
        inner = pts[np.argmin(np.abs(pts[:, 0]) + 0.3 * np.abs(pts[:, 1] - center[1] - 0.4))]
        outer = pts[np.argmax(np.abs(pts[:, 0]) - 0.3 * np.abs(pts[:, 1] - center[1] - 0.6))]
        inner_tops.append(inner)
        temple_end = np.array([sign * 7.4 * identity.face_width, outer[1] + 0.2, 0.0])
        frames.append(np.stack([outer, temple_end]))
    a, b = inner_tops
    bridge = np.stack([a, (a + b) / 2 + [0, 0.25, 0.1], b])
    frames.append(bridge)
    return {"lens": lenses, "frame": frames}


@lru_cache(maxsize=8)
def beard_triangles(style: str) -> np.ndarray:
    """Mesh triangles (m, 3) covered by a beard style (chosen on the canonical mesh)."""
    v, tri = canonical_mesh()
    topo = topology()
    x, y = np.abs(v[:, 0]), v[:, 1]
    if style == "full":
        cheek = np.where(x < 3.0, -2.35, -2.6 + (x - 3.0) * (3.3 / 4.7))
        inside = y < cheek
    elif style == "goatee":
        inside = (x < 2.9) & (y < -2.35)
    elif style == "moustache":
        inside = (x < 3.0) & (y < -2.35) & (y > -4.9)
    else:  # chinstrap: a band along the jaw line plus the chin
        oval = v[list(topo.face_oval)]
        d = np.min(np.linalg.norm(v[:, None, :2] - oval[None, :, :2], axis=2), axis=1)
        inside = (d < 1.4) & (y < 0.5)
    lip_ring = np.array(topo.lips_outer_upper + topo.lips_outer_lower[::-1][1:-1])
    lip_poly = v[lip_ring, :2].astype(np.float32)
    keep = []
    for t in tri:
        if not inside[t].all():
            continue
        centroid = v[t, :2].mean(0)
        if cv2.pointPolygonTest(lip_poly, (float(centroid[0]), float(centroid[1])), False) >= 0:
            continue  # lips stay visible
        keep.append(t)
    return np.array(keep, np.int32).reshape(-1, 3)


def beard_fringe(style: str, mesh: np.ndarray, thickness: float) -> np.ndarray | None:
    """The beard's volume below the jaw: the lower face oval pushed outward (cm)."""
    if style == "moustache":
        return None
    topo = topology()
    oval = mesh[list(topo.face_oval)]
    limit = 0.5 if style in ("full", "chinstrap") else -6.0
    xlim = 9.0 if style in ("full", "chinstrap") else 2.9
    sel = (oval[:, 1] < limit) & (np.abs(oval[:, 0]) < xlim)
    idx = np.flatnonzero(sel)
    if len(idx) < 2:
        return None
    # The oval is a loop: rotate it so the selected arc is contiguous.
    start = idx[np.argmax(np.diff(np.concatenate([idx, idx[:1] + len(oval)])))] + 1
    order = [(start + i) % len(oval) for i in range(len(oval))]
    arc = oval[[i for i in order if sel[i]]]
    center = np.array([0.0, -1.0, 0.0])
    out = (arc - center) * np.array([1.0, 1.0, 0.0])
    out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-9
    # Thickest at the chin, tapering to nothing at the ends of the arc.
    taper = np.sin(np.linspace(0, np.pi, len(arc)))[:, None]
    pushed = arc + out * thickness * (0.25 + 0.75 * taper) + [0, 0, 0.5]
    return np.concatenate([arc, pushed[::-1]])


def ear_polygon(side: str, identity: Identity) -> tuple[np.ndarray, np.ndarray]:
    """(ear outline (n, 3) cm, outward normal (3,)) for side 'left' (x > 0) or 'right'."""
    sign = 1.0 if side == "left" else -1.0
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    e = identity.ear_size
    u, w = np.cos(t), np.sin(t)  # u: up/down, w: front/back along the head
    y = 0.9 + 3.0 * e * u + 0.4 * (u > 0) * u
    z = -3.4 + 1.5 * e * w
    x = 7.5 + 1.3 * e * (0.5 - 0.5 * w) * (0.6 + 0.4 * np.abs(u))
    pts = np.stack([sign * x * identity.face_width, y * identity.face_length,
                    z * identity.face_width], 1)
    normal = np.array([sign * np.cos(np.radians(35)), 0.0, np.sin(np.radians(35))])
    return pts, normal


# -------------------------------------------------------------------------------- raster


class _Canvas:
    """A material-id map at ``k``× resolution; polygons come in output-pixel coordinates."""

    SHIFT = 4

    def __init__(self, height: int, width: int, k: int):
        self.k = k
        self.mat = np.zeros((height * k, width * k), np.uint8)

    def _fix(self, pts: np.ndarray) -> np.ndarray:
        # Output pixel x covers [x, x+1) hi-res [kx, kx+k); cv2 puts pixel centres on integers.
        hi = np.asarray(pts, np.float64)[:, :2] * self.k - 0.5
        return np.round(hi * (1 << self.SHIFT)).astype(np.int32).reshape(-1, 1, 2)

    def fill(self, pts: np.ndarray, material: int) -> None:
        cv2.fillPoly(self.mat, [self._fix(pts)], int(material), cv2.LINE_8, self.SHIFT)

    def triangles(self, pts: np.ndarray, tris: np.ndarray, material: int) -> None:
        fixed = self._fix(pts)
        for t in tris:
            cv2.fillConvexPoly(self.mat, fixed[t], int(material), cv2.LINE_8, self.SHIFT)

    def line(self, pts: np.ndarray, material: int, thickness: float) -> None:
        """A polyline ``thickness`` output pixels wide."""
        width = max(1, int(round(thickness * self.k)))
        cv2.polylines(self.mat, [self._fix(pts)], False, int(material), width, cv2.LINE_8,
                      self.SHIFT)

    def fill_within(self, pts: np.ndarray, material: int, within: tuple[int, ...]) -> None:
        """Fill only where the map already holds one of ``within`` (an iris inside its eye)."""
        fixed = self._fix(pts)
        lo = np.maximum((fixed[:, 0].min(0) >> self.SHIFT) - 1, 0)
        hi = (fixed[:, 0].max(0) >> self.SHIFT) + 2
        x0, y0 = int(lo[0]), int(lo[1])
        x1, y1 = min(int(hi[0]), self.mat.shape[1]), min(int(hi[1]), self.mat.shape[0])
        if x1 <= x0 or y1 <= y0:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        offset = np.array([x0, y0], np.int32) << self.SHIFT
        cv2.fillPoly(mask, [fixed - offset], 1, cv2.LINE_8, self.SHIFT)
        sub = self.mat[y0:y1, x0:x1]
        sub[(mask > 0) & np.isin(sub, within)] = material


def _circle3d(center: np.ndarray, radius: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return center + np.stack([radius * np.cos(t), radius * np.sin(t), np.zeros(n)], 1)


def _paint(canvas: _Canvas, cam: _Camera, identity: Identity, attributes: Attributes,
           pose: Pose, mesh: np.ndarray, width: int) -> np.ndarray | None:
    """Paint every layer; returns the material map under the lenses (or None)."""
    topo = topology()
    p2 = cam.xy(mesh)
    sid = lambda pts: cam.xy(_id_scale(np.asarray(pts, np.float64), identity))  # noqa: E731
    hair = attributes.hair

    if hair is not None:
        for poly in hair_shapes(hair)[0]:
            canvas.fill(sid(poly), M["hair_back"])

    # Neck (from under the jaw, in the head frame, down into the body frame), then clothes.
    neck_top = cam.xy(np.array([[-4.6, -4.0, -4.5], [4.6, -4.0, -4.5]])
                      * [identity.face_width, identity.face_length, 1])
    nw = 5.0 * identity.face_width
    neck_bottom = cam.body_xy(np.array([[nw + 0.4, -17.0], [nw + 0.8, -60.0],
                                        [-nw - 0.8, -60.0], [-nw - 0.4, -17.0]]), width)
    canvas.fill(np.concatenate([neck_top, neck_bottom]), M["neck"])
    if identity.v_neck:
        neckline = [[-nw - 0.6, -13.4], [0.0, -19.5], [nw + 0.6, -13.4]]
    else:
        neckline = [[-nw - 0.6, -13.4], [-3.0, -15.4], [0.0, -15.9], [3.0, -15.4],
                    [nw + 0.6, -13.4]]
    shoulder = [[12.0, -15.2], [17.5, -17.8], [21.0, -22.0], [23.0, -60.0]]
    body = neckline + shoulder + [[-x, y] for x, y in shoulder[::-1]]
    canvas.fill(cam.body_xy(np.array(body), width), M["cloth"])

    # Ears facing away from the camera sit behind the head.
    ears = []
    for side in ("left", "right"):
        pts, normal = ear_polygon(side, identity)
        facing = (cam.rotation @ normal)[2] > -0.1
        ears.append((cam.xy(pts), M["ear_l" if side == "left" else "ear_r"], facing))
    for pts, mat, facing in ears:
        if not facing:
            canvas.fill(pts, mat)
    # Skull above the jaw, then the face oval: both skin.
    canvas.fill(sid(skull_polygon()), M["skin"])
    canvas.fill(p2[list(topo.face_oval)], M["skin"])
    for pts, mat, facing in ears:
        if facing:
            canvas.fill(pts, mat)

    # Nose: the hull of the nose landmarks, nostrils under the tip.
    canvas.fill(cv2.convexHull(p2[list(topo.nose)].astype(np.float32))[:, 0], M["nose"])
    tip = mesh[2]
    for sx in (-1, 1):
        c = tip + np.array([sx * 0.75 * identity.nose_width, 0.15, -0.1])
        ring = _circle3d(c, 1.0, 16) * [1, 1, 1]
        ring[:, 0] = c[0] + (ring[:, 0] - c[0]) * 0.42
        ring[:, 1] = c[1] + (ring[:, 1] - c[1]) * 0.2
        canvas.fill_within(cam.xy(ring), M["nostril"], (M["nose"],))

    canvas.fill(p2[list(topo.left_brow)], M["brow_l"])
    canvas.fill(p2[list(topo.right_brow)], M["brow_r"])

    centers, _ = _iris_geometry(identity, pose)
    for eye, center, sclera, iris, pupil in (
        (topo.left_eye, centers[0], "sclera_l", "iris_l", "pupil_l"),
        (topo.right_eye, centers[1], "sclera_r", "iris_r", "pupil_r"),
    ):
        canvas.fill(p2[list(eye)], M[sclera])
        r = 0.58 * identity.eye_size
        canvas.fill_within(cam.xy(_circle3d(center, r, 24)), M[iris], (M[sclera],))
        canvas.fill_within(cam.xy(_circle3d(center, 0.42 * r, 16)), M[pupil], (M[iris],))

    upper = p2[list(topo.lips_outer_upper) + list(topo.lips_inner_upper[::-1])]
    lower = p2[list(topo.lips_outer_lower) + list(topo.lips_inner_lower[::-1])]
    inner = p2[list(topo.lips_inner_upper) + list(topo.lips_inner_lower[::-1][1:-1])]
    canvas.fill(upper, M["u_lip"])
    canvas.fill(lower, M["l_lip"])
    canvas.fill(inner, M["mouth"])
    if pose.mouth_open > 0.15:
        teeth = mesh[list(topo.lips_inner_upper)].copy()
        teeth_low = teeth[::-1] - [0, 0.45 * identity.face_length, 0]
        canvas.fill_within(cam.xy(np.concatenate([teeth, teeth_low])), M["teeth"], (M["mouth"],))

    if attributes.beard is not None:
        beard: Beard = attributes.beard
        canvas.triangles(p2, beard_triangles(beard.style), M["beard"])
        extra = beard_fringe(beard.style, mesh, beard.thickness)
        if extra is not None:
            canvas.fill(cam.xy(extra), M["beard"])

    under = None
    if attributes.glasses is not None:
        shapes = glasses_shapes(attributes.glasses, identity)
        under = canvas.mat.copy()
        for lens in shapes["lens"]:
            canvas.fill(cam.xy(lens), M["lens"])
        thick = attributes.glasses.thickness * cam.scale
        for frame in shapes["frame"]:
            canvas.line(cam.xy(frame), M["frame"], thick)

    if hair is not None:
        for poly in hair_shapes(hair)[1]:
            canvas.fill(sid(poly), M["hair"])

    if attributes.hat is not None:
        for material, poly, line in hat_shapes(attributes.hat):
            pts = sid(poly)
            if line > 0:
                canvas.line(pts, M[material], line * cam.scale)
            else:
                canvas.fill(pts, M[material])
    return under


# -------------------------------------------------------------------------------- shading


@lru_cache(maxsize=16)
def _background_hi(background: Background, hk: int, wk: int, k: int) -> np.ndarray:
    """The background at hi-res, a function of normalised coordinates (size-independent)."""
    ys, xs = np.mgrid[0:hk, 0:wk].astype(np.float32)
    u = (xs + 0.5) / wk
    v = (ys + 0.5) / hk
    c = np.asarray(background.colors, np.float32)
    a = np.radians(background.angle)
    g = np.clip((u - 0.5) * np.cos(a) + (v - 0.5) * np.sin(a) + 0.5, 0, 1)[..., None]
    img = c[0] * (1 - g) + c[1] * g
    if background.kind == "flat":
        img = np.broadcast_to(c[0], img.shape).copy()
    elif background.kind == "blobs":
        rng = np.random.default_rng(background.seed)
        for _ in range(int(background.frequency)):
            bx, by = rng.uniform(0, 1, 2)
            r = rng.uniform(0.08, 0.3)
            w = np.exp(-((u - bx) ** 2 + (v - by) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - 0.8 * w) + c[2] * 0.8 * w
    elif background.kind == "stripes":
        s = 0.5 + 0.5 * np.sin(2 * np.pi * background.frequency *
                               ((u - 0.5) * np.sin(a) - (v - 0.5) * np.cos(a)))
        w = (0.6 * s)[..., None]
        img = img * (1 - w) + c[2] * w
    out = img.astype(np.float32)
    out.setflags(write=False)
    return out


def _palette(identity: Identity, attributes: Attributes) -> np.ndarray:
    p = np.zeros((len(MATERIALS), 3), np.float32)
    skin = np.asarray(identity.skin, np.float32)
    p[M["skin"]] = skin
    p[M["ear_l"]] = p[M["ear_r"]] = skin * 0.93
    p[M["nose"]] = skin * 0.95
    p[M["nostril"]] = skin * 0.45
    p[M["neck"]] = skin * 0.82
    p[M["cloth"]] = identity.cloth
    p[M["brow_l"]] = p[M["brow_r"]] = identity.brows
    p[M["sclera_l"]] = p[M["sclera_r"]] = (238, 236, 230)
    p[M["iris_l"]] = p[M["iris_r"]] = identity.iris
    p[M["pupil_l"]] = p[M["pupil_r"]] = (12, 10, 10)
    p[M["mouth"]] = (85, 28, 32)
    p[M["teeth"]] = (236, 232, 218)
    p[M["u_lip"]] = identity.lips
    p[M["l_lip"]] = np.asarray(identity.lips, np.float32) * 1.06
    if attributes.hair is not None:
        p[M["hair"]] = attributes.hair.color
        p[M["hair_back"]] = np.asarray(attributes.hair.color, np.float32) * 0.8
    if attributes.beard is not None:
        p[M["beard"]] = attributes.beard.color
    if attributes.glasses is not None:
        p[M["frame"]] = attributes.glasses.frame
        p[M["lens"]] = attributes.glasses.tint
    if attributes.hat is not None:
        p[M["hat"]] = attributes.hat.color
        p[M["hat_band"]] = attributes.hat.band
    return np.clip(p, 0, 255)


def _shade_factor(mat: np.ndarray, u: np.ndarray, v: np.ndarray, identity: Identity,
                  attributes: Attributes) -> np.ndarray:
    """Per-pixel brightness from material and head-local coordinates (cm); 1-D arrays.

    Textures are evaluated only on the pixels of their material (most of a frame is not hair).
    """
    shade = (1.0 + 0.08 * np.clip(u / 9.0, -1.5, 1.5)).astype(np.float32)  # light from the left

    def on(materials: list[int]) -> np.ndarray:
        return np.flatnonzero(np.isin(mat, materials))

    # Skin: darker towards the face's rim, a cheap stand-in for a rounded surface.
    i = on([M["skin"], M["nose"], M["ear_l"], M["ear_r"], M["u_lip"], M["l_lip"]])
    rim = (u[i] / (8.5 * identity.face_width)) ** 2 + (
        (v[i] + 0.5) / (11.0 * identity.face_length)) ** 2
    shade[i] *= 1.0 - 0.2 * np.clip(rim, 0, 1.3)
    i = on([M["neck"]])
    shade[i] *= 0.8 + 0.2 * np.clip((-v[i] - 9.0) / 5.0, 0, 1)
    hair = attributes.hair
    if hair is not None:
        i = on([M["hair"], M["hair_back"]])
        hu, hv = u[i], v[i]
        if hair.style == "curly":
            tex = 0.5 + 0.5 * np.sin(3.2 * hu + 1.7) * np.sin(3.2 * hv)
        else:
            tex = 0.5 + 0.5 * np.sin(2 * np.pi * (0.9 * hu + 0.6 * hair.wave * np.sin(0.45 * hv)))
        shade[i] *= 0.78 + 0.3 * tex
    if attributes.beard is not None:
        i = on([M["beard"]])
        bu, bv = u[i], v[i]
        tex = 0.5 + 0.5 * np.sin(6.0 * bu + 2.0 * bv) * np.sin(5.0 * bv - 1.3 * bu)
        shade[i] *= 0.8 + 0.3 * tex
    if identity.cloth_stripes:
        i = on([M["cloth"]])
        shade[i] *= np.where(np.sin(2 * np.pi * v[i] / 2.5) > 0, 0.65, 1.0)
    shade[mat == M["background"]] = 1.0
    return shade


def _shade_image(mat: np.ndarray, under: np.ndarray | None, background: Background,
                 cam: _Camera, identity: Identity, attributes: Attributes, k: int) -> np.ndarray:
    """Hi-res colour (Hk, Wk, 3) float32 of a material map (lens pixels tint what is under)."""
    hk, wk = mat.shape
    palette = _palette(identity, attributes)
    bg = _background_hi(background, hk, wk, k)
    # Head-local coordinates (cm) of every hi-res pixel: textures move with the head.
    ys, xs = np.mgrid[0:hk, 0:wk].astype(np.float32)
    px, py = (xs + 0.5) / k - cam.cx, (ys + 0.5) / k - cam.cy
    r = np.radians(_roll_of(cam))
    u = (np.cos(r) * px - np.sin(r) * py) / cam.scale
    v = -(np.sin(r) * px + np.cos(r) * py) / cam.scale

    flat_u, flat_v = u.ravel(), v.ravel()
    bg_flat = bg.reshape(-1, 3)

    def colour(m: np.ndarray, idx: np.ndarray | None) -> np.ndarray:
        """Colours of materials ``m`` (1-D) at flat pixel indices ``idx`` (None = all)."""
        uu, vv, bb = (flat_u, flat_v, bg_flat) if idx is None else (
            flat_u[idx], flat_v[idx], bg_flat[idx])
        c = palette[m] * _shade_factor(m, uu, vv, identity, attributes)[:, None]
        is_bg = m == M["background"]
        c[is_bg] = bb[is_bg]
        return c

    color = colour(mat.ravel(), None)
    if under is not None and attributes.glasses is not None:
        lens = np.flatnonzero(mat.ravel() == M["lens"])
        if len(lens):
            a = attributes.glasses.opacity
            color[lens] = colour(under.ravel()[lens], lens) * (1 - a) + palette[M["lens"]] * a
    color = color.reshape(hk, wk, 3)
    return color


def _roll_of(cam: _Camera) -> float:
    """The on-screen rotation of the head's up axis (degrees)."""
    up = cam.rotation @ np.array([0.0, 1.0, 0.0])
    return float(np.degrees(np.arctan2(-up[0], up[1])))


# -------------------------------------------------------------------------------- public


def block_labels(labels_hi: np.ndarray, k: int) -> np.ndarray:
    """Majority label of each k×k block; ties go to the label of the block's centre sample."""
    hk, wk = labels_hi.shape
    h, w = hk // k, wk // k
    blocks = labels_hi.reshape(h, k, w, k).transpose(0, 2, 1, 3).reshape(h, w, k * k)
    centre = blocks[..., (k // 2) * k + k // 2]
    out = centre.copy()
    mixed = ~(blocks == blocks[..., :1]).all(-1)
    if mixed.any():
        b = blocks[mixed]
        counts = (b[:, :, None] == b[:, None, :]).sum(-1).astype(np.float32)
        counts += 0.5 * (b == centre[mixed][:, None])
        out[mixed] = b[np.arange(len(b)), counts.argmax(1)]
    return out


def render_frame(
    identity: Identity,
    attributes: Attributes,
    pose: Pose,
    size: int | tuple[int, int],
    background: Background | int = 0,
    *,
    supersample: int = SUPERSAMPLE,
    flat: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One portrait: image (H,W,3) uint8, labels (H,W) uint8, landmarks (478,3) float32.

    ``size`` is an int (square) or (height, width). ``background`` a Background or a seed.
    ``flat=True`` colours every pixel with its label's FLAT_PALETTE colour (no shading,
    opaque lenses): for checking labels against pixels.
    """
    h, w = _hw(size)
    if not isinstance(background, Background):
        background = random_background(np.random.default_rng(background))
    k = int(supersample)
    cam = _Camera.for_pose(pose, h, w)
    mesh = posed_mesh(identity, pose)
    canvas = _Canvas(h, w, k)
    under = _paint(canvas, cam, identity, attributes, pose, mesh, w)
    labels_hi = MAT_CLASS[canvas.mat]
    if flat:
        color = FLAT_PALETTE[labels_hi].astype(np.float32)
    else:
        color = _shade_image(canvas.mat, under, background, cam, identity, attributes, k)
    image = color.reshape(h, k, w, k, 3).mean((1, 3))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    labels = block_labels(labels_hi, k) if k > 1 else labels_hi
    return image, labels, _landmarks(cam, mesh, identity, pose)


def render_video(
    identity: Identity,
    attributes: Attributes,
    motion: Motion,
    size: int | tuple[int, int],
    background_seed: Background | int = 0,
    *,
    supersample: int = SUPERSAMPLE,
    flat: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """frames (T,H,W,3) uint8, labels (T,H,W) uint8, landmarks (T,478,3) float32."""
    out = [render_frame(identity, attributes, motion.pose(t), size, background_seed,
                        supersample=supersample, flat=flat) for t in range(len(motion))]
    frames, labels, landmarks = (np.stack(x) for x in zip(*out, strict=True))
    return frames, labels, landmarks
