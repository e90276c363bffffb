"""The label schema and the attribute categories, defined once.

Label maps use CelebAMask-HQ's 19 classes in the order of the common BiSeNet face parsers,
plus ``beard`` as class 19 where a parser (or the synthetic generator) can see beards.

It sits at the bottom of the package graph (imports nothing of the project): the parsers here
write label maps in it, and the synthetic portraits and the ``durian`` library read them.
"""

from __future__ import annotations

LABELS: tuple[str, ...] = (
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",
    "l_ear",
    "r_ear",
    "ear_r",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
    "neck",
    "neck_l",
    "cloth",
    "hair",
    "hat",
    "beard",
)
CLASS: dict[str, int] = {name: i for i, name in enumerate(LABELS)}
NUM_CLASSES: int = len(LABELS)

# Attribute category -> the label classes that make up its region.
ATTRIBUTE_CLASSES: dict[str, frozenset[int]] = {
    "hair": frozenset({CLASS["hair"]}),
    "glasses": frozenset({CLASS["eye_g"]}),
    "hat": frozenset({CLASS["hat"]}),
    "earrings": frozenset({CLASS["ear_r"]}),
    "beard": frozenset({CLASS["beard"]}),
}
CATEGORIES: tuple[str, ...] = tuple(ATTRIBUTE_CLASSES)

# The face itself: what an identity reference must keep visible.
FACE_CLASSES: frozenset[int] = frozenset(
    CLASS[n]
    for n in ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip", "l_lip")
)


def check_category(category: str) -> str:
    """Return ``category`` if known, else raise a ValueError naming the known ones."""
    if category not in ATTRIBUTE_CLASSES:
        known = ", ".join(CATEGORIES)
        raise ValueError(f"unknown attribute category {category!r} (known: {known})")
    return category
