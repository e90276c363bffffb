"""Full sharding of what a stage trains over the data-parallel workers (``train.fsdp``): torch's
FSDP2 ``fully_shard``.

Each worker keeps 1/N of the trained parameters, of their gradients, of the AdamW moments and
of the EMA; a unit's full weights exist only while it runs. Units (:func:`shard_units`): every
down, mid and up block of the three U-Nets and each U-Net, the keypoint guider and the
projections in stage 1; each motion module in stage 2. The parameters a stage does not train
stay whole and outside FSDP (``ignored_params``): the VAE, CLIP, the reference nets' unused
tail, and in stage 2 everything but the motion module.

The reference nets keep their gathered weights from forward to backward
(``reshard_after_forward=False``): DNet reads features from *inside* their blocks, so backward
reaches those blocks without passing their outputs, where FSDP would gather them again — they
would be freed. This costs the two reference nets' trained weights, whole, between a step's
forward and backward (``benchmarks/memory.py`` counts it).

Checkpoints hold whole tensors (:func:`full_tensors`, collective: every worker calls it), so a
sharded run's checkpoint loads into any run; :func:`load_full` puts whole tensors back into the
shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from durian.models.durian_model import DurianModel


def shard_units(model: DurianModel, stage: int) -> list[tuple[nn.Module, bool]]:
    """The modules FSDP shards as one unit each, inner before outer, with whether the unit keeps
    its gathered weights from forward to backward (the reference nets)."""
    units: list[tuple[nn.Module, bool]] = []
    if stage == 2:
        if model.temporal is None:
            raise ValueError("stage 2 needs a temporal module")
        blocks = [*model.temporal.down_blocks, *model.temporal.up_blocks]
        if model.temporal.mid_block is not None:
            blocks.append(model.temporal.mid_block)
        return [(m, False) for block in blocks for m in block.motion_modules]
    for net in (*model.reference_nets, model.dnet):
        keep = net is not model.dnet
        blocks = [*net.down_blocks, *([net.mid_block] if net.mid_block is not None else []),
                  *net.up_blocks]  # fmt: skip
        units += [(block, keep) for block in blocks]
        units.append((net, keep))
    units += [(model.keypoint_guider, False), (model.identity_projector, False)]
    if any(True for _ in model.image_encoder.proj.parameters()):
        units.append((model.image_encoder.proj, False))
    if model.config.train_image_encoder:
        units.append((model.image_encoder.clip, False))
    return units


def owned_parameters(
    units: list[tuple[nn.Module, bool]],
) -> Iterator[tuple[nn.Module, bool, list[nn.Parameter]]]:
    """Each unit with the trained parameters it shards (those of no inner unit)."""
    taken: set[int] = set()
    for module, keep in units:
        own = [p for p in module.parameters() if p.requires_grad and id(p) not in taken]
        taken |= {id(p) for p in own}
        yield module, keep, own


def shard_model(model: DurianModel, stage: int, mesh: Any = None) -> None:
    """Apply ``fully_shard`` to the stage's units (after ``set_stage`` and ``half_frozen``,
    before the optimizer is made: FSDP replaces the parameters with sharded ones)."""
    from torch.distributed.fsdp import fully_shard

    for module, keep, own in owned_parameters(shard_units(model, stage)):
        trained = {id(p) for p in own}
        others = {p for p in module.parameters() if id(p) not in trained and not p.requires_grad}
        fully_shard(module, mesh=mesh, reshard_after_forward=not keep,
                    ignored_params=others or None)  # fmt: skip


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of (possibly sharded) tensors, by name. Collective: every worker calls
    it with the same names in the same order."""
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
    return out


@torch.no_grad()
def load_full(targets: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors ``state[name]`` into ``targets[name]`` (sharded or not)."""
    for name, target in targets.items():
        value = state[name]
        if isinstance(target, DTensor):
            value = distribute_tensor(
                value.to(target.device_mesh.device_type), target.device_mesh, target.placements
            )
        target.copy_(value.to(target.dtype))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of a sharded model, whole and keyed by parameter name, on rank 0
    (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Each worker takes its shards of a whole, name-keyed optimizer state. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
