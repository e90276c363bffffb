"""A tiny SD-format folder written by diffusers' and transformers' own classes (``sd/unet``,
``sd/vae``, ``clip``), and the sd15-profile model loaded from it: a model with a VAE and a
frozen image encoder, at test sizes."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from durian.models.durian_model import DurianModel
from durian.models.profiles import load_sd15


def tiny_sd_folder(
    root: Path,
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPVisionModelWithProjection]:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(  # 8x downscale like SD's VAE, tiny widths
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    clip = tiny_clip(projection_dim=32, layers=1)
    unet.save_pretrained(root / "sd" / "unet")
    vae.save_pretrained(root / "sd" / "vae")
    clip.save_pretrained(root / "clip")
    return unet, vae, clip


def tiny_clip(projection_dim: int, layers: int) -> CLIPVisionModelWithProjection:
    """A CLIP vision tower with projection at test size (32² images, 8² patches)."""
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=projection_dim)  # fmt: skip
    return CLIPVisionModelWithProjection(config)


def sd_like_model(root: Path, resolution: int = 64) -> DurianModel:
    """The sd15 profile on :func:`tiny_sd_folder` (written under ``root``)."""
    tiny_sd_folder(root)
    return load_sd15(root / "sd", root / "clip", resolution=resolution).eval()
