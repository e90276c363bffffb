"""The face-crop rule's settings, shared by the preprocess stage and inference's preparation.

The params file's ``preprocess`` section extends :class:`CropConfig` (flows/params.py), so
training crops and the crops inference prepares follow one rule with one set of defaults.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CropConfig(BaseModel):
    """How a face is found and cropped (preprocessing.crop.process_clip)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    margin: float = Field(0.6, ge=0.0, le=3.0)  # crop margin around the face box (fraction)
    min_face_size: int = Field(32, ge=8)  # pixels; smaller faces are rejected
    # A clip is rejected as multiple_faces only for another face >= ratio x the main one in at
    # least fraction of its frames (one face, tracked); fewer are noted as stray_face_frames.
    second_face_min_ratio: float = Field(0.5, gt=0.0, le=1.0)
    second_face_min_fraction: float = Field(0.5, gt=0.0, le=1.0)
