"""Temporal module: AnimateDiff-style motion modules attached to DNet.

The container is diffusers' own :class:`~diffusers.MotionAdapter` (temporal self-attention over
the frame axis with sinusoidal frame positions), so diffusers-format AnimateDiff checkpoints
(e.g. ``animatediff-motion-adapter-v1-5-2``) load as they are, and AnimateDiff's original
``.ckpt`` files (``mm_sd_v15_v2.ckpt``) through diffusers' own key converter
(:func:`read_motion_module`).

Placement follows diffusers' ``UNetMotionModel``: one motion module after each (resnet, attention)
layer of a cross-attention block, after each resnet of a plain block, and after each attention of
the mid block. DNet stays a plain ``UNet2DConditionModel``; :class:`TemporalHooks` applies the
motion modules through forward hooks on those layers, and only while enabled (stage 2 and
inference of a stage-2 model). Fresh modules have a zero ``proj_out``, so inserting them leaves
the stage-1 output unchanged.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import MotionAdapter, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint


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


# File forms a published motion module comes in (AnimateDiff's own ``.ckpt``, safetensors ports).
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_PE_SUFFIX = "pos_embed.pe"


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in _TORCH_SUFFIXES:
        raise ValueError(
            f"motion module {path}: expected .safetensors, {', '.join(_TORCH_SUFFIXES)} or a "
            "MotionAdapter folder"
        )
    # Tensors only (no pickled code), onto the CPU whatever device it was saved from.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning-style wrapper of some fine-tuned modules
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"motion module {path} holds no state dict of tensors")
    return state


def read_motion_module(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A motion-module checkpoint as (state dict in ``MotionAdapter``'s names, the
    ``MotionAdapter`` config entries the checkpoint fixes).

    Forms: a diffusers ``MotionAdapter`` folder (``config.json`` + weights), or one file —
    AnimateDiff's original ``.ckpt`` (``…temporal_transformer.…attention_blocks.N…``, read with
    ``weights_only``) or a safetensors file in either naming. Original names go through diffusers'
    own converter, which drops the sinusoidal ``pos_encoder.pe`` buffers (the adapter computes the
    same table); their length sets ``motion_max_seq_length`` and is checked to be that sinusoid.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            adapter = MotionAdapter.from_pretrained(path)
            keys = inspect.signature(MotionAdapter.__init__).parameters
            config = {k: v for k, v in adapter.config.items() if k in keys}
            return adapter.state_dict(), config
        files = sorted(path.glob("*.safetensors")) + sorted(
            f for s in _TORCH_SUFFIXES for f in path.glob(f"*{s}")
        )
        if len(files) != 1:
            raise FileNotFoundError(f"expected one motion-module file in {path}, found {files}")
        path = files[0]
    return motion_module_state(_read_state_file(path), path)


def motion_module_state(
    state: dict[str, torch.Tensor], source: str | os.PathLike = "<state dict>"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`read_motion_module` on a state dict already read (either naming)."""
    mid = any(k.startswith("mid_block.") for k in state)
    config: dict[str, Any] = {"use_motion_mid_block": mid}
    tables = {k: v for k, v in state.items() if k.endswith(("pos_encoder.pe", _PE_SUFFIX))}
    if tables:
        config["motion_max_seq_length"] = int(next(iter(tables.values())).shape[1])
        for k, v in tables.items():
            if v.is_meta:  # shapes only (a key-list check): nothing to compare
                continue
            expected = SinusoidalPositionalEmbedding(v.shape[-1], v.shape[1]).pe
            if v.shape != expected.shape or not torch.allclose(v.float(), expected, atol=1e-4):
                raise ValueError(
                    f"motion module {source}: {k} is not the sinusoidal position table "
                    f"{tuple(expected.shape)} (learnt position encodings are not supported)"
                )
    if any("temporal_transformer." in k for k in state):
        state = convert_animatediff_checkpoint_to_diffusers(state)
    return state, config


def load_temporal_state(
    adapter: MotionAdapter, state: dict[str, torch.Tensor], source: str | os.PathLike
) -> None:
    """Load ``state`` (:func:`read_motion_module`'s names) strictly into ``adapter``; the
    position tables may be absent (recomputed). Raises ``ValueError`` naming ``source`` and the
    missing, unexpected and mis-shaped keys (typically another U-Net width or table length)."""
    own = adapter.state_dict()
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(_PE_SUFFIX))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"motion module checkpoint {source} does not match the temporal module: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(mis_shaped)} mis-shaped (e.g. {mis_shaped[:3]})"
        )
    tables = {k: v for k, v in own.items() if k.endswith(_PE_SUFFIX) and k not in state}
    adapter.load_state_dict({**tables, **state}, strict=True)


def load_temporal_weights(adapter: MotionAdapter, path: str | os.PathLike) -> None:
    """Load a motion-module checkpoint (any form :func:`read_motion_module` reads)."""
    state, _ = read_motion_module(path)
    load_temporal_state(adapter, state, path)


def _layers_after_which(block: nn.Module) -> list[nn.Module]:
    """The layers of a U-Net block after which AnimateDiff inserts its motion modules."""
    attentions = getattr(block, "attentions", None)
    return list(attentions) if attentions is not None and len(attentions) else list(block.resnets)


class TemporalHooks:
    """Applies a ``MotionAdapter``'s modules to a ``UNet2DConditionModel`` through forward hooks."""

    def __init__(self, unet: UNet2DConditionModel, adapter: MotionAdapter) -> None:
        self.enabled = False
        self.num_frames = 1
        # Recompute the motion modules in backward (gradient checkpointing): they run in hooks,
        # outside the U-Net blocks' own checkpointing, and at 24 frames their activations
        # dominate stage 2's memory.
        self.checkpointing = False
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

    def _run(self, motion_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(motion_module, x, num_frames=self.num_frames, use_reentrant=False)
        return motion_module(x, num_frames=self.num_frames)

    def _hook(self, motion_module: nn.Module):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not self.enabled:
                return output
            if isinstance(output, torch.Tensor):
                return self._run(motion_module, output)
            if isinstance(output, tuple):  # Transformer2DModel with return_dict=False
                return (self._run(motion_module, output[0]), *output[1:])
            output.sample = self._run(motion_module, output.sample)
            return output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
