"""Reference attention: the "write" processor of the reference nets and the dual reference
fusion ("read") processor of the denoising U-Net.

Both are diffusers attention processors, installed with ``UNet2DConditionModel.set_attn_processor``
on the ``attn1`` (self-attention) of every transformer block; ``attn2`` keeps diffusers'
``AttnProcessor2_0`` (:class:`PlainAttnProcessor`). No forward method of diffusers is rewritten.
The processors hold no tensors: what one call needs arrives through the U-Net's
``cross_attention_kwargs`` (as diffusers' IP-Adapter passes its image tokens), ``reference_bank``
for the writers and ``reference_fusion`` (:class:`FusionInputs`) for the readers.

* :class:`ReferenceWriteProcessor` (ARNet, PRNet) records the ``hidden_states`` arriving at
  ``attn1`` — the ``norm1`` output of the block — into the call's ``reference_bank`` under
  the processor's name, then computes ordinary self-attention.
* :class:`DualReferenceAttnProcessor` (DNet) computes
  ``F̄_t = Attention(W_Q F_t, W_K F_ref, W_V F_ref)`` with
  ``F_ref = concat(F_t, F_port, F_attr^1 … F_attr^N)`` along the token axis, using DNet's own
  projections. With two attribute branches it returns ``(1−α)·SA(…, attr¹) + α·SA(…, attr²)``
  (interpolation, method note §4).

Positions (``DualReferenceAttnProcessor(positions=True)``, the tiny profile): a fixed 2-D sinusoidal
code of each token's place in the frame is added to the inputs of ``to_q`` and ``to_k`` (not
``to_v``, as in DETR) for the frame's own tokens and for every reference token. SD's pretrained
features carry where they are implicitly; randomly initialised ones do not, and without a code a
frame token can only find "the same place" in a reference by content. Off for SD 1.5 weights (they
were trained without it).

Locality (``DualReferenceAttnProcessor(locality=True)``, the tiny profile): a fixed additive bias on
the attention logits, ``−m_h · distance(query place, key place)`` in tokens of a 16-wide grid, with
one slope per head (``m_h = 2, 1, ½, …``: the first heads look at the same place, the last ones
across the frame), for the frame's own and every reference token: ALiBi (Press et al. 2022) in 2-D.
A randomly initialised DNet does not learn to look at the matching place through position codes
alone (its fusion stays a broad average, measured in ``docs/results.md``); the bias makes "the same
place, and near it" the starting point and leaves content matching to the projections.

Writer and reader blocks are paired by one rule: the processor name (e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor``), which is identical in the
three networks because they share one structure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

SELF_ATTENTION_SUFFIX = "attn1.processor"


def self_attention_names(processor_names: list[str] | tuple[str, ...]) -> list[str]:
    """The ``attn1`` processor names of a U-Net, in its own order (the pairing rule)."""
    return [n for n in processor_names if n.endswith(SELF_ATTENTION_SUFFIX)]


class ReferenceBank:
    """The features one reference-net call records, by processor name. An object of its own,
    not a dict: wrappers that rebuild the containers of a module's arguments (FSDP's hooks,
    DDP moving inputs to the device) hand every block this same bank, where a dict would be
    copied and the features written into the copy lost."""

    def __init__(self) -> None:
        self.features: dict[str, torch.Tensor] = {}

    def __setitem__(self, name: str, features: torch.Tensor) -> None:
        self.features[name] = features


class ReferenceWriteProcessor(AttnProcessor2_0):
    """Self-attention that also records its input (the block's ``norm1`` output) into the
    :class:`ReferenceBank` of the call's ``cross_attention_kwargs``, under its own name."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        reference_bank: ReferenceBank | None = None,
    ) -> torch.Tensor:
        if reference_bank is not None:
            reference_bank[self.name] = hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def grid_coordinates(length: int, aspect: float) -> torch.Tensor:
    """(length, 2) (y, x) places of a row-major h×w token grid with w/h = ``aspect``, in units
    of a 16-wide grid (one image place has the same coordinates at every U-Net level)."""
    h = max(1, round(math.sqrt(length / aspect)))
    w = length // h
    if h * w != length:
        raise ValueError(f"{length} tokens are not a grid of aspect {aspect:.3f}")
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([ys.flatten() * (16 / h), xs.flatten() * (16 / w)], dim=1).float()


