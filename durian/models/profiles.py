"""Model profiles and the noise scheduler.

* ``tiny``: the same classes with small channels for CPU (tests, the sample pipeline): pixel
  space with a 4× pixel-unshuffle (no pretrained VAE offline), U-Nets (32, 64), a 2-layer CLIP
  vision config trained with the rest, keypoint guider (8, 16, 32), x0 prediction, position
  codes and the locality bias in dual reference fusion, reference nets trained up to their
  last recorded feature. ~3 M parameters.
* ``sd15``: the SD 1.5 shape for ARNet, PRNet and DNet, the SD VAE, a CLIP ViT-L/14 image
  encoder, AnimateDiff-v2-shaped temporal module. :func:`load_sd15` fills them from local
  folders; ``build_model("sd15")`` gives the shape with random weights (benchmarks).

``build_model`` starts ARNet and PRNet as copies of DNet's initial weights (load_sd15 fills all
three from one SD U-Net).

API::

    build_model(profile: str | ModelConfig, **fields) -> DurianModel   # random init
    model_from_config(config: ModelConfig, stage=1) -> DurianModel   # + the local weights
    load_sd15(pretrained_model_path, image_encoder_path=None, motion_module_path=None,
              resolution=512, **overrides) -> DurianModel   # no random init of loaded parts
    load_unet_weights(target: UNet2DConditionModel, state_dict, assign=False)  # widens conv_in
    read_noise_schedule(folder) -> dict   # the schedule entries of <folder>/scheduler/
    make_noise_scheduler(kind="ddpm" | "ddim", **overrides) -> DDPMScheduler | DDIMScheduler
    scheduler_settings(model.config) -> dict  # what the model fixes: parameterisation, schedule
    noise_scheduler_for(model, kind="ddpm")   # SD 1.5's schedule with those settings
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPVisionModelWithProjection

from durian.models.config import TINY_ONLY, ModelConfig
from durian.models.durian_model import DurianModel, pretrained_parts_empty
from durian.models.encoders import clip_config_dict

# SD 1.5 (and SD image-variations) U-Net / VAE / scheduler shapes, as in their config.json files.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
}
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# CLIP ViT-L/14 vision tower with projection (what SD image-variations conditions on).
CLIP_VIT_L14_CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# What a base model's scheduler config contributes: the training noise schedule, not the
# sampler (DDIM is used for sampling whatever class the folder names).
SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
    "steps_offset", "clip_sample", "set_alpha_to_one",
)  # fmt: skip


def tiny_config(
    resolution: int = 64, pixel_downscale: int = 4, widths: tuple[int, int] = (32, 64)
) -> dict[str, Any]:
    """The tiny profile; ``widths`` are the two U-Net levels' channels (multiples of 8)."""
    latent = resolution // pixel_downscale
    channels = 3 * pixel_downscale**2
    unet = {
        "sample_size": latent,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": list(widths),
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,  # SD's legacy name: 4 heads
        "norm_num_groups": 8,
    }
    clip = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "projection_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_channels": 3,
        "image_size": resolution,
        "patch_size": max(8, resolution // 4),
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    steps = pixel_downscale.bit_length() - 1  # one stride-2 step per factor 2 of the latent
    guider = [8 * 2**i for i in range(steps + 1)]
    return {
        "unet_config": unet,
        "image_encoder_config": clip,
        "resolution": resolution,
        "vae_config": None,
        "pixel_downscale": pixel_downscale,
        "identity_tokens": 2,
        "keypoint_guider_channels": guider,
        "train_image_encoder": True,
        "prediction_type": "sample",  # x0: see DurianModel (pixel space, 48 → 32 channels)
        "reference_positions": True,  # random-init features carry no place: see attention.py
        # Two of the four fusion points read the reference nets' last up block: random weights
        # there must learn too (DurianModel.reference_frozen_prefixes).
        "freeze_reference_last_up_block": False,
        "reference_locality": True,  # fusion looked everywhere at once: see attention.py
    }


def sd15_config(resolution: int = 512) -> dict[str, Any]:
    return {
        "unet_config": {**SD15_UNET_CONFIG, "sample_size": resolution // 8},
        "image_encoder_config": dict(CLIP_VIT_L14_CONFIG),
        "resolution": resolution,
        "vae_config": dict(SD15_VAE_CONFIG),
        "identity_tokens": 4,
        "keypoint_guider_channels": [16, 32, 96, 256],
        "train_image_encoder": False,
    }


def build_model(profile: str | ModelConfig = "tiny", **fields: Any) -> DurianModel:
    """A randomly initialised model: a :class:`ModelConfig`, or a profile name and
    ``ModelConfig`` fields (``build_model("tiny", widths=(64, 128))``). The weight folders of
    the config are not read here (see :func:`model_from_config`)."""
    if isinstance(profile, ModelConfig):
        config = ModelConfig.model_validate({**profile.model_dump(), **fields})
    else:
        config = ModelConfig(profile=profile, **fields)
    if config.profile == "tiny":
        shape = {k: getattr(config, k) for k in TINY_ONLY if getattr(config, k) is not None}
        cfg = tiny_config(config.resolution, **shape)
    else:
        cfg = sd15_config(config.resolution)
    cfg.update(config.switches())
    model = DurianModel(**cfg)
    # ARNet and PRNet start as copies of DNet, as all three start from SD 1.5 in the paper: their
    # self-attention inputs then live in the feature space DNet's projections read.
    for net in model.reference_nets:
        load_unet_weights(net, model.dnet.state_dict())
    if config.profile == "sd15":
        model.image_encoder.clip.requires_grad_(False)  # pretrained CLIP stays frozen
    return model


def model_from_config(config: ModelConfig, stage: int = 1) -> DurianModel:
    """The model a :class:`ModelConfig` describes for training ``stage``: SD weights from its
    local folders when ``pretrained`` names one, else the profile's fresh initialisation; the
    motion module is loaded for stage 2 only (stage 1 never runs it)."""
    motion = config.motion_module if stage == 2 else None
    if config.pretrained:
        return load_sd15(
            config.pretrained, config.image_encoder, motion,
            resolution=config.resolution, **config.switches(),
        )  # fmt: skip
    if config.profile == "sd15":
        # Without weights the sd15 shape is only useful for benchmarks; say it loudly.
        warnings.warn("profile sd15 without model.pretrained: random initialisation", stacklevel=2)
    model = build_model(config)
    if motion:
        model.add_temporal_module(checkpoint=motion)
    return model


def load_unet_weights(
    target: UNet2DConditionModel, state_dict: dict[str, torch.Tensor], assign: bool = False
) -> None:
    """Copy SD U-Net weights into ``target`` (``assign``: take the tensors themselves, e.g. into
    a target built on the meta device); a wider ``conv_in`` keeps the SD weights on the first
    channels and gets zero weights on the extra (mask) channel, so at load the mask has no
    effect and the pretrained behaviour is intact."""
    state = dict(state_dict)
    own = target.conv_in.weight
    src = state["conv_in.weight"]
    if src.shape != own.shape:
        if src.shape[0] != own.shape[0] or src.shape[1] > own.shape[1]:
            raise ValueError(f"conv_in {tuple(src.shape)} cannot widen to {tuple(own.shape)}")
        widened = torch.zeros(own.shape, dtype=src.dtype)
        widened[:, : src.shape[1]] = src
        state["conv_in.weight"] = widened
    target.load_state_dict(state, strict=True, assign=assign)


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights as trained in fp32 (fp16 variants are common downloads); the trainer keeps the
    frozen parts in half precision itself when it trains in mixed precision."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def read_noise_schedule(folder: str | os.PathLike) -> dict[str, Any]:
    """The training noise schedule of a pipeline folder's ``scheduler/`` (any diffusers
    scheduler class: PNDM in SD image-variations, DDIM/PNDM in SD 1.5); empty when absent."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return {k: config[k] for k in SCHEDULE_KEYS if config.get(k) is not None}


def _public(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def load_sd15(
    pretrained_model_path: str | os.PathLike,
    image_encoder_path: str | os.PathLike | None = None,
    motion_module_path: str | os.PathLike | None = None,
    resolution: int = 512,
    **overrides: Any,
) -> DurianModel:
    """The sd15 profile from local folders: a diffusers SD folder — SD image-variations
    (``unet/``, ``vae/``, ``image_encoder/`` as ``CLIPVisionModelWithProjection``,
    ``feature_extractor/``, ``scheduler/``) or SD 1.5 with a separate CLIP vision folder
    (``image_encoder_path``, which wins over ``<path>/image_encoder``) — and a motion module
    (:func:`durian.models.temporal.read_motion_module`). Shapes and the noise schedule are taken
    from the folders. The large parts are built empty and take the loaded tensors (no random
    initialisation first): host memory is the weights once, plus ARNet's and PRNet's copies."""
    root = Path(pretrained_model_path)
    if image_encoder_path is None and (root / "image_encoder" / "config.json").is_file():
        image_encoder_path = root / "image_encoder"
    base = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
    cfg = sd15_config(resolution)
    # Without the loaders' bookkeeping (``_name_or_path`` is the folder: not part of the
    # model, and a Path would make its config unsavable).
    cfg["unet_config"] = {**_public(base.config), "sample_size": resolution // 8}
    cfg["vae_config"] = _public(vae.config)
    cfg["noise_schedule"] = read_noise_schedule(root) or None
    clip = None
    if image_encoder_path is not None:
        clip = CLIPVisionModelWithProjection.from_pretrained(image_encoder_path)
        cfg["image_encoder_config"] = clip_config_dict(clip.config)
    cfg.update(overrides)
    parts = ("unet", "vae") + (("image_encoder",) if clip is not None else ())
    with pretrained_parts_empty(parts):
        model = DurianModel(**cfg)
    state = _fp32(base.state_dict())
    del base
    for net in model.reference_nets:
        load_unet_weights(net, {k: v.clone() for k, v in state.items()}, assign=True)
    load_unet_weights(model.dnet, state, assign=True)  # DNet takes the loaded tensors
    model.vae.load_state_dict(_fp32(vae.state_dict()), assign=True)
    if clip is not None:
        model.image_encoder.clip.load_state_dict(_fp32(clip.state_dict()), assign=True)
        model.image_encoder.clip.requires_grad_(bool(cfg["train_image_encoder"]))
    model.vae.requires_grad_(False)
    if motion_module_path is not None:
        model.add_temporal_module(checkpoint=motion_module_path)
    return model


def make_noise_scheduler(kind: str = "ddpm", **overrides: Any) -> DDPMScheduler | DDIMScheduler:
    """SD 1.5's noise schedule (ε-prediction unless overridden) for training (``ddpm``) or
    sampling (``ddim``). For a given model use :func:`noise_scheduler_for`."""
    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
    if kind not in classes:
        raise ValueError(f"unknown scheduler kind {kind!r}: ddpm or ddim")
    cls = classes[kind]
    accepted = inspect.signature(cls.__init__).parameters
    cfg = {**SD15_SCHEDULER_CONFIG, **overrides}
    return cls(**{k: v for k, v in cfg.items() if k in accepted})


def scheduler_settings(config: Any) -> dict[str, Any]:
    """The scheduler entries a model's config fixes: its parameterisation and, with
    ``zero_terminal_snr``, the rescaled schedule and the trailing timesteps it must be sampled
    with (the first sampling step is then the pure-noise timestep it was trained on)."""
    settings: dict[str, Any] = {"prediction_type": config.prediction_type}
    if config.zero_terminal_snr:
        settings |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    return settings


def noise_scheduler_for(model: DurianModel, kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """The schedule the model's base was trained with (its ``noise_schedule``, read from the
    base's ``scheduler/``; SD 1.5's when absent) with the model's own settings
    (:func:`scheduler_settings`)."""
    base = getattr(model.config, "noise_schedule", None) or {}
    return make_noise_scheduler(kind, **{**base, **scheduler_settings(model.config)})
