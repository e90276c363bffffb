"""The training-pair settings (:class:`PairConfig`), apart from :mod:`durian.data.pairs` so that
reading a params file needs no torch: the params file's ``pair`` section is this class."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from durian.data.augment import FillMode
from preprocessing.labels import CATEGORIES, check_category


class PairConfig(BaseModel):
    """Every knob of example construction, validated; the params file's ``pair`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # (H, W) of every output image (an int: square). None: the model's resolution, filled in by
    # Trainer.from_config (PairConfig.at), so the two cannot disagree.
    resolution: tuple[int, int] | None = None
    num_frames: int = Field(1, ge=1, le=1024)  # F: 1 in stage 1, a window (e.g. 24) in stage 2
    frame_stride: int = Field(1, ge=1)  # stride of the stage-2 window (e.g. 4)
    # Frames between a reference and the nearest target (clamped for short clips; paper: 30).
    min_gap: int = Field(4, ge=0)
    # An attribute counts as present above this fraction of the pixels.
    min_fraction: float = Field(0.005, ge=0.0, lt=1.0)
    categories: tuple[str, ...] = CATEGORIES  # categories a clip may be trained on
    # Classifier-free guidance: both references dropped, or one alone (sum <= 1).
    drop_all_prob: float = Field(0.1, ge=0.0, le=1.0)
    drop_identity_prob: float = Field(0.05, ge=0.0, le=1.0)
    drop_attribute_prob: float = Field(0.05, ge=0.0, le=1.0)
    # Mask expansion of the identity reference's removed region (offline default: mask bank):
    # the chance an example is expanded, bank masks united, random dilation range (fractions
    # of the image side).
    expansion_prob: float = Field(1.0, ge=0.0, le=1.0)
    expansion_n_union: int = Field(1, ge=1)
    expansion_dilation: tuple[float, float] = (0.0, 0.03)
    # Reference augmentation: spatial (translate and scale as fractions, rotate in degrees) …
    augment: bool = True
    max_translate: float = Field(0.05, ge=0.0, le=0.5)
    max_scale: float = Field(0.1, ge=0.0, lt=1.0)
    max_rotate: float = Field(10.0, ge=0.0, le=180.0)
    fill: FillMode = "inpaint"
    # … and appearance (colour-jitter strengths).
    brightness: float = Field(0.2, ge=0.0, le=1.0)
    contrast: float = Field(0.2, ge=0.0, le=1.0)
    saturation: float = Field(0.2, ge=0.0, le=1.0)
    hue: float = Field(0.02, ge=0.0, le=0.5)
    keypoint_thickness: int = Field(1, ge=1, le=16)  # line width of the rendered landmarks
    # Complementary masking. False is the paper's shortcut ablation ("w/o mask"): both
    # references are the whole frames and carry no mask (identity mask all 0, attribute mask
    # all 1), so the model can copy-paste; only benchmarks/learns_transfer.py turns it off.
    mask_references: bool = True

    @field_validator("resolution", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("categories")
    @classmethod
    def _known_categories(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("categories is empty")
        return tuple(check_category(c) for c in value)

    @model_validator(mode="after")
    def _consistent(self) -> PairConfig:
        if self.drop_all_prob + self.drop_identity_prob + self.drop_attribute_prob > 1:
            raise ValueError("drop probabilities must sum to <= 1")
        low, high = self.expansion_dilation
        if not 0 <= low <= high <= 1:
            raise ValueError("expansion_dilation must be (low, high) with 0 <= low <= high <= 1")
        if self.resolution is not None and min(self.resolution) < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        return self

    def at(self, resolution: int | tuple[int, int]) -> PairConfig:
        """This config at ``resolution`` unless it names its own."""
        if self.resolution is not None:
            return self
        return PairConfig.model_validate({**self.model_dump(), "resolution": resolution})
