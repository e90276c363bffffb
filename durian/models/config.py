"""The model's settings: what :func:`durian.models.profiles.model_from_config` builds.

One validated object for everything a model depends on: the profile and its resolution, the
local weights it starts from, the tiny profile's shape and the method's switches. A switch left
``None`` takes the profile's choice (:func:`durian.models.profiles.tiny_config` /
``sd15_config``), so the profile stays the one place that says what it is; the params file's
``model`` section is this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from preprocessing.identity import EMBEDDING_DIMS

PredictionType = Literal["epsilon", "v_prediction", "sample"]
# What PRNet's cross-attention reads: CLIP's embedding of the masked portrait, or a face
# embedding computed from the unmasked portrait (the shards' identity.npy in training).
IdentityEmbedding = Literal["clip", "dlib", "arcface"]

# The switches handed to the profile as config overrides when set (None: the profile's).
MODEL_SWITCHES: tuple[str, ...] = (
    "prediction_type",
    "zero_terminal_snr",
    "reference_positions",
    "reference_locality",
    "shared_reference_net",
    "freeze_reference_last_up_block",
)
# Shape knobs only the tiny profile has (sd15's shapes are SD 1.5's).
TINY_ONLY: tuple[str, ...] = ("widths", "pixel_downscale")


class ModelConfig(BaseModel):
    """A model: profile, resolution, starting weights, tiny shape, method switches."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    profile: Literal["tiny", "sd15"] = "tiny"
    resolution: int = Field(64, ge=32, le=2048, multiple_of=8)
    # Local SD folder: SD image-variations (unet/, vae/, image_encoder/, scheduler/) or SD 1.5.
    pretrained: str | None = None
    image_encoder: str | None = None  # CLIP vision folder (default <pretrained>/image_encoder)
    # AnimateDiff motion module (.ckpt as published, safetensors, or a MotionAdapter folder),
    # read for stage 2 only.
    motion_module: str | None = None
    # The tiny profile's U-Net level widths (multiples of 8: 8 norm groups); None: (32, 64).
    widths: tuple[int, int] | None = None
    # The tiny profile's pixel-unshuffle factor (latent = resolution / factor); None: 4.
    pixel_downscale: Literal[2, 4] | None = None
    # What the denoiser predicts; None: the profile's (tiny: x0 "sample", sd15: epsilon).
    prediction_type: PredictionType | None = None
    # The noise schedule rescaled to zero SNR at the last timestep (sampled trailing).
    zero_terminal_snr: bool | None = None
    # Position codes on the reference features in dual reference fusion (tiny: on).
    reference_positions: bool | None = None
    # Locality bias of dual reference fusion (tiny: on; see durian/models/attention.py).
    reference_locality: bool | None = None
    # Ablation: one ReferenceNet on the channel-concatenated references.
    shared_reference_net: bool | None = None
    # Freeze the reference nets' last up block (sd15: frozen, as with SD weights; tiny: trained).
    freeze_reference_last_up_block: bool | None = None
    # PRNet's cross-attention context (None: the profile's, CLIP for both). dlib / arcface need
    # shards preprocessed with that preprocess.identity_embedder; the model's
    # identity_embed_dim follows (128 / 512), and inference embeds the portrait the same way.
    identity_embedding: IdentityEmbedding | None = None

    @model_validator(mode="after")
    def _tiny_shape_on_tiny_only(self) -> ModelConfig:
        if self.profile != "tiny":
            given = [k for k in TINY_ONLY if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only the tiny profile has them")
        if self.widths is not None and any(w < 8 or w % 8 for w in self.widths):
            raise ValueError(f"widths must be multiples of 8, got {list(self.widths)}")
        return self

    def switches(self) -> dict[str, Any]:
        """The method switches that are set: config overrides of the profile (the identity
        embedding as the width the model's projector takes, None for CLIP's own)."""
        out = {k: getattr(self, k) for k in MODEL_SWITCHES if getattr(self, k) is not None}
        if self.identity_embedding is not None:
            out["identity_embed_dim"] = EMBEDDING_DIMS.get(self.identity_embedding)
        return out


def identity_embedder_of(model_config: Mapping[str, Any]) -> str | None:
    """The face embedder a built model reads (``dlib`` / ``arcface``), from its config's
    ``identity_embed_dim`` (``model.config``); None when it embeds the portrait with CLIP
    itself. The two widths differ, so the width names the embedder."""
    dim = model_config.get("identity_embed_dim")
    if dim is None:
        return None
    for name, width in EMBEDDING_DIMS.items():
        if width == dim:
            return name
    raise ValueError(
        f"the model reads a {dim}-d identity embedding: no embedder gives that width "
        f"({', '.join(f'{k} {v}' for k, v in EMBEDDING_DIMS.items())})"
    )
