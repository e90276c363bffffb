"""A deterministic generator of portrait videos with exact labels and FaceMesh landmarks.

Faces are drawn from mediapipe's 478-landmark topology (canonical face mesh + irises), so a
synthetic clip flows through the same shards, loader, keypoint renderer and training as a
real one; attributes (hair, glasses, hat, beard) can be swapped between identities to give
exact cross-identity ground truth.

A data source of its own: it imports only ``preprocessing`` (the label schema, the video writer),
never the ``durian`` library.
"""

from synthetic.params import (
    SYNTH_CATEGORIES,
    Attributes,
    Background,
    Beard,
    Glasses,
    Hair,
    Hat,
    Identity,
    Motion,
    Pose,
    random_attributes,
    random_background,
    random_identity,
    random_motion,
    random_pose,
)
from synthetic.render import (
    FLAT_PALETTE,
    landmarks_for_pose,
    render_frame,
    render_video,
)
from synthetic.transfer import (
    TransferCase,
    load_transfer_cases,
    make_transfer_cases,
    render_transfer,
    save_transfer_cases,
)

__all__ = [
    "FLAT_PALETTE",
    "SYNTH_CATEGORIES",
    "Attributes",
    "Background",
    "Beard",
    "Glasses",
    "Hair",
    "Hat",
    "Identity",
    "Motion",
    "Pose",
    "TransferCase",
    "landmarks_for_pose",
    "load_transfer_cases",
    "make_transfer_cases",
    "random_attributes",
    "random_background",
    "random_identity",
    "random_motion",
    "random_pose",
    "render_frame",
    "render_transfer",
    "render_video",
    "save_transfer_cases",
]
