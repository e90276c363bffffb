"""The checkpoints people hold load as published: AnimateDiff's motion module in its original
``.ckpt`` form and as a diffusers ``MotionAdapter`` folder, and the SD image-variations folder
layout. Key names and shapes come from ``tests/fixtures/checkpoints`` (the published files'
facts), never from durian's modules; weights are random."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from durian.models.config import ModelConfig
from durian.models.profiles import (
    SD15_UNET_CONFIG,
    model_from_config,
    noise_scheduler_for,
    read_noise_schedule,
)
from durian.models.temporal import (
    build_temporal_module,
    load_temporal_state,
    load_temporal_weights,
    motion_module_state,
    read_motion_module,
    temporal_module_config,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_smoke  # noqa: E402  (writes the published layouts with random weights)

FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints"
TINY_UNET = {**SD15_UNET_CONFIG, **gpu_smoke.TINY_UNET}  # the widths the tiny ckpt fits


def test_fixture_is_the_published_key_list() -> None:
    keys = json.loads((FIXTURES / "mm_sd_v15_v2.json").read_text())["keys"]
    assert len(keys) == 588
    assert keys[
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0."
        "attention_blocks.0.pos_encoder.pe"
    ] == [1, 32, 320]
    assert keys["mid_block.motion_modules.0.temporal_transformer.proj_out.weight"] == [1280, 1280]


def test_original_v2_names_and_shapes_map_onto_the_sd15_adapter_strictly() -> None:
    """All 588 published tensors at their real shapes (on the meta device: no memory)."""
    shapes = gpu_smoke.motion_module_shapes()
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    converted, fixed = motion_module_state(state)
    assert fixed == {"use_motion_mid_block": True, "motion_max_seq_length": 32}
    with torch.device("meta"):
        adapter = build_temporal_module({**temporal_module_config(SD15_UNET_CONFIG), **fixed})
    load_temporal_state(adapter, converted, "mm_sd_v15_v2.ckpt")  # strict: raises on mismatch
    params = sum(p.numel() for p in adapter.parameters())
    assert params == sum(
        torch.Size(v).numel() for k, v in shapes.items() if not k.endswith(".pe")
    )


@pytest.fixture(scope="module")
def motion_module(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The published names with widths / 10, random values, saved as the original ``.ckpt``."""
    out = tmp_path_factory.mktemp("mm")
    path = gpu_smoke.write_motion_module(out, tiny=True)
    return path, torch.load(path, weights_only=True)


# Published name → MotionAdapter name, written out (not computed) for a few tensors.
RENAMES = {
    "down_blocks.0.motion_modules.1.temporal_transformer.transformer_blocks.0."
    "attention_blocks.1.to_q.weight": "down_blocks.0.motion_modules.1.transformer_blocks.0."
    "attn2.to_q.weight",
    "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.norms.0.bias":
    "up_blocks.3.motion_modules.2.transformer_blocks.0.norm1.bias",
    "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight":
    "mid_block.motion_modules.0.transformer_blocks.0.norm3.weight",
    "up_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight":
    "up_blocks.0.motion_modules.0.proj_in.weight",
}  # fmt: skip


def _adapter(fixed: dict) -> torch.nn.Module:
    return build_temporal_module({**temporal_module_config(TINY_UNET), **fixed})


def test_original_ckpt_loads_with_values_in_the_right_places(motion_module, tmp_path) -> None:
    path, original = motion_module
    state, fixed = read_motion_module(path)
    adapter = _adapter(fixed)
    load_temporal_weights(adapter, path)
    own = adapter.state_dict()
    for published, ours in RENAMES.items():
        assert torch.equal(own[ours], original[published]), published
    # The same tensors as safetensors, and wrapped the Lightning way, load the same.
    save_file(original, str(tmp_path / "mm.safetensors"))
    torch.save({"state_dict": original}, tmp_path / "wrapped.ckpt")
    for other in (tmp_path / "mm.safetensors", tmp_path / "wrapped.ckpt"):
        again = _adapter(fixed)
        load_temporal_weights(again, other)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in own.items())
    # A diffusers MotionAdapter folder (what save_pretrained writes) loads with its config.
    adapter.save_pretrained(tmp_path / "adapter")
    folder_state, folder_config = read_motion_module(tmp_path / "adapter")
    assert folder_config["motion_max_seq_length"] == 32
    assert all(torch.equal(folder_state[k], v) for k, v in own.items())


