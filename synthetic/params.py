"""What a synthetic portrait is made of: identity, attributes, pose/motion, background.

All lengths are in the canonical face model's centimetres; all colours RGB 0..255. Every
dataclass is frozen and hashable (so geometry can be cached) and round-trips through
``asdict``/``from_dict`` for JSON indexes. Random draws take a ``numpy.random.Generator``
and consume a fixed number of values per call, so one field's change never shifts another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from preprocessing.labels import check_category

RGB = tuple[int, int, int]

HAIR_STYLES = ("short", "bob", "long", "bun", "curly")
FRINGES = ("none", "straight", "side")
GLASSES_SHAPES = ("round", "rect", "aviator", "cateye")
HAT_STYLES = ("beanie", "cap", "fedora")
BEARD_STYLES = ("full", "goatee", "moustache", "chinstrap")
BACKGROUND_KINDS = ("flat", "gradient", "blobs", "stripes")
SYNTH_CATEGORIES = ("hair", "glasses", "hat", "beard")  # what the generator can draw

_SKIN = ((255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 140, 100), (160, 105, 70),
         (120, 78, 52), (90, 58, 40))
_EYES = ((90, 60, 35), (60, 40, 25), (70, 110, 160), (80, 120, 80), (120, 100, 60),
         (110, 120, 130))
_HAIR = ((28, 24, 22), (62, 42, 30), (105, 70, 42), (200, 165, 105), (150, 65, 35),
         (165, 165, 165), (225, 222, 212), (60, 85, 165), (210, 105, 150), (70, 140, 90))
_FRAMES = ((20, 20, 20), (95, 55, 30), (200, 170, 80), (180, 180, 190), (170, 30, 40))


def _color(rng: np.random.Generator, table: tuple[RGB, ...], jitter: float) -> RGB:
    i = int(rng.integers(len(table)))
    noise = rng.uniform(-jitter, jitter, 3)
    return tuple(int(np.clip(c + n, 0, 255)) for c, n in zip(table[i], noise, strict=True))


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _from_dict(cls, data: dict[str, Any]):
    kwargs = {}
    for f in fields(cls):
        value = data[f.name]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


@dataclass(frozen=True)
class Identity:
    """The face itself: shape deformations of the canonical mesh and colours."""

    face_width: float = 1.0
    face_length: float = 1.0
    jaw_width: float = 1.0
    eye_size: float = 1.0
    nose_width: float = 1.0
    nose_length: float = 1.0
    mouth_width: float = 1.0
    lip_thickness: float = 1.0
    brow_thickness: float = 1.0
    brow_raise: float = 0.0  # cm
    ear_size: float = 1.0
    skin: RGB = (224, 172, 130)
    lips: RGB = (180, 90, 90)
    iris: RGB = (90, 60, 35)
    brows: RGB = (60, 42, 30)
    cloth: RGB = (60, 80, 140)
    cloth_stripes: bool = False
    v_neck: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Identity:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Hair:
    style: str = "short"
    color: RGB = (62, 42, 30)
    volume: float = 1.0  # cm of hair over the skull
    length: float = 8.0  # cm below the chin (bob/long)
    fringe: str = "none"
    hairline: float = 0.0  # cm, positive = receding
    wave: float = 0.5  # strand waviness of the texture

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hair:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Glasses:
    shape: str = "round"
    frame: RGB = (20, 20, 20)
    thickness: float = 0.25  # cm
    lens_size: float = 1.0
    tint: RGB = (200, 220, 230)
    opacity: float = 0.15  # 0 clear .. 1 opaque (sunglasses ~0.85)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Glasses:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Hat:
    style: str = "beanie"
    color: RGB = (150, 40, 40)
    band: RGB = (40, 40, 40)
    height: float = 1.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hat:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class Beard:
    style: str = "full"
    color: RGB = (62, 42, 30)
    thickness: float = 0.8  # cm it stands off the jaw

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Beard:
        return _from_dict(cls, data)


_ATTRIBUTE_TYPES = {"hair": Hair, "glasses": Glasses, "hat": Hat, "beard": Beard}


@dataclass(frozen=True)
class Attributes:
    """Removable attributes; ``None`` means absent."""

    hair: Hair | None = None
    glasses: Glasses | None = None
    hat: Hat | None = None
    beard: Beard | None = None

    def present(self) -> tuple[str, ...]:
        return tuple(c for c in SYNTH_CATEGORIES if getattr(self, c) is not None)

    def with_category(self, category: str, other: Attributes) -> Attributes:
        """These attributes with ``category`` taken from ``other`` (absent there → absent)."""
        check_category(category)
        if category not in SYNTH_CATEGORIES:
            raise ValueError(f"the synthetic generator does not draw {category!r}")
        return replace(self, **{category: getattr(other, category)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attributes:
        return cls(**{
            c: None if data.get(c) is None else _ATTRIBUTE_TYPES[c].from_dict(data[c])
            for c in SYNTH_CATEGORIES
        })


@dataclass(frozen=True)
class Pose:
    """One frame's head pose and expression.

    ``tx, ty``: where the head's pivot lands, as fractions of width/height; ``scale``: face
    height (forehead-chin of the canonical face) as a fraction of the frame height;
    angles in degrees (roll positive = counter-clockwise on screen); blinks and mouth 0..1.
    """

    tx: float = 0.5
    ty: float = 0.45
    scale: float = 0.42
    roll: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    blink_left: float = 0.0
    blink_right: float = 0.0
    mouth_open: float = 0.0
    gaze_x: float = 0.0
    gaze_y: float = 0.0


POSE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Pose))


@dataclass(frozen=True, eq=False)
class Motion:
    """A pose per frame: every Pose field as a (T,) float array."""

    values: dict[str, np.ndarray]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Motion) and all(
            np.array_equal(self.values[k], other.values[k]) for k in POSE_FIELDS)

    __hash__ = object.__hash__

    def __post_init__(self) -> None:
        lengths = {len(np.asarray(self.values[k])) for k in POSE_FIELDS}
        if len(lengths) != 1:
            raise ValueError("all motion tracks must have the same length")

    def __len__(self) -> int:
        return len(self.values["tx"])

    def pose(self, t: int) -> Pose:
        return Pose(**{k: float(self.values[k][t]) for k in POSE_FIELDS})

    @classmethod
    def static(cls, pose: Pose, n_frames: int) -> Motion:
        return cls({k: np.full(n_frames, getattr(pose, k), np.float64) for k in POSE_FIELDS})

    @classmethod
    def from_poses(cls, poses: list[Pose]) -> Motion:
        return cls({k: np.array([getattr(p, k) for p in poses], np.float64) for k in POSE_FIELDS})

    def to_dict(self) -> dict[str, list[float]]:
        return {k: [float(v) for v in self.values[k]] for k in POSE_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Motion:
        return cls({k: np.asarray(data[k], np.float64) for k in POSE_FIELDS})


@dataclass(frozen=True)
class Background:
    kind: str = "gradient"
    colors: tuple[RGB, RGB, RGB] = ((200, 200, 210), (120, 130, 150), (90, 90, 90))
    angle: float = 0.0  # degrees
    frequency: float = 3.0  # stripes per frame / blob count
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Background:
        data = dict(data)
        data["colors"] = tuple(tuple(c) for c in data["colors"])
        return cls(**data)


def random_identity(rng: np.random.Generator) -> Identity:
    skin = _color(rng, _SKIN, 8)
    lips = tuple(int(np.clip(c * f, 0, 255)) for c, f in zip(skin, (0.85, 0.55, 0.55), strict=True))
    return Identity(
        face_width=_u(rng, 0.9, 1.08),
        face_length=_u(rng, 0.93, 1.07),
        jaw_width=_u(rng, 0.85, 1.1),
        eye_size=_u(rng, 0.85, 1.2),
        nose_width=_u(rng, 0.85, 1.25),
        nose_length=_u(rng, 0.9, 1.15),
        mouth_width=_u(rng, 0.85, 1.15),
        lip_thickness=_u(rng, 0.7, 1.4),
        brow_thickness=_u(rng, 0.7, 1.5),
        brow_raise=_u(rng, -0.2, 0.3),
        ear_size=_u(rng, 0.85, 1.15),
        skin=skin,
        lips=lips,
        iris=_color(rng, _EYES, 10),
        brows=_color(rng, _HAIR[:6], 10),
        cloth=tuple(int(c) for c in rng.integers(20, 235, 3)),
        cloth_stripes=bool(rng.random() < 0.3),
        v_neck=bool(rng.random() < 0.4),
    )


def random_hair(rng: np.random.Generator) -> Hair:
    style = HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))]
    return Hair(
        style=style,
        color=_color(rng, _HAIR, 12),
        volume=_u(rng, 2.5, 4.5) if style == "curly" else _u(rng, 0.5, 1.6),
        length=_u(rng, 4.0, 16.0),
        fringe=FRINGES[int(rng.integers(len(FRINGES)))],
        hairline=_u(rng, -0.4, 1.2),
        wave=_u(rng, 0.0, 1.0),
    )


def random_glasses(rng: np.random.Generator) -> Glasses:
    sun = bool(rng.random() < 0.3)
    return Glasses(
        shape=GLASSES_SHAPES[int(rng.integers(len(GLASSES_SHAPES)))],
        frame=_color(rng, _FRAMES, 10),
        thickness=_u(rng, 0.18, 0.4),
        lens_size=_u(rng, 0.9, 1.15),
        tint=(30, 35, 40) if sun else (205, 220, 230),
        opacity=_u(rng, 0.75, 0.92) if sun else _u(rng, 0.08, 0.25),
    )


def random_hat(rng: np.random.Generator) -> Hat:
    return Hat(
        style=HAT_STYLES[int(rng.integers(len(HAT_STYLES)))],
        color=tuple(int(c) for c in rng.integers(20, 235, 3)),
        band=tuple(int(c) for c in rng.integers(10, 120, 3)),
        height=_u(rng, 0.85, 1.2),
    )


def random_beard(rng: np.random.Generator) -> Beard:
    return Beard(
        style=BEARD_STYLES[int(rng.integers(len(BEARD_STYLES)))],
        color=_color(rng, _HAIR[:7], 12),
        thickness=_u(rng, 0.3, 1.3),
    )


def random_attributes(
    rng: np.random.Generator,
    p: dict[str, float] | None = None,
) -> Attributes:
    """Each category present with probability ``p[category]`` (defaults below)."""
    p = {"hair": 0.85, "glasses": 0.4, "hat": 0.25, "beard": 0.3, **(p or {})}
    # Draw every category's parameters unconditionally: a fixed number of draws per call.
    drawn = {"hair": random_hair(rng), "glasses": random_glasses(rng), "hat": random_hat(rng),
             "beard": random_beard(rng)}
    keep = {c: bool(rng.random() < p[c]) for c in SYNTH_CATEGORIES}
    return Attributes(**{c: drawn[c] if keep[c] else None for c in SYNTH_CATEGORIES})


def random_pose(rng: np.random.Generator) -> Pose:
    return Pose(
        tx=_u(rng, 0.45, 0.55), ty=_u(rng, 0.42, 0.5), scale=_u(rng, 0.36, 0.46),
        roll=_u(rng, -6, 6), yaw=_u(rng, -12, 12), pitch=_u(rng, -8, 8),
        gaze_x=_u(rng, -0.5, 0.5), gaze_y=_u(rng, -0.3, 0.3),
    )


def _smooth_track(rng: np.random.Generator, n: int, amplitude: float) -> np.ndarray:
    """A sum of two slow sinusoids with random phases: smooth, bounded by ``amplitude``."""
    t = np.arange(n, dtype=np.float64)
    freqs = rng.uniform(0.5, 2.0, 2) / max(n, 8)
    phases = rng.uniform(0, 2 * np.pi, 2)
    weights = rng.uniform(0.3, 1.0, 2)
    track = sum(w * np.sin(2 * np.pi * f * t + ph)
                for w, f, ph in zip(weights, freqs, phases, strict=True))
    return amplitude * track / weights.sum()


def random_motion(rng: np.random.Generator, n_frames: int) -> Motion:
    """Smooth head motion (translation, scale, roll, yaw, pitch) with blinks and talking."""
    base = random_pose(rng)
    v = {
        "tx": base.tx + _smooth_track(rng, n_frames, 0.04),
        "ty": base.ty + _smooth_track(rng, n_frames, 0.03),
        "scale": base.scale * (1 + _smooth_track(rng, n_frames, 0.06)),
        "roll": base.roll + _smooth_track(rng, n_frames, 6.0),
        "yaw": base.yaw + _smooth_track(rng, n_frames, 10.0),  # |yaw| <= 22: hair stays plausible
        "pitch": base.pitch + _smooth_track(rng, n_frames, 7.0),
        "gaze_x": np.clip(base.gaze_x + _smooth_track(rng, n_frames, 0.4), -1, 1),
        "gaze_y": np.clip(base.gaze_y + _smooth_track(rng, n_frames, 0.3), -1, 1),
    }
    # Blinks: a few 3-frame close/open events at random times, both eyes together.
    blink = np.zeros(n_frames)
    n_blinks = int(rng.integers(1, 2 + n_frames // 24))
    for start in rng.integers(0, max(n_frames - 2, 1), n_blinks):
        for dt, amount in enumerate((0.6, 1.0, 0.5)):
            if start + dt < n_frames:
                blink[start + dt] = max(blink[start + dt], amount)
    v["blink_left"] = blink
    v["blink_right"] = blink.copy()
    # Talking: a rectified sinusoid with a random syllable rate, sometimes silent.
    t = np.arange(n_frames)
    rate = _u(rng, 0.12, 0.35)
    talk = np.abs(np.sin(np.pi * rate * t + _u(rng, 0, np.pi))) * _u(rng, 0.3, 1.0)
    v["mouth_open"] = talk * float(rng.random() < 0.8)
    return Motion({k: np.asarray(v[k], np.float64) for k in POSE_FIELDS})


def random_background(rng: np.random.Generator) -> Background:
    colors = tuple(tuple(int(c) for c in rng.integers(15, 245, 3)) for _ in range(3))
    return Background(
        kind=BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))],
        colors=colors,
        angle=_u(rng, 0, 180),
        frequency=_u(rng, 2.0, 7.0),
        seed=int(rng.integers(2**31)),
    )