@lru_cache(maxsize=32)
def grid_positions(
    length: int,
    aspect: float,
    dim: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(length, dim) sinusoidal codes of a row-major h×w token grid with w/h = ``aspect``:
    dim/4 frequencies each of sin/cos of y and x at the places of :func:`grid_coordinates`, so
    one place in the image gets the same code at every U-Net level. Cached per device and
    dtype (no copy per attention call): treat the result as read-only."""
    if dim % 4:
        raise ValueError(f"position codes need a channel count divisible by 4, got {dim}")
    places = grid_coordinates(length, aspect)
    n = dim // 4
    freq = 100.0 ** (-torch.arange(n) / n)
    y = places[:, :1] * freq
    x = places[:, 1:] * freq
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1).to(device, dtype)


def locality_slopes(heads: int) -> torch.Tensor:
    """Per-head slopes of the locality bias: 2, 1, ½, … (halving, as ALiBi's geometric
    sequence), so some heads stay local and others see the whole frame."""
    return 2.0 ** (1 - torch.arange(heads, dtype=torch.float32))


@lru_cache(maxsize=32)
def locality_bias(
    length: int,
    aspect: float,
    heads: int,
    key_grids: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(heads, length, key_grids·length) additive logits ``−m_h·|p_q − p_k|`` between a frame's
    tokens and ``key_grids`` token grids of the same shape (the frame itself, the identity
    reference, each attribute reference) laid one after another. Cached per device and dtype:
    read-only."""
    places = grid_coordinates(length, aspect)
    dist = torch.cdist(places, places)  # (L, L) in 16-grid tokens
    bias = -locality_slopes(heads)[:, None, None] * dist
    return bias.repeat(1, 1, key_grids).to(device, dtype)


@dataclass(frozen=True)
class FusionInputs:
    """What DNet's readers use in one forward, passed to them as the ``reference_fusion`` entry
    of ``cross_attention_kwargs`` (``DurianModel.denoise`` builds it per call, so nothing of one
    call stays in the processors; gradient checkpointing hands the same object to the blocks it
    re-runs during backward).

    ``portrait``: name → (B, L, C) identity reference tokens, or None (stream absent).
    ``attributes``: one dict per attribute branch (1, or 2 for interpolation), name → (B, L', C)
        (composition: the N attributes' tokens already concatenated). Empty: stream absent.
    ``keep_identity`` / ``keep_attribute``: (B,) bool, per-sample keep flags; None = keep all.
    ``alpha``: (B·F,) interpolation weight of branch 2, or None.
    ``aspect``: width / height of the latent frame.
    """

    num_frames: int = 1
    portrait: dict[str, torch.Tensor] | None = None
    attributes: list[dict[str, torch.Tensor]] = field(default_factory=list)
    keep_identity: torch.Tensor | None = None
    keep_attribute: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    aspect: float = 1.0


NO_REFERENCES = FusionInputs()


class PlainAttnProcessor(AttnProcessor2_0):
    """diffusers' attention for the layers without reference fusion (``attn2``, and ``attn1``
    of blocks that are not paired). ``cross_attention_kwargs`` reach every attention layer of a
    U-Net and diffusers warns about (then drops) entries a processor does not name, so this one
    names the reference entries and ignores them."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        *args: Any,
        reference_fusion: FusionInputs | None = None,
        reference_bank: ReferenceBank | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, *args, **kwargs)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _per_frame(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, ...) → (B·F, ...): each sample's reference reused by its F frames."""
    return x if num_frames == 1 else x.repeat_interleave(num_frames, dim=0)


class DualReferenceAttnProcessor:
    """Dual reference fusion on DNet's ``attn1`` (see module docstring)."""

    def __init__(self, name: str, positions: bool = False, locality: bool = False) -> None:
        self.name = name
        self.positions = positions
        self.locality = locality

    def _stream(
        self,
        attn: Attention,
        tokens: torch.Tensor | None,
        keep: torch.Tensor | None,
        codes: torch.Tensor | None,
        f: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Keys, values and per-sample key mask of one reference stream at frame batch size.

        Projections run at reference batch size (B) and are then repeated across frames: the
        same result as repeating tokens first, F times cheaper. ``codes``: the frame's position
        codes, tiled over the N images of a composition.
        """
        if tokens is None or (keep is not None and not bool(keep.any())):
            return None  # absent for every sample: no tokens at all
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
        aspect: float,
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
        if self.locality:
            length = query.shape[1]
            if key.shape[1] % length:
                raise ValueError("the locality bias needs reference grids of the frame's size")
            bias = locality_bias(
                length, aspect, h, key.shape[1] // length, query.device, query.dtype
            )[None]  # (1, heads, Lq, Lk)
            if attn_mask is not None:  # dropped streams: -inf on their keys
                bias = bias.masked_fill(~attn_mask, float("-inf"))
            attn_mask = bias
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
        reference_fusion: FusionInputs | None = None,
    ) -> torch.Tensor:
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError(
                "DualReferenceAttnProcessor expects SD-style attn1 on (B, L, C) tokens"
            )
        if attention_mask is not None:
            raise ValueError("attention masks are not supported on reference self-attention")
        s = NO_REFERENCES if reference_fusion is None else reference_fusion
        f = s.num_frames
        residual = hidden_states
        codes = None
        if self.positions:
            length, dim = hidden_states.shape[1:]
            codes = grid_positions(length, s.aspect, dim, hidden_states.device, hidden_states.dtype)
        placed = hidden_states if codes is None else hidden_states + codes
        query = attn.to_q(placed)
        frame = (attn.to_k(placed), attn.to_v(hidden_states), None)
        portrait = None
        if s.portrait is not None:
            portrait = self._stream(attn, s.portrait[self.name], s.keep_identity, codes, f)
        head = [frame] + ([portrait] if portrait is not None else [])

        branches = [
            self._stream(attn, a[self.name], s.keep_attribute, codes, f) for a in s.attributes
        ]
        if not branches:
            out = self._attend(attn, query, head, s.aspect)
        else:
            outs = [
                self._attend(attn, query, head + ([b] if b is not None else []), s.aspect)
                for b in branches
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
