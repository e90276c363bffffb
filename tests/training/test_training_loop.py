"""The orchestrator-free Trainer on real shards: overfitting, exact resume, EMA, stage 2,
mixed precision. No Ray here (see test_training_ray.py)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from training_helpers import tiny_recipe, write_train_shards

from durian.data.pairs import PairConfig
from durian.models.config import ModelConfig
from durian.pipelines.pipeline_durian import DurianPipeline
from durian.training.config import read_recipe_hash
from durian.training.ema import EMA
from durian.training.loop import BatchSource, Trainer, build_training_model, export_checkpoint
from durian.training.state import read_state

SMALL = ModelConfig(resolution=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return write_train_shards(tmp_path_factory.mktemp("shards"), num_shards=2, clips_per_shard=3)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_overfits_one_fixed_batch(shards: list[str]) -> None:
    batch = BatchSource(shards, PairConfig(resolution=32, min_gap=2), batch_size=1).fixed_batch(
        seed=0, size=1
    )
    batch["drop_identity"][:] = False  # a conditional example: both references in use
    batch["drop_attribute"][:] = False
    model = build_training_model(SMALL)
    trainer = Trainer(model, itertools.repeat(batch), stage=1, steps=20, lr=2e-3,
                      max_grad_norm=1.0, fixed_noise=True)  # fmt: skip
    losses = [s["loss"] for s in trainer.steps()]
    assert len(losses) == 20 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_resume_from_a_checkpoint_continues_exactly(shards: list[str], tmp_path: Path) -> None:
    # A warmed-up cosine schedule: the resumed run must continue the same learning-rate curve.
    config = tiny_recipe(32, steps=4, lr_scheduler="cosine", lr_warmup_steps=1)
    straight = Trainer.from_config(config, shards)
    stats = []
    for s in straight.steps():
        stats.append(s)
        if s["step"] == 2:
            straight.save(tmp_path / "ckpt")
    lrs = [s["lr"] for s in stats]  # diffusers' warmup starts at 0
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(2e-4) and lrs[1] > lrs[2] > lrs[3] > 0, lrs
    state = read_state(tmp_path / "ckpt")
    assert state["step"] == 2 and state["stage"] == 1
    assert state["data"] == {"seed": 0, "batches": 2}

    resumed = Trainer.from_config(config, shards)
    resumed.load(tmp_path / "ckpt")
    assert resumed.step == resumed.start_step == 2 and resumed.data_batches == 2
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    # The checkpoint holds the trained parameters (the frozen ones are the run's start).
    trained = {n for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert set(saved) == trained
    start = _weights(resumed.model)
    assert _equal({k: start[k] for k in saved}, saved)  # the resumed start is the checkpoint
    rest = list(resumed.steps())
    assert [s["step"] for s in rest] == [3, 4]
    # Same batches (data position skipped), same noise (per-step generators): same losses, and
    # the weights of a run that was never interrupted.
    assert [s["loss"] for s in rest] == [s["loss"] for s in stats[2:]]
    assert [s["lr"] for s in rest] == lrs[2:]
    assert _equal(_weights(resumed.model), _weights(straight.model))

    # "reseed": a fresh stream (no replay of consumed batches) from the same weights.
    reseeded = Trainer.from_config(
        tiny_recipe(32, steps=4, lr_scheduler="cosine", lr_warmup_steps=1, resume_data="reseed"),
        shards,
    )
    reseeded.load(tmp_path / "ckpt")
    assert reseeded.data_seed != 0 and reseeded.data_batches == 0
    assert _equal(_weights(reseeded.model), start)
    first = next(reseeded.steps())
    assert first["step"] == 3 and first["loss"] != rest[0]["loss"]


def test_ema_is_checkpointed_and_exported(shards: list[str], tmp_path: Path) -> None:
    config = tiny_recipe(32, steps=2, ema=True, ema_decay=0.5)
    trainer = Trainer.from_config(config, shards)
    before = {k: v.clone() for k, v in trainer.ema.shadow.items()}
    list(trainer.steps())
    params = dict(trainer.model.named_parameters())
    name = next(iter(before))
    assert trainer.ema.updates == 2
    assert not torch.equal(trainer.ema.shadow[name], before[name])  # the average moved
    assert not torch.equal(trainer.ema.shadow[name], params[name].detach())
    trainer.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "ema.safetensors").exists()

    restored = Trainer.from_config(config, shards)
    restored.load(tmp_path / "ckpt")
    assert restored.ema.updates == 2
    assert all(torch.equal(restored.ema.shadow[k], v) for k, v in trainer.ema.shadow.items())

    export_checkpoint(tmp_path / "ckpt", config, tmp_path / "model")  # the recipe's EMA
    # The folder names the recipe it was trained with, as the trainer and checkpoint do.
    assert read_recipe_hash(tmp_path / "model") == trainer.config_hash == config.config_hash()
    assert read_state(tmp_path / "ckpt")["config_hash"] == config.config_hash()
    exported = DurianPipeline.from_pretrained(str(tmp_path / "model")).model
    ex = dict(exported.named_parameters())
    assert all(torch.equal(ex[k], v) for k, v in trainer.ema.shadow.items())
    export_checkpoint(tmp_path / "ckpt", config, tmp_path / "raw", use_ema=False)
    raw = dict(DurianPipeline.from_pretrained(str(tmp_path / "raw")).model.named_parameters())
    assert torch.equal(raw[name], params[name].detach())


def test_ema_update_rule() -> None:
    layer = torch.nn.Linear(2, 2)
    ema = EMA(layer, decay=0.9, warmup=False)
    start = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(layer)
    assert torch.allclose(ema.shadow["weight"], start + 0.1)
    with ema.swapped_in(layer):
        assert torch.allclose(layer.weight, start + 0.1)
    assert torch.allclose(layer.weight, start + 1.0)


def test_stage_2_trains_the_temporal_module_only(shards: list[str], tmp_path: Path) -> None:
    config = tiny_recipe(32, pair={"num_frames": 2}, stage=2, steps=1)
    trainer = Trainer.from_config(config, shards)
    assert trainer.model.temporal is not None
    before = _weights(trainer.model)
    batch_frames = next(trainer.steps())
    assert batch_frames["step"] == 1
    after = _weights(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("temporal.") for k in changed)
    trainer.save(tmp_path / "ckpt")
    # Stage-1 trainers refuse a stage-2 checkpoint with a message, not a state-dict error.
    with pytest.raises(ValueError, match="stage 2"):
        Trainer.from_config(tiny_recipe(32, steps=1), shards).load(tmp_path / "ckpt")
    state = export_checkpoint(tmp_path / "ckpt", config, tmp_path / "model")
    assert state["stage"] == 2
    exported = DurianPipeline.from_pretrained(str(tmp_path / "model")).model
    assert exported.temporal is not None and exported.temporal_enabled
    assert torch.equal(exported.state_dict()[next(iter(changed))], after[next(iter(changed))])


def test_mixed_precision_and_gradient_checkpointing_on_cpu(shards: list[str]) -> None:
    config = tiny_recipe(32, steps=1, mixed_precision="bf16", gradient_checkpointing=True,
                         grad_accum=2)  # fmt: skip
    trainer = Trainer.from_config(config, shards)
    assert trainer.amp_dtype == torch.bfloat16 and trainer.scaler is None
    assert trainer.model.dnet.is_gradient_checkpointing
    stats = next(trainer.steps())
    assert np.isfinite(stats["loss"]) and stats["samples"] == 4  # 2 micro-batches of 2
    assert trainer.data_batches == 2
    # fp16 is a GPU recipe (autocast + GradScaler): on CPU it says so and trains in fp32.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp16 = Trainer(build_training_model(SMALL), [], steps=1, lr=1e-4, mixed_precision="fp16")
    assert fp16.amp_dtype is None and fp16.scaler is None
    assert any("fp16 needs a GPU" in str(w.message) for w in caught)


def test_preview_grid_shows_the_five_columns(shards: list[str]) -> None:
    trainer = Trainer.from_config(tiny_recipe(32, steps=1), shards)
    batch = trainer.preview_batch(2)
    grid = trainer.preview(batch)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 32 + 2, 5 * 32 + 4 * 2, 3)
    again = trainer.preview(trainer.preview_batch(2))
    assert np.array_equal(grid, again)  # fixed batch, fixed noise: only weights change it
    target = ((batch["target"][0, 0].permute(1, 2, 0).numpy() + 1) / 2 * 255).round()
    assert np.abs(grid[:32, 3 * 34 : 3 * 34 + 32].astype(float) - target).max() <= 1


def test_ema_warms_up_and_resumes_from_its_saved_state(tmp_path: Path) -> None:
    layer = torch.nn.Linear(2, 2)
    ema = EMA(layer, decay=0.5)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update(layer)
    # EMAModel's schedule: the first update copies, then (1 + n) / (10 + n) capped at decay.
    assert decays == [0.0, 2 / 11, 3 / 12]
    save_file(ema.state_dict(), str(tmp_path / "ema.safetensors"))
    again = EMA(torch.nn.Linear(2, 2), decay=0.5)
    again.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
    assert again.updates == 3 and again.current_decay() == ema.current_decay()
    assert all(torch.equal(again.shadow[k], v) for k, v in ema.shadow.items())