def test_truncated_or_foreign_checkpoints_fail_naming_the_file(motion_module, tmp_path) -> None:
    path, original = motion_module
    _, fixed = read_motion_module(path)
    missing_key = next(k for k in original if k.endswith("to_v.weight"))
    torch.save({k: v for k, v in original.items() if k != missing_key}, tmp_path / "cut.ckpt")
    with pytest.raises(ValueError, match=r"cut\.ckpt.*1 missing.*attn1\.to_v\.weight"):
        load_temporal_weights(_adapter(fixed), tmp_path / "cut.ckpt")
    learnt = dict(original)
    learnt[next(k for k in original if k.endswith("pe"))] = torch.zeros(1, 32, 32)
    torch.save(learnt, tmp_path / "learnt.ckpt")
    with pytest.raises(ValueError, match=r"learnt\.ckpt.*not the sinusoidal"):
        read_motion_module(tmp_path / "learnt.ckpt")
    (tmp_path / "mm.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"mm\.onnx"):
        read_motion_module(tmp_path / "mm.onnx")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt holds no state dict"):
        read_motion_module(tmp_path / "list.pt")


def test_image_variations_layout_is_the_base_and_the_motion_module_waits_for_stage_2(
    motion_module, tmp_path
) -> None:
    path, original = motion_module
    base = gpu_smoke.write_base_folder(tmp_path, tiny=True)
    config = ModelConfig(
        profile="sd15", resolution=64, pretrained=str(base), motion_module=str(path)
    )
    stage1 = model_from_config(config, stage=1)
    assert stage1.temporal is None  # stage 1 never runs it
    # The image encoder came from <base>/image_encoder (CLIPVisionModelWithProjection).
    clip_cfg = json.loads((base / "image_encoder" / "config.json").read_text())
    assert stage1.image_encoder.clip.config.projection_dim == clip_cfg["projection_dim"]
    # The scheduler's schedule came from <base>/scheduler (PNDM in the published folder).
    published = json.loads((FIXTURES / "sd-image-variations/scheduler/scheduler_config.json")
                           .read_text())  # fmt: skip
    schedule = read_noise_schedule(base)
    assert schedule["beta_schedule"] == published["beta_schedule"] == "scaled_linear"
    assert stage1.config.noise_schedule == schedule
    assert noise_scheduler_for(stage1).config.steps_offset == published["steps_offset"]
    # Loaded parts are the files' tensors, nothing random left on the meta device.
    assert not any(p.is_meta for p in stage1.parameters())
    stage2 = model_from_config(config, stage=2)
    name = "down_blocks.0.motion_modules.1.transformer_blocks.0.attn2.to_q.weight"
    assert torch.equal(stage2.temporal.state_dict()[name], original[next(iter(RENAMES))])


def test_sd15_stage_1_model_builds_on_meta_without_random_init() -> None:
    """The sd15 shape (three 860 M U-Nets, the VAE, CLIP ViT-L/14) with its large parts on the
    meta device: what load_sd15 fills, built in well under a second."""
    from durian.models.durian_model import DurianModel, pretrained_parts_empty
    from durian.models.profiles import sd15_config

    with pretrained_parts_empty():
        model = DurianModel(**sd15_config(512))
    meta = sum(p.numel() for p in model.parameters() if p.is_meta)
    real = sum(p.numel() for p in model.parameters() if not p.is_meta)
    assert meta > 2.5e9  # U-Nets, VAE, CLIP tower
    assert 0 < real < 0.1e9  # keypoint guider, identity projector: initialised as usual
