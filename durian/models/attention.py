"""Reference attention: the "write" processor of the reference nets and the dual reference
fusion ("read") processor of the denoising U-Net.

Both are diffusers attention processors, installed with ``UNet2DConditionModel.set_attn_processor``
on the ``attn1`` (self-attention) of every transformer block; ``attn2`` keeps diffusers' own
``AttnProcessor2_0``. No forward method of diffusers is rewritten.

* :class:`ReferenceWriteProcessor` (ARNet, PRNet) records the ``hidden_states`` arriving at
  ``attn1`` — the ``norm1`` output of the block — into a dict keyed by the processor's name, then
  computes ordinary self-attention.
* :class:`DualReferenceAttnProcessor` (DNet) computes
  ``F̄_t = Attention(W_Q F_t, W_K F_ref, W_V F_ref)`` with
  ``F_ref = concat(F_t, F_port, F_attr^1 … F_attr^N)`` along the token axis, using DNet's own
  projections. With two attribute branches it returns ``(1−α)·SA(…, attr¹) + α·SA(…, attr²)``
  (interpolation, method note §4).

Positions (``FusionState.positions``, the tiny profile): a fixed 2-D sinusoidal code of each
token's place in the frame is added to the inputs of ``to_q`` and ``to_k`` (not ``to_v``, as in
DETR) for the frame's own tokens and for every reference token. SD's pretrained features carry
where they are implicitly; randomly initialised ones do not, and without a code a frame token
can only find "the same place" in a reference by content. Off for SD 1.5 weights (they were
trained without it).

Writer and reader blocks are paired by one rule: the processor name (e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor``), which is identical in the
three networks because they share one structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

SELF_ATTENTION_SUFFIX = "attn1.processor"


def self_attention_names(processor_names: list[str] | tuple[str, ...]) -> list[str]:
    """The ``attn1`` processor names of a U-Net, in its own order (the pairing rule)."""
    return [n for n in processor_names if n.endswith(SELF_ATTENTION_SUFFIX)]


class ReferenceWriteProcessor(AttnProcessor2_0):
    """Self-attention that also records its input (the block's ``norm1`` output)."""

    def __init__(self, bank: dict[str, torch.Tensor], name: str) -> None:
        super().__init__()
        self.bank = bank
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.bank[self.name] = hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


@lru_cache(maxsize=32)
def grid_positions(length: int, aspect: float, dim: int) -> torch.Tensor:
    """(length, dim) sinusoidal codes of a row-major h×w token grid with w/h = ``aspect``:
    dim/4 frequencies each of sin/cos of y and x. Coordinates are fractions of the frame side ×
    16, so one place in the image gets the same code at every U-Net level. Cached: treat the
    result as read-only."""
    if dim % 4:
        raise ValueError(f"position codes need a channel count divisible by 4, got {dim}")
    h = max(1, round(math.sqrt(length / aspect)))
    w = length // h
    if h * w != length:
        raise ValueError(f"{length} tokens are not a grid of aspect {aspect:.3f}")
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    n = dim // 4
    freq = 100.0 ** (-torch.arange(n) / n)
    y = ys.flatten()[:, None] * (16 / h) * freq
    x = xs.flatten()[:, None] * (16 / w) * freq
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


@dataclass
class FusionState:
    """What DNet's readers use during one forward; set by ``DurianModel.denoise``.

    It stays set after the forward on purpose: gradient checkpointing re-runs blocks during
    backward and the readers must see the same references then.

    ``portrait``: name → (B, L, C) identity reference tokens, or None (stream absent).
    ``attributes``: one dict per attribute branch (1, or 2 for interpolation), name → (B, L', C)
        (composition: the N attributes' tokens already concatenated). Empty: stream absent.
    ``keep_identity`` / ``keep_attribute``: (B,) bool, per-sample keep flags; None = keep all.
    ``alpha``: (B·F,) interpolation weight of branch 2, or None.
    ``positions``: add token position codes to queries and keys (a property of the model, kept
        by :meth:`clear`); ``aspect``: width / height of the latent frame.
    """

    num_frames: int = 1
    portrait: dict[str, torch.Tensor] | None = None
    attributes: list[dict[str, torch.Tensor]] = field(default_factory=list)
    keep_identity: torch.Tensor | None = None
    keep_attribute: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    positions: bool = False
    aspect: float = 1.0

    def position_codes(self, length: int, dim: int, like: torch.Tensor) -> torch.Tensor | None:
        if not self.positions:
            return None
        return grid_positions(length, self.aspect, dim).to(like.device, like.dtype)

    def clear(self) -> None:
        self.num_frames = 1
        self.portrait = None
        self.attributes = []
        self.keep_identity = None
        self.keep_attribute = None
        self.alpha = None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _per_frame(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, ...) → (B·F, ...): each sample's reference reused by its F frames."""
    return x if num_frames == 1 else x.repeat_interleave(num_frames, dim=0)


class DualReferenceAttnProcessor:
    """Dual reference fusion on DNet's ``attn1`` (see module docstring)."""

    def __init__(self, state: FusionState, name: str) -> None:
        self.state = state
        self.name = name

    def _stream(
        self,
        attn: Attention,
        tokens: torch.Tensor | None,
        keep: torch.Tensor | None,
        codes: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Keys, values and per-sample key mask of one reference stream at frame batch size.

        Projections run at reference batch size (B) and are then repeated across frames: the
        same result as repeating tokens first, F times cheaper. ``codes``: the frame's position
        codes, tiled over the N images of a composition.
        """
        if tokens is None or (keep is not None and not bool(keep.any())):
            return None  # absent for every sample: no tokens at all
        f = self.state.num_frames
        key_in = tokens
        if codes is not None:
            key_in = tokens + codes.repeat(tokens.shape[1] // codes.shape[0], 1)
        k = _per_frame(attn.to_k(key_in), f)
        v = _per_frame(attn.to_v(tokens), f)
        mask = None
        if keep is not None and not bool(keep.all()):
            mask = _per_frame(keep, f)[:, None].expand(-1, tokens.shape[1])
        return k, v, mask

    def _attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    ) -> torch.Tensor:
        key = torch.cat([p[0] for p in parts], dim=1)
        value = torch.cat([p[1] for p in parts], dim=1)
        attn_mask = None
        if any(p[2] is not None for p in parts):
            masks = [
                p[2] if p[2] is not None else query.new_ones(p[0].shape[:2], dtype=torch.bool)
                for p in parts
            ]
            attn_mask = torch.cat(masks, dim=1)[:, None, None, :]  # (B·F, 1, 1, Lk)
        h = attn.heads
        out = F.scaled_dot_product_attention(
            _heads(query, h), _heads(key, h), _heads(value, h), attn_mask=attn_mask
        )
        out = out.transpose(1, 2).reshape(query.shape[0], -1, query.shape[-1])
        out = attn.to_out[0](out.to(query.dtype))
        return attn.to_out[1](out)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError(
                "DualReferenceAttnProcessor expects SD-style attn1 on (B, L, C) tokens"
            )
        if attention_mask is not None:
            raise ValueError("attention masks are not supported on reference self-attention")
        s = self.state
        residual = hidden_states
        codes = s.position_codes(hidden_states.shape[1], hidden_states.shape[2], hidden_states)
        placed = hidden_states if codes is None else hidden_states + codes
        query = attn.to_q(placed)
        frame = (attn.to_k(placed), attn.to_v(hidden_states), None)
        portrait = None
        if s.portrait is not None:
            portrait = self._stream(attn, s.portrait[self.name], s.keep_identity, codes)
        head = [frame] + ([portrait] if portrait is not None else [])

        branches = [
            self._stream(attn, a[self.name], s.keep_attribute, codes) for a in s.attributes
        ]
        if not branches:
            out = self._attend(attn, query, head)
        else:
            outs = [
                self._attend(attn, query, head + ([b] if b is not None else [])) for b in branches
            ]
            if len(outs) == 1:
                out = outs[0]
            elif len(outs) == 2 and s.alpha is not None:
                a = s.alpha.to(outs[0].dtype)[:, None, None]
                out = (1 - a) * outs[0] + a * outs[1]  # blend of spatial-attention outputs
            else:
                raise ValueError("two attribute branches need alpha; more than two unsupported")

        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
