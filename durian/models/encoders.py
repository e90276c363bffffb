"""Image and identity encoders: what ARNet, PRNet and DNet cross-attend to.

* :class:`ImageEmbedder` — ``φ_attr``: a CLIP image embedding (``CLIPVisionModelWithProjection``)
  of the *masked* attribute image, as one cross-attention token (the SD image-variation
  convention). The sd15 profile loads a pretrained CLIP from a local folder and freezes it; the
  tiny profile uses a small random CLIP config trained with the rest.
* :class:`IdentityProjector` — ``φ_port``: an identity embedding (B, D) turned into
  ``num_tokens`` cross-attention tokens by a small MLP (IP-Adapter style). The embedding is either
  given by the caller (ArcFace / dlib, computed outside) or, by default offline, the CLIP image
  embedding of the masked portrait [ours].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The CLIPVisionConfig fields that define the architecture (all a checkpoint config needs).
CLIP_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


def clip_config_dict(config: CLIPVisionConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in CLIP_CONFIG_KEYS}


class ImageEmbedder(nn.Module):
    """Images in [-1, 1] → CLIP ``image_embeds`` (B, D) / one cross-attention token (B, 1, C).
    ``clip``: the tower, or its config (a random initialisation)."""

    def __init__(
        self, clip: CLIPVisionModelWithProjection | dict[str, Any], cross_attention_dim: int
    ) -> None:
        super().__init__()
        if isinstance(clip, dict):
            clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip))
        self.clip = clip
        dim = self.clip.config.projection_dim
        # SD image-variation U-Nets take the 768-d embedding directly; other widths get a Linear.
        self.proj = (
            nn.Identity() if dim == cross_attention_dim else nn.Linear(dim, cross_attention_dim)
        )
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        size = self.clip.config.image_size
        x = (images.float() + 1) / 2
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
        x = ((x - self.mean) / self.std).to(self.clip.dtype)
        return self.clip(pixel_values=x).image_embeds

    def tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(embeds)[:, None]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.embed(images))


class IdentityProjector(nn.Module):
    """(B, D) identity embedding → (B, num_tokens, cross_attention_dim) tokens."""

    def __init__(self, embed_dim: int, cross_attention_dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, embed_dim * 2),
            nn.GELU(),
            nn.Linear(embed_dim * 2, cross_attention_dim * num_tokens),
        )
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        b = embeds.shape[0]
        return self.norm(self.mlp(embeds).view(b, self.num_tokens, -1))
