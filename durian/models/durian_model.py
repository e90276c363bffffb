"""The Durian network: ARNet, PRNet, DNet with dual reference fusion, keypoint guider, temporal
module, encoders and the latent space, as one diffusers ``ModelMixin`` / ``ConfigMixin``.

API (what the trainer and the pipeline call)::

    model = profiles.build_model("tiny", resolution=64)       # or DurianModel.from_pretrained
    model.set_stage(1)                                        # 1: images; 2: temporal module only
    params = model.trainable_parameters(1)
    refs = model.encode_references(identity_ref, identity_mask, attribute_ref, attribute_mask)
    kp = model.encode_keypoints(keypoints)                     # (B·F, 3, H, W) in [0, 1]
    eps = model.denoise(noisy, t, refs, kp, num_frames=F, drop_identity=…, drop_attribute=…)
    eps = model(noisy, t, identity_ref=…, …)                   # the three calls above in one
    model.save_pretrained(dir); DurianModel.from_pretrained(dir)   # safetensors + config.json
    # a whole pipeline folder (+ scheduler): durian.pipelines.pipeline_durian.save_durian_pipeline

Shapes: images are (B, 3, H, W) in [-1, 1] (references already masked), masks (B, 1, H, W) with
1 = the masked region; frames are flattened batch-major to B·F. ``attribute_ref`` may be
(B, 3, H, W) (one attribute), (B, N, 3, H, W) (composition of N attributes, one pass), or a list of
two such tensors (interpolation branches, blended by ``alpha`` in ``denoise``).

Latent space: with a VAE config, the SD ``AutoencoderKL`` (frozen, ``scaling_factor`` applied);
without one (tiny profile) **pixel space**: the "latent" is the image in [-1, 1] rearranged by
``pixel_unshuffle(pixel_downscale)`` — lossless and untrained, it only keeps token counts small
(64 px → 48 × 16 × 16). No pretrained VAE exists offline, so this is the honest choice.

Parameterisation: ``prediction_type`` is what DNet predicts: ``epsilon`` (the paper, SD 1.5),
``v_prediction`` or ``sample`` (x0, the tiny pixel-space profile). In pixel space a 4×4×3 patch
is 48 channels, more than the tiny U-Net's 32: ε cannot be represented at all, and an imperfect
ε or v leaves pixel noise in every DDIM step, while an x0 prediction is an image at every step
(the trials that chose x0 are in ``docs/results.md``). ``zero_terminal_snr`` rescales the noise
schedule so that the last timestep is pure noise (Lin et al. 2024), sampled with trailing
timesteps: SD's schedule leaves 7% of the image (√ᾱ ≈ 0.07) in its last step, and a model
trained on it copies some of the sampling noise into its output. Off by default: it trades
attribute-region PSNR for whole-frame SSIM (``docs/results.md``). The first scheduler of a new
model takes these settings from here (``profiles.scheduler_settings``); a saved pipeline folder
then carries its own ``scheduler/scheduler_config.json``.

Ablation ``shared_reference_net=True`` (the paper's "one shared ReferenceNet on a
channel-concatenated input", method note §2): a single reference U-Net, held as ``arnet``
(``prnet`` is None), reads the identity and attribute inputs concatenated along channels and
cross-attends to both token sets; its features form one reference stream in DNet, dropped when
either reference is dropped. One attribute only (no composition or interpolation).

``reference_positions=True`` (the tiny profile): position codes on the queries and keys of
dual reference fusion; ``reference_locality=True``: the 2-D ALiBi locality bias on its logits
(both in :mod:`durian.models.attention`); off for SD 1.5 weights.

Reference nets run at timestep 0 and once per generation; only their recorded self-attention
inputs are used (their U-Net output is discarded). Reference mask channel: the mask, resized to
the latent size by area averaging, concatenated after the latent (``in_channels`` = latent + 1).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from durian.models.attention import (
    DualReferenceAttnProcessor,
    FusionInputs,
    PlainAttnProcessor,
    ReferenceBank,
    ReferenceWriteProcessor,
    self_attention_names,
)
from durian.models.encoders import IdentityProjector, ImageEmbedder
from durian.models.keypoint_guider import ConvInResidualHook, KeypointGuider
from durian.models.temporal import (
    TemporalHooks,
    build_temporal_module,
    load_temporal_state,
    read_motion_module,
    temporal_module_config,
)

# Images per VAE call (encode and decode).
VAE_CHUNK = 8
# The frozen pretrained parts a pipeline folder keeps as components of their own, and where
# their weights sit in the model's state dict.
FROZEN_PREFIXES = {"vae": "vae.", "image_encoder": "image_encoder.clip."}
T = TypeVar("T")

# Parameters of a reference net that never receive a gradient: nothing after the last recorded
# self-attention input (the ``norm1`` output of the last transformer block) is used.
_REFERENCE_TAIL_PREFIXES = ("conv_norm_out.", "conv_out.")


@dataclass
class References:
    """Reference features of one generation (batch B), computed once and reused.

    ``portrait``: processor name → (B, L, C) PRNet self-attention inputs.
    ``attributes``: one dict per branch, name → (B, N·L, C) ARNet inputs (N attributes
    concatenated along the token axis).
    ``attribute_embeddings``: one (B, N·T, C) cross-attention tensor per branch (``φ_attr``).
    """

    portrait: dict[str, torch.Tensor]
    attributes: list[dict[str, torch.Tensor]]
    attribute_embeddings: list[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.attribute_embeddings[0].shape[0])

    def repeat(self, n: int) -> References:
        """Batch repeated n times (e.g. [unconditional; conditional] for CFG)."""

        def rep(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x] * n)

        return References(
            portrait={k: rep(v) for k, v in self.portrait.items()},
            attributes=[{k: rep(v) for k, v in a.items()} for a in self.attributes],
            attribute_embeddings=[rep(e) for e in self.attribute_embeddings],
        )


# Set while a loader builds a model whose large parts it is about to fill from files.
_EMPTY_PARTS: ContextVar[frozenset[str]] = ContextVar("durian_empty_parts", default=frozenset())
PRETRAINED_PARTS = ("unet", "vae", "image_encoder")


@contextmanager
def pretrained_parts_empty(parts: Iterable[str] = PRETRAINED_PARTS) -> Iterator[None]:
    """Build the named large parts (the three U-Nets, the VAE, the CLIP tower) with their
    parameters on the meta device: no random initialisation and no host memory for weights a
    loader then assigns (``load_state_dict(..., assign=True)``); the small parts (keypoint
    guider, projections, temporal module) are initialised as usual."""
    unknown = set(parts) - set(PRETRAINED_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}: {PRETRAINED_PARTS}")
    token = _EMPTY_PARTS.set(frozenset(parts))
    try:
        yield
    finally:
        _EMPTY_PARTS.reset(token)


def _part(name: str, build: Callable[[], T]) -> T:
    if name not in _EMPTY_PARTS.get():
        return build()
    with init_empty_weights(include_buffers=False):  # buffers (e.g. CLIP's positions) stay real
        return build()


@contextmanager
def _diffusers_quiet() -> Iterator[None]:
    """diffusers' model loader at error level for one call."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _clean_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _as_branches(x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """Attribute input → list of (B, N, C, H, W) branches."""
    branches = x if isinstance(x, list | tuple) else [x]
    return [b[:, None] if b.ndim == 4 else b for b in branches]


