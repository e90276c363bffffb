"""``benchmarks/memory.py`` on the tiny profile: its parts come from the real parameter sets, its
levers each lower the total, and its activation count on fake tensors follows a real forward."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory  # noqa: E402

from durian.models.durian_model import DurianModel  # noqa: E402
from durian.training.loop import half_frozen  # noqa: E402

RESOLUTION, GPUS = 32, 4


@pytest.fixture(scope="module")
def report() -> dict:
    return memory.run(tiny=True, resolution=RESOLUTION, batch1=2, batch2=1, frames=4, gpus=GPUS)


def _real_model(stage: int) -> DurianModel:
    """The tiny model as the trainer holds it: stage set, frozen parts in half precision."""
    model = DurianModel(**memory.model_config(True, RESOLUTION))
    model.set_stage(stage)
    half_frozen(model, torch.float16)
    return model


@pytest.mark.parametrize("stage", [1, 2])
def test_parts_come_from_the_trainers_parameter_set(report: dict, stage: int) -> None:
    model = _real_model(stage)
    trained = [p for p in model.parameters() if p.requires_grad]
    held = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    n = sum(p.numel() for p in trained)
    ddp = report["stages"][stage - 1]["rows"][0]
    assert report["stages"][stage - 1]["trainable_parameters"] == n
    assert ddp["weights"] == held  # fp32 trained + fp16 frozen, as half_frozen leaves them
    assert ddp["gradients"] == ddp["ddp_bucket"] == ddp["ema"] == 4 * n
    assert ddp["optimizer"] == 8 * n
    if stage == 2:  # stage 2 trains exactly the temporal module
        assert n == sum(p.numel() for p in model.temporal.parameters()) > 0


@pytest.mark.parametrize("stage", [1, 2])
def test_totals_are_the_parts_and_each_lever_lowers_them(report: dict, stage: int) -> None:
    rows = report["stages"][stage - 1]["rows"]
    for r in rows:
        persistent = r["weights"] + r["gradients"] + r["ddp_bucket"] + r["optimizer"] + r["ema"]
        assert r["total"] == persistent + max(r["activations"], r["step"])
    *rows, fsdp = rows  # the last row replaces levers instead of adding one
    totals = [r["total"] for r in rows]
    # No lever adds memory; fused AdamW saves only where its step temporaries exceed the
    # activations (the tiny profile's stage 1), the others always save something.
    assert all(b <= a for a, b in zip(totals, totals[1:], strict=False)), totals
    names = [r["strategy"] for r in rows]
    assert all(
        b < a
        for a, b, name in zip(totals, totals[1:], names[1:], strict=False)
        if name != "+ fused AdamW"
    ), totals
    act = report["stages"][stage - 1]["activations"]
    assert act["checkpointed"]["saved"] + act["checkpointed"]["recompute"] < act["full"]["saved"]
    assert act["checkpointed"]["recompute"] > 0 and act["full"]["recompute"] == 0
    # FSDP: a 1/GPUS share of the trained state, the frozen parts and gathered units whole.
    zero1, n = rows[-1], report["stages"][stage - 1]["trainable_parameters"]
    assert fsdp["strategy"].startswith("train.fsdp") and fsdp["ddp_bucket"] == fsdp["step"] == 0
    assert fsdp["gradients"] == fsdp["ema"] == fsdp["optimizer"] // 2 == -(-4 * n // GPUS)
    assert fsdp["activations"] == zero1["activations"]
    sharded = fsdp["gradients"] + fsdp["optimizer"] + fsdp["ema"]
    assert sharded < zero1["gradients"] + zero1["optimizer"]
    text = memory.markdown(report["stages"][stage - 1], GPUS, RESOLUTION)
    assert text.count("\n| ") == len(rows) + 2 and "replaces DDP" in text
    json.dumps(report)  # the --json file


def test_zero_partition_is_torchs_greedy_split() -> None:
    # Largest first, each to the least loaded rank: 5→a, 4→b, 3→b (7), 3→a (8), 1→b (8).
    assert memory.zero_partition_max((3, 1, 5, 3, 4), 2) == 8
    assert memory.zero_partition_max((10, 1, 1), 2) == 10  # one tensor is never split
    assert memory.zero_partition_max((7,), 1) == 7


def test_fake_tensor_count_follows_a_real_forward() -> None:
    """The count on fake tensors against the same count on a real CPU forward (the layout of a
    few small tensors differs between the fake and the CPU kernels: a few hundred bytes)."""
    config = memory.model_config(True, RESOLUTION)
    args = (config, 1, 1, 1, True, torch.bfloat16)
    fake = memory.measure_activations(*args)
    real = memory.measure_activations(*args, fake=False)
    assert real.segment == fake.segment == "BasicTransformerBlock"
    assert abs(fake.saved - real.saved) <= 0.01 * real.saved, (fake, real)
    assert abs(fake.recompute - real.recompute) <= 0.01 * real.recompute, (fake, real)


def test_no_fake_tensor_outlives_the_measurement(report: dict) -> None:
    """The attention caches filled during a fake forward are emptied: a later real forward in
    the same process (the rest of the test suite, a notebook) gets real tensors."""
    from durian.models.attention import grid_positions, locality_bias

    assert grid_positions.cache_info().currsize == 0
    assert locality_bias.cache_info().currsize == 0
    codes = grid_positions(16, 1.0, 8)
    assert codes.sum().item() == codes.sum().item()  # a real tensor has a value
    grid_positions.cache_clear()
