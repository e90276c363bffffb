"""Temporal module: AnimateDiff-style motion modules attached to DNet.

The container is diffusers' own :class:`~diffusers.MotionAdapter` (temporal self-attention over
the frame axis with sinusoidal frame positions), so diffusers-format AnimateDiff checkpoints
(e.g. ``animatediff-motion-adapter-v1-5-2``) load as they are, and original-format ones
(``…temporal_transformer.attention_blocks.0…``) after a key rename; both from safetensors only.

Placement follows diffusers' ``UNetMotionModel``: one motion module after each (resnet, attention)
layer of a cross-attention block, after each resnet of a plain block, and after each attention of
the mid block. DNet stays a plain ``UNet2DConditionModel``; :class:`TemporalHooks` applies the
motion modules through forward hooks on those layers, and only while enabled (stage 2 and
inference of a stage-2 model). Fresh modules have a zero ``proj_out``, so inserting them leaves
the stage-1 output unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from safetensors.torch import load_file
from torch import nn

_ORIGINAL_KEY_RENAMES = (
    ("temporal_transformer.", ""),
    ("attention_blocks.0", "attn1"),
    ("attention_blocks.1", "attn2"),
    ("norms.0", "norm1"),
    ("norms.1", "norm2"),
    ("ff_norm", "norm3"),
    ("pos_encoder", "pos_embed"),
)


def temporal_module_config(
    unet_config: dict[str, Any],
    num_attention_heads: int = 8,
    max_seq_length: int = 32,
    norm_num_groups: int | None = None,
    use_mid_block: bool = True,
) -> dict[str, Any]:
    """``MotionAdapter`` kwargs matching a DNet config (SD 1.5 → AnimateDiff v2 shape)."""
    return {
        "block_out_channels": list(unet_config["block_out_channels"]),
        "motion_layers_per_block": unet_config["layers_per_block"],
        "motion_num_attention_heads": num_attention_heads,
        "motion_norm_num_groups": norm_num_groups or unet_config["norm_num_groups"],
        "motion_max_seq_length": max_seq_length,
        "use_motion_mid_block": use_mid_block,
    }


def build_temporal_module(config: dict[str, Any]) -> MotionAdapter:
    adapter = MotionAdapter(**config)
    for name, module in adapter.named_modules():
        if name.endswith("proj_out") and isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)  # AnimateDiff's zero-initialised output
            nn.init.zeros_(module.bias)
    return adapter


def _convert_original_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not any("temporal_transformer" in k for k in state):
        return state
    out = {}
    for key, value in state.items():
        for old, new in _ORIGINAL_KEY_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def load_temporal_weights(adapter: MotionAdapter, path: str | os.PathLike) -> None:
    """Load a motion-module checkpoint (a safetensors file, or a folder holding one).

    Raises ``ValueError`` naming the missing, unexpected and mis-shaped keys when the checkpoint
    does not match the adapter (typically a different U-Net width or ``max_seq_length``).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"expected one .safetensors file in {path}, found {files}")
        path = files[0]
    if path.suffix != ".safetensors":
        raise ValueError(f"motion module checkpoints are read from safetensors only, got {path}")
    state = _convert_original_keys(load_file(str(path)))
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"motion module checkpoint {path} does not match the temporal module: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mis_shaped)} mis-shaped (e.g. {mis_shaped[:3]})"
        )
    adapter.load_state_dict(state, strict=True)


def _layers_after_which(block: nn.Module) -> list[nn.Module]:
    """The layers of a U-Net block after which AnimateDiff inserts its motion modules."""
    attentions = getattr(block, "attentions", None)
    return list(attentions) if attentions is not None and len(attentions) else list(block.resnets)


class TemporalHooks:
    """Applies a ``MotionAdapter``'s modules to a ``UNet2DConditionModel`` through forward hooks."""

    def __init__(self, unet: UNet2DConditionModel, adapter: MotionAdapter) -> None:
        self.enabled = False
        self.num_frames = 1
        pairs: list[tuple[nn.Module, nn.Module]] = []
        for block, motion in zip(unet.down_blocks, adapter.down_blocks, strict=True):
            pairs += self._pair(block, motion)
        for block, motion in zip(unet.up_blocks, adapter.up_blocks, strict=True):
            pairs += self._pair(block, motion)
        if adapter.mid_block is not None:
            pairs += self._pair(unet.mid_block, adapter.mid_block, attentions_only=True)
        self.handles = [layer.register_forward_hook(self._hook(m)) for layer, m in pairs]

    @staticmethod
    def _pair(
        block: nn.Module, motion: nn.Module, attentions_only: bool = False
    ) -> list[tuple[nn.Module, nn.Module]]:
        layers = list(block.attentions) if attentions_only else _layers_after_which(block)
        modules = list(motion.motion_modules)
        if len(layers) != len(modules):
            raise ValueError(
                f"temporal module has {len(modules)} motion modules for a block with "
                f"{len(layers)} layers: its config does not match DNet"
            )
        return list(zip(layers, modules, strict=True))

    def _hook(self, motion_module: nn.Module):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self.enabled:
                return output
            if isinstance(output, torch.Tensor):
                return motion_module(output, num_frames=self.num_frames)
            if isinstance(output, tuple):  # Transformer2DModel with return_dict=False
                return (motion_module(output[0], num_frames=self.num_frames), *output[1:])
            output.sample = motion_module(output.sample, num_frames=self.num_frames)
            return output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