def _per_frame(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    return x if num_frames == 1 else x.repeat_interleave(num_frames, dim=0)


class DurianModel(ModelMixin, ConfigMixin):
    """See the module docstring. Built from configs only; profiles fill them in."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        unet_config: dict[str, Any],
        image_encoder_config: dict[str, Any],
        resolution: int = 64,
        vae_config: dict[str, Any] | None = None,
        pixel_downscale: int = 4,
        identity_embed_dim: int | None = None,
        identity_tokens: int = 4,
        keypoint_guider_channels: tuple[int, ...] = (16, 32, 96, 256),
        train_image_encoder: bool = False,
        temporal_config: dict[str, Any] | None = None,
        shared_reference_net: bool = False,
        prediction_type: str = "epsilon",
        reference_positions: bool = False,
        zero_terminal_snr: bool = False,
        freeze_reference_last_up_block: bool = True,
        reference_locality: bool = False,
        noise_schedule: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                "prediction_type must be epsilon, v_prediction or sample, "
                f"got {prediction_type!r}"
            )
        unet_cfg = _clean_config(unet_config)
        if vae_config is not None:
            self.vae = _part("vae", lambda: AutoencoderKL.from_config(_clean_config(vae_config)))
            self.vae.requires_grad_(False)
            latent_channels = self.vae.config.latent_channels
            downscale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        else:
            self.vae = None
            latent_channels, downscale = 3 * pixel_downscale**2, pixel_downscale
        self.latent_channels, self.latent_downscale = latent_channels, downscale
        if unet_cfg["in_channels"] != latent_channels:
            raise ValueError(
                f"unet in_channels {unet_cfg['in_channels']} != latent channels {latent_channels}"
            )
        cross_dim = unet_cfg["cross_attention_dim"]
        def unet(config: dict[str, Any]) -> UNet2DConditionModel:
            return _part("unet", lambda: UNet2DConditionModel.from_config(config))

        self.dnet = unet(unet_cfg)
        reference_in = latent_channels + 1  # + mask channel
        if shared_reference_net:  # ablation: identity ‖ attribute inputs, one net
            self.arnet = unet({**unet_cfg, "in_channels": 2 * reference_in})
            self.prnet = None
        else:
            self.arnet = unet({**unet_cfg, "in_channels": reference_in})
            self.prnet = unet({**unet_cfg, "in_channels": reference_in})
        clip = _part(
            "image_encoder",
            lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**image_encoder_config)),
        )
        self.image_encoder = ImageEmbedder(clip, cross_dim)
        self.identity_projector = IdentityProjector(
            identity_embed_dim or self.image_encoder.embed_dim, cross_dim, identity_tokens
        )
        self.keypoint_guider = KeypointGuider(
            unet_cfg["block_out_channels"][0], tuple(keypoint_guider_channels)
        )
        if self.keypoint_guider.downscale != downscale:
            raise ValueError(
                f"keypoint guider downscales {self.keypoint_guider.downscale}x but the latent "
                f"space {downscale}x: use {int(torch.log2(torch.tensor(downscale))) + 1} widths"
            )
        self.temporal = build_temporal_module(temporal_config) if temporal_config else None
        self._frozen_missing: set[str] = set()  # frozen components saved apart, not attached
        self._install_processors()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        vae: AutoencoderKL | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        **kwargs: Any,
    ):
        """ModelMixin's loader, then every tensor copied into its own allocation: safetensors
        tensors are views at arbitrary file offsets and BLAS picks other kernels for unaligned
        data, which would make a reloaded model differ from the saved one in the last bits.

        A folder saved without its frozen components (``model/`` of a pipeline folder, which
        keeps them in ``vae/`` and ``image_encoder/``) loads with those parts empty until
        :meth:`attach_frozen` fills them (the pipeline does; ``vae`` / ``image_encoder`` here
        do it at once). Any other missing weight is an error naming the folder."""
        kwargs["output_loading_info"] = True
        with _diffusers_quiet():  # its "newly initialized" warning is wrong for frozen parts
            model, info = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        missing = set(info["missing_keys"])
        model._frozen_missing = {  # parts saved apart: every one of their weights is missing
            name for name, module in model.frozen_components().items()
            if {FROZEN_PREFIXES[name] + k for k in module.state_dict()} <= missing
        }  # fmt: skip
        apart = tuple(FROZEN_PREFIXES[name] for name in model._frozen_missing)
        unexplained = sorted(k for k in missing if not k.startswith(apart))
        if unexplained:
            raise ValueError(
                f"{pretrained_model_name_or_path}: {len(unexplained)} weights missing, e.g. "
                f"{unexplained[:3]}"
            )
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.data = t.data.clone()
        model.attach_frozen(vae=vae, image_encoder=image_encoder)
        return model

    # ------------------------------------------------------------------ frozen components
    def frozen_components(self) -> dict[str, nn.Module]:
        """The frozen pretrained parts, by pipeline component name: the VAE (when the model
        has one) and the CLIP tower (unless the model trains it). A pipeline folder keeps them
        in ``vae/`` and ``image_encoder/``, never in ``model/``, so they can be swapped, and
        stored once however many models share them."""
        parts: dict[str, nn.Module] = {}
        if self.vae is not None:
            parts["vae"] = self.vae
        if not self.config.train_image_encoder:
            parts["image_encoder"] = self.image_encoder.clip
        return parts

    def attach_frozen(
        self,
        vae: AutoencoderKL | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ) -> None:
        """Put frozen components in place (the pipeline's, or swapped ones); each must have the
        shapes the rest of the model was trained with."""
        if vae is not None:
            if self.vae is None:
                raise ValueError("this model works in pixel space: it takes no VAE")
            if vae.config.latent_channels != self.latent_channels or 2 ** (
                len(vae.config.block_out_channels) - 1
            ) != self.latent_downscale:
                raise ValueError(
                    f"the VAE's latent space ({vae.config.latent_channels} channels) is not the "
                    f"model's ({self.latent_channels} channels, {self.latent_downscale}x)"
                )
            self.vae = vae.requires_grad_(False)
            self._frozen_missing.discard("vae")
        if image_encoder is not None:
            if "image_encoder" not in self.frozen_components():
                raise ValueError("this model trains its image encoder: it is part of model/")
            if image_encoder.config.projection_dim != self.image_encoder.embed_dim:
                raise ValueError(
                    f"the image encoder embeds to {image_encoder.config.projection_dim}, the "
                    f"model was trained on {self.image_encoder.embed_dim}"
                )
            self.image_encoder.clip = image_encoder.requires_grad_(False)
            self._frozen_missing.discard("image_encoder")

    @contextmanager
    def frozen_left_out(self) -> Iterator[dict[str, nn.Module]]:
        """The model without its frozen components for the duration (what ``model/`` of a
        pipeline folder saves); yields them."""
        parts = self.frozen_components()
        if "vae" in parts:
            self.vae = None
        if "image_encoder" in parts:
            self.image_encoder.clip = None
        try:
            yield parts
        finally:
            if "vae" in parts:
                self.vae = parts["vae"]
            if "image_encoder" in parts:
                self.image_encoder.clip = parts["image_encoder"]

    def _require(self, name: str) -> None:
        if name in self._frozen_missing:
            raise RuntimeError(
                f"this model was loaded without its {name} (a pipeline folder keeps it in "
                f"{name}/): load the folder with DurianPipeline.from_pretrained, or pass "
                f"{name}= to DurianModel.from_pretrained"
            )

    @property
    def reference_nets(self) -> list[UNet2DConditionModel]:
        """ARNet and PRNet (one net with ``shared_reference_net``)."""
        return [n for n in (self.arnet, self.prnet) if n is not None]

    def offload_groups(self) -> dict[str, list[nn.Module]]:
        """The parts each inference phase runs, by phase: ``references`` (encode_references:
        VAE encoder, image encoder, identity projector, ARNet, PRNet), ``denoise`` (DNet, the
        keypoint guider, the temporal module) and ``decode`` (the VAE). With model CPU offload
        only one phase's parts are on the accelerator: the reference nets, two of the three
        U-Nets, are back on the CPU for the whole denoising loop."""
        vae = [self.vae] if self.vae is not None else []
        temporal = [self.temporal] if self.temporal is not None else []
        return {
            "references": [*vae, self.image_encoder, self.identity_projector,
                           *self.reference_nets],
            "denoise": [self.dnet, self.keypoint_guider, *temporal],
            "decode": vae,
        }  # fmt: skip

    def _install_processors(self) -> None:
        names = list(self.dnet.attn_processors)
        self.reference_names = self_attention_names(names)
        for net in self.reference_nets:
            if list(net.attn_processors) != names:
                raise ValueError("reference nets and DNet must share one structure")
            net.set_attn_processor(
                {
                    n: ReferenceWriteProcessor(n)
                    if n in self.reference_names
                    else PlainAttnProcessor()
                    for n in names
                }
            )
        positions = bool(self.config.reference_positions)
        locality = bool(self.config.reference_locality)
        self.dnet.set_attn_processor(
            {
                n: DualReferenceAttnProcessor(n, positions, locality)
                if n in self.reference_names
                else PlainAttnProcessor()
                for n in names
            }
        )
        self._keypoint_hook = ConvInResidualHook()
        self._keypoint_hook.register(self.dnet.conv_in)
        self._temporal_hooks = (
            TemporalHooks(self.dnet, self.temporal) if self.temporal is not None else None
        )
        if self._temporal_hooks is not None:
            self._temporal_hooks.enabled = True  # a saved stage-2 model animates on load

    def add_temporal_module(
        self,
        config: dict[str, Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        """Insert (or replace) the temporal module; optionally load a motion-module checkpoint
        (any form :func:`~durian.models.temporal.read_motion_module` reads; the table length
        and mid block it fixes shape the module when ``config`` is not given)."""
        unet_cfg = _clean_config(self.config.unet_config)
        state, fixed = read_motion_module(checkpoint) if checkpoint is not None else (None, {})
        if config is None:
            c0 = unet_cfg["block_out_channels"][0]
            heads = min(8, max(1, c0 // 8))
            config = {**temporal_module_config(unet_cfg, num_attention_heads=heads), **fixed}
        module = build_temporal_module(config)
        if state is not None:
            load_temporal_state(module, state, checkpoint)
        checkpointing = False
        if self._temporal_hooks is not None:
            checkpointing = self._temporal_hooks.checkpointing
            self._temporal_hooks.remove()
        # The U-Net's device and dtype (a frozen VAE may be kept in half precision);
        # nn.Module.to: ModelMixin.to warns about fp32-kept modules the adapter does not have.
        self.temporal = nn.Module.to(module, device=self.dnet.device, dtype=self.dnet.dtype)
        self.register_to_config(temporal_config=dict(config))
        self._temporal_hooks = TemporalHooks(self.dnet, self.temporal)
        self._temporal_hooks.checkpointing = checkpointing
        self._temporal_hooks.enabled = True

    @property
    def temporal_enabled(self) -> bool:
        return self._temporal_hooks is not None and self._temporal_hooks.enabled

    # ------------------------------------------------------------------ training stages
    def reference_frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of a reference net that stage 1 does not train.

        Always the unused tail: the last recorded transformer block past its ``norm1``, its
        ``proj_out``, and the output convolutions. With ``freeze_reference_last_up_block``
        ([base], Moore-AnimateAnyone with SD weights) the whole last up block too, although two
        or more recorded self-attention inputs come from it: harmless for pretrained SD layers,
        but a randomly initialised profile would feed DNet's finest fusion points frozen random
        features, so the tiny profile turns it off."""
        # The up path runs last; in it, the highest (block, attention, transformer) indices.
        up = [n for n in self.reference_names if n.startswith("up_blocks.")]
        last = max(up, key=lambda n: [int(x) for x in n.split(".") if x.isdigit()])
        last = last.removesuffix("attn1.processor")  # "up_blocks.L.attentions.A.…blocks.T."
        transformer = last.split("transformer_blocks.")[0]
        block = ("attn1.", "norm2.", "attn2.", "norm3.", "ff.")
        frozen = (*_REFERENCE_TAIL_PREFIXES, f"{transformer}proj_out.", *(last + b for b in block))
        if self.config.freeze_reference_last_up_block:
            frozen += (f"up_blocks.{len(self.dnet.up_blocks) - 1}.",)
        return frozen

    def _reference_trainable(self, net: nn.Module) -> list[nn.Parameter]:
        frozen = self.reference_frozen_prefixes()
        return [p for n, p in net.named_parameters() if not n.startswith(frozen)]

    def trainable_parameters(self, stage: int) -> list[nn.Parameter]:
        """Stage 1: ARNet, PRNet (less their unused tail), DNet, keypoint guider, encoders'
        trainable parts. Stage 2: the temporal module only."""
        if stage == 1:
            params = [p for net in self.reference_nets for p in self._reference_trainable(net)]
            params += list(self.dnet.parameters()) + list(self.keypoint_guider.parameters())
            params += list(self.identity_projector.parameters())
            params += list(self.image_encoder.proj.parameters())
            if self.config.train_image_encoder:
                params += list(self.image_encoder.clip.parameters())
            return params
        if stage == 2:
            if self.temporal is None:
                raise ValueError("stage 2 needs a temporal module: call set_stage(2) first")
            return list(self.temporal.parameters())
        raise ValueError(f"stage must be 1 or 2, got {stage}")

    def set_stage(self, stage: int) -> None:
        """Freeze everything but the stage's parameters; stage 2 inserts the temporal module
        (zero-initialised) when absent, stage 1 bypasses it."""
        if stage == 2 and self.temporal is None:
            self.add_temporal_module()
        self.requires_grad_(False)
        for p in self.trainable_parameters(stage):
            p.requires_grad_(True)
        if self._temporal_hooks is not None:
            self._temporal_hooks.enabled = stage == 2

    def enable_gradient_checkpointing(self, *args: Any, **kwargs: Any) -> None:
        for net in (*self.reference_nets, self.dnet):
            net.enable_gradient_checkpointing()
        if self._temporal_hooks is not None:
            self._temporal_hooks.checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for net in (*self.reference_nets, self.dnet):
            net.disable_gradient_checkpointing()
        if self._temporal_hooks is not None:
            self._temporal_hooks.checkpointing = False

    # ------------------------------------------------------------------ latent space
    def encode_images(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = False,
        chunk: int = VAE_CHUNK,
    ) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] → latents (N, C, H/d, W/d), ``chunk`` images per VAE call
        (the VAE's activations at 512² are ~1 GB per image: 96 frames at once would not fit)."""
        if self.vae is None:
            return F.pixel_unshuffle(images, self.latent_downscale)
        self._require("vae")
        out = []
        for part in images.split(chunk):
            dist = self.vae.encode(part.to(self.vae.dtype)).latent_dist
            out.append(dist.sample(generator) if sample else dist.mode())
        return torch.cat(out) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor, chunk: int = VAE_CHUNK) -> torch.Tensor:
        """Latents → images in [-1, 1] (not clamped), ``chunk`` latents per VAE call."""
        if self.vae is None:
            return F.pixel_shuffle(latents, self.latent_downscale)
        self._require("vae")
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        return torch.cat([self.vae.decode(part).sample for part in z.split(chunk)])

    def _reference_input(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        latents = self.encode_images(images)
        m = F.interpolate(masks.to(latents.dtype), size=latents.shape[-2:], mode="area")
        return torch.cat([latents, m], dim=1)

    # ------------------------------------------------------------------ references (once)
    def _run_reference_net(
        self, net: UNet2DConditionModel, inputs: torch.Tensor, context: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        bank = ReferenceBank()  # filled by the writers of this call
        t = torch.zeros(inputs.shape[0], device=inputs.device, dtype=torch.long)
        net(
            inputs,
            t,
            encoder_hidden_states=context,
            cross_attention_kwargs={"reference_bank": bank},
            return_dict=False,
        )  # output unused
        missing = set(self.reference_names) - set(bank.features)
        if missing:
            raise RuntimeError(f"reference net wrote no features for {sorted(missing)[:3]}")
        return bank.features

    def encode_references(
        self,
        identity_ref: torch.Tensor,
        identity_mask: torch.Tensor,
        attribute_ref: torch.Tensor | list[torch.Tensor],
        attribute_mask: torch.Tensor | list[torch.Tensor],
        identity_embedding: torch.Tensor | None = None,
    ) -> References:
        """One PRNet and one ARNet call for every attribute image of every branch."""
        images, masks = _as_branches(attribute_ref), _as_branches(attribute_mask)
        self._require("image_encoder")
        if self.config.shared_reference_net:
            return self._encode_shared(identity_ref, identity_mask, images, masks,
                                       identity_embedding)
        b = identity_ref.shape[0]
        sizes = [x.shape[1] for x in images]
        flat_images = torch.cat([x.flatten(0, 1) for x in images])  # (b, n) batch-major
        flat_masks = torch.cat([m.flatten(0, 1) for m in masks])
        attr_tokens = self.image_encoder(flat_images)  # CLIP sees the masked attribute
        feats = self._run_reference_net(
            self.arnet, self._reference_input(flat_images, flat_masks), attr_tokens
        )
        attributes, embeddings, start = [], [], 0
        for n in sizes:
            sl = slice(start, start + b * n)
            attributes.append({k: v[sl].reshape(b, -1, v.shape[-1]) for k, v in feats.items()})
            embeddings.append(attr_tokens[sl].reshape(b, -1, attr_tokens.shape[-1]))
            start += b * n

        portrait = self._run_reference_net(
            self.prnet,
            self._reference_input(identity_ref, identity_mask),
            self._identity_tokens(identity_ref, identity_embedding),
        )
        return References(portrait, attributes, embeddings)

    def _identity_tokens(
        self, identity_ref: torch.Tensor, identity_embedding: torch.Tensor | None
    ) -> torch.Tensor:
        """PRNet's cross-attention context ``φ_port``: the given identity embedding (ArcFace /
        dlib), else the image encoder's embedding of the identity reference, projected."""
        if identity_embedding is None:
            identity_embedding = self.image_encoder.embed(identity_ref)
        return self.identity_projector(identity_embedding.to(self.dtype))

    def _encode_shared(
        self,
        identity_ref: torch.Tensor,
        identity_mask: torch.Tensor,
        images: list[torch.Tensor],
        masks: list[torch.Tensor],
        identity_embedding: torch.Tensor | None,
    ) -> References:
        """The shared-ReferenceNet ablation: one call on the channel-concatenated inputs; its
        features go in ``portrait`` and no attribute stream exists."""
        if len(images) != 1 or images[0].shape[1] != 1:
            raise ValueError("a shared ReferenceNet takes exactly one attribute image")
        attr_img, attr_mask = images[0][:, 0], masks[0][:, 0]
        attr_tokens = self.image_encoder(attr_img)
        id_tokens = self._identity_tokens(identity_ref, identity_embedding)
        inputs = torch.cat(
            [
                self._reference_input(identity_ref, identity_mask),
                self._reference_input(attr_img, attr_mask),
            ],
            dim=1,
        )
        feats = self._run_reference_net(
            self.arnet, inputs, torch.cat([attr_tokens, id_tokens], dim=1)
        )
        return References(feats, [], [attr_tokens])

    def encode_keypoints(self, keypoints: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) rendered landmarks in [0, 1] → features added after DNet's conv_in."""
        return self.keypoint_guider(keypoints.to(self.dtype))

    # ------------------------------------------------------------------ denoising
    def denoise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        references: References,
        keypoint_features: torch.Tensor | None = None,
        num_frames: int = 1,
        drop_identity: torch.Tensor | None = None,
        drop_attribute: torch.Tensor | None = None,
        alpha: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """DNet prediction for (B·F, C, h, w) latents.

        ``drop_identity`` / ``drop_attribute``: (B,) bool; a dropped stream's tokens are absent
        from that sample's self-attention (and a dropped attribute zeroes its ``φ_attr``).
        ``alpha``: interpolation weight of the second attribute branch, scalar or (B·F,).
        """
        bf = sample.shape[0]
        if bf % num_frames or bf // num_frames != references.batch_size:
            raise ValueError(
                f"sample batch {bf} is not references batch {references.batch_size} × {num_frames}"
            )
        device = sample.device
        n_branches = len(references.attributes)
        alpha_t = None
        if n_branches == 2:
            if alpha is None:
                raise ValueError("two attribute branches need alpha")
            alpha_t = torch.as_tensor(alpha, device=device, dtype=sample.dtype)
            alpha_t = alpha_t.expand(bf) if alpha_t.ndim == 0 else alpha_t
            if alpha_t.shape != (bf,):
                raise ValueError(f"alpha must be a scalar or have {bf} entries")
        elif n_branches != 1 and not (n_branches == 0 and self.config.shared_reference_net):
            raise ValueError("one attribute branch, or two for interpolation")

        # Cross-attention context φ_attr per frame (interpolated like the attention outputs).
        embs = [_per_frame(e, num_frames) for e in references.attribute_embeddings]
        if alpha_t is not None:
            if embs[0].shape != embs[1].shape:
                raise ValueError("interpolated branches need the same number of attributes")
            a = alpha_t[:, None, None]
            context = (1 - a) * embs[0] + a * embs[1]
        else:
            context = embs[0]
        keep_attribute = None if drop_attribute is None else ~drop_attribute.to(device, torch.bool)
        keep_identity = None if drop_identity is None else ~drop_identity.to(device, torch.bool)
        if keep_attribute is not None:  # unconditional attribute: zero embedding
            context = context * _per_frame(keep_attribute, num_frames)[:, None, None].to(context)

        if self.config.shared_reference_net and keep_attribute is not None:
            # One stream carries both references: gone when either is dropped.
            both = keep_attribute if keep_identity is None else keep_identity & keep_attribute
            keep_identity = both
        fusion = FusionInputs(
            num_frames=num_frames,
            portrait=references.portrait,
            attributes=references.attributes,
            keep_identity=keep_identity,
            keep_attribute=keep_attribute,
            alpha=alpha_t,
            aspect=sample.shape[-1] / sample.shape[-2],
        )
        if self._temporal_hooks is not None:
            self._temporal_hooks.num_frames = num_frames
        t = torch.as_tensor(timestep, device=device)
        t = t.expand(bf) if t.ndim == 0 else t
        if t.shape[0] != bf:
            t = _per_frame(t, num_frames)
        with self._keypoint_hook.adding(keypoint_features):
            return self.dnet(
                sample,
                t,
                encoder_hidden_states=context,
                cross_attention_kwargs={"reference_fusion": fusion},
                return_dict=False,
            )[0]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        identity_ref: torch.Tensor,
        identity_mask: torch.Tensor,
        attribute_ref: torch.Tensor | list[torch.Tensor],
        attribute_mask: torch.Tensor | list[torch.Tensor],
        keypoints: torch.Tensor,
        num_frames: int = 1,
        drop_identity: torch.Tensor | None = None,
        drop_attribute: torch.Tensor | None = None,
        identity_embedding: torch.Tensor | None = None,
        alpha: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Training path: references, keypoint features and DNet in one call."""
        refs = self.encode_references(
            identity_ref, identity_mask, attribute_ref, attribute_mask, identity_embedding
        )
        return self.denoise(
            sample,
            timestep,
            refs,
            self.encode_keypoints(keypoints),
            num_frames=num_frames,
            drop_identity=drop_identity,
            drop_attribute=drop_attribute,
            alpha=alpha,
        )
