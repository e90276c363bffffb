"""DurianPipeline behaviour: references once, composition, interpolation, CFG drops, seeds,
temporal windows, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SIZE, random_image, rect_mask, tiny_model
from diffusers import DDIMScheduler

from durian.data.masks import attribute_reference, identity_reference
from durian.data.pairs import collate_examples, to_torch
from durian.models.durian_model import DurianModel
from durian.models.profiles import make_noise_scheduler
from durian.pipelines.pipeline_durian import (
    DurianPipeline,
    save_durian_pipeline,
    temporal_windows,
)


def run(pipe: DurianPipeline, inputs: dict, seed: int = 0, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("guidance_scale", 2.0)
    return pipe(**inputs, generator=torch.Generator().manual_seed(seed), **kwargs).frames


class CallCounter:
    def __init__(self, *modules: torch.nn.Module) -> None:
        self.calls = 0
        self.handles = [m.register_forward_pre_hook(self) for m in modules]

    def __call__(self, module, args) -> None:
        self.calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_output_frames_and_seeds(pipe, video_inputs) -> None:
    a = run(pipe, video_inputs, seed=0)
    assert a.shape == (4, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, run(pipe, video_inputs, seed=0))
    assert not np.array_equal(a, run(pipe, video_inputs, seed=1))


def test_sampler_feeds_the_model_what_training_does(pipe, video_inputs) -> None:
    """The pipeline's DDIM loop equals DDIM steps on the training path's predictions for the
    loader's batch of the same images (data.pairs: masked references, keypoints in [0, 1]): a
    model then samples from the inputs it was trained on."""
    inp = video_inputs
    frames = len(inp["keypoint_images"])
    example = {
        "target": np.zeros((frames, SIZE, SIZE, 3), np.uint8),  # not read: the sampler makes it
        "identity_ref": identity_reference(inp["portrait"], inp["portrait_mask"]),
        "identity_mask": inp["portrait_mask"],
        "attribute_ref": attribute_reference(inp["attribute_image"], inp["attribute_mask"]),
        "attribute_mask": inp["attribute_mask"],
        "keypoints": inp["keypoint_images"],
        "drop_identity": False,
        "drop_attribute": False,
        "category": "hair",
        "key": "case",
    }
    batch = collate_examples([to_torch(example)])
    steps = 2
    sampled = run(pipe, inp, num_inference_steps=steps, guidance_scale=1.0, output_type="latent")

    def training_path(identity_ref: torch.Tensor) -> torch.Tensor:
        model = pipe.model
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        shape = (frames, model.latent_channels) + (SIZE // model.latent_downscale,) * 2
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            with torch.no_grad():
                pred = model(
                    scheduler.scale_model_input(latents, t),
                    t.expand(frames),
                    identity_ref=identity_ref,
                    identity_mask=batch["identity_mask"],
                    attribute_ref=batch["attribute_ref"],
                    attribute_mask=batch["attribute_mask"],
                    keypoints=batch["keypoints"].flatten(0, 1),
                    num_frames=frames,
                    drop_identity=batch["drop_identity"],
                    drop_attribute=batch["drop_attribute"],
                )
            latents = scheduler.step(pred, t, latents).prev_sample
        return latents

    assert torch.allclose(sampled, training_path(batch["identity_ref"]), atol=1e-4)
    # the comparison sees the inputs: the portrait unmasked is another model input
    unmasked = collate_examples([to_torch({**example, "identity_ref": inp["portrait"]})])
    assert not torch.allclose(sampled, training_path(unmasked["identity_ref"]), atol=1e-3)


@pytest.mark.parametrize(
    ("steps", "frames", "extra"),
    [
        (2, 1, {"guidance_scale": 1.0}),  # no CFG batch
        (4, 7, {"window": 3, "overlap": 1}),
        (3, 5, {"attribute_image_2": random_image(5), "attribute_mask_2": rect_mask(0, 0, 30, 64)}),
    ],
)
def test_reference_nets_run_once_per_call(pipe, video_inputs, steps, frames, extra) -> None:
    inputs = {
        **video_inputs,
        "keypoint_images": np.repeat(video_inputs["keypoint_images"][:1], frames, 0),
    }
    inputs["attribute_image"] = [inputs["attribute_image"], random_image(9)]  # composition N=2
    inputs["attribute_mask"] = [inputs["attribute_mask"], rect_mask(30, 0, 20, 64)]
    if "attribute_image_2" in extra:
        extra = {
            **extra,
            "attribute_image_2": [extra["attribute_image_2"]] * 2,
            "attribute_mask_2": [extra["attribute_mask_2"]] * 2,
        }
    m = pipe.model
    arnet, prnet, guider, dnet = (
        CallCounter(x) for x in (m.arnet, m.prnet, m.keypoint_guider, m.dnet)
    )
    try:
        run(pipe, inputs, num_inference_steps=steps, **extra)
    finally:
        for c in (arnet, prnet, guider, dnet):
            c.remove()
    windows = len(temporal_windows(frames, extra.get("window", 24), extra.get("overlap", 4)))
    assert (arnet.calls, prnet.calls) == (1, 1)
    assert dnet.calls == steps * windows
    # Keypoint features: once for one window, per window and step for several (flat memory).
    assert guider.calls == (1 if windows == 1 else steps * windows)


def test_composition_of_one_attribute_equals_single_path(pipe, video_inputs) -> None:
    single = run(pipe, video_inputs)
    one = run(
        pipe,
        {
            **video_inputs,
            "attribute_image": [video_inputs["attribute_image"]],
            "attribute_mask": [video_inputs["attribute_mask"]],
        },
    )
    assert np.array_equal(single, one)


def test_composition_concatenates_attribute_tokens(pipe, video_inputs) -> None:
    a1, m1 = video_inputs["attribute_image"], video_inputs["attribute_mask"]
    a2, m2 = random_image(11), rect_mask(40, 0, 24, 64)
    both = run(
        pipe,
        {**video_inputs, "attribute_image": [a1, a2], "attribute_mask": [m1, m2]},
        output_type="pt",
    )
    swapped = run(
        pipe,
        {**video_inputs, "attribute_image": [a2, a1], "attribute_mask": [m2, m1]},
        output_type="pt",
    )
    first = run(pipe, video_inputs, output_type="pt")
    # attention is invariant to the order of key tokens; the second attribute does contribute
    assert torch.allclose(both, swapped, atol=1e-4)
    assert not torch.allclose(both, first, atol=1e-3)


def test_interpolation_ends_and_per_frame_alpha(pipe, video_inputs) -> None:
    second = {"attribute_image": random_image(21), "attribute_mask": rect_mask(0, 0, 32, 64)}
    one = run(pipe, video_inputs, output_type="pt")
    two = run(pipe, {**video_inputs, **second}, output_type="pt")
    interp = {
        "attribute_image_2": second["attribute_image"],
        "attribute_mask_2": second["attribute_mask"],
    }
    at0 = run(pipe, video_inputs, alpha=0.0, output_type="pt", **interp)
    at1 = run(pipe, video_inputs, alpha=1.0, output_type="pt", **interp)
    half = run(pipe, video_inputs, alpha=0.5, output_type="pt", **interp)
    assert torch.allclose(at0, one, atol=1e-5)
    assert torch.allclose(at1, two, atol=1e-5)
    assert not torch.allclose(half, one, atol=1e-3) and not torch.allclose(half, two, atol=1e-3)
    # per-frame alpha (morphing); without a temporal module frames are independent
    morph = run(pipe, video_inputs, alpha=[0.0, 1.0, 0.0, 1.0], output_type="pt", **interp)
    assert torch.allclose(morph[0::2], one[0::2], atol=1e-5)
    assert torch.allclose(morph[1::2], two[1::2], atol=1e-5)


def test_dropped_attribute_stream_ignores_attribute_image(pipe, video_inputs) -> None:
    other = {"attribute_image": random_image(33), "attribute_mask": rect_mask(10, 10, 40, 40)}
    a = run(pipe, video_inputs, drop_attribute=True, output_type="pt")
    b = run(pipe, {**video_inputs, **other}, drop_attribute=True, output_type="pt")
    assert torch.equal(a, b)
    kept_a = run(pipe, video_inputs, output_type="pt")
    kept_b = run(pipe, {**video_inputs, **other}, output_type="pt")
    assert not torch.allclose(kept_a, kept_b, atol=1e-3)


def test_dropped_identity_stream_ignores_portrait(pipe, video_inputs) -> None:
    other = {"portrait": random_image(44)}
    a = run(pipe, video_inputs, drop_identity=True, output_type="pt")
    b = run(pipe, {**video_inputs, **other}, drop_identity=True, output_type="pt")
    assert torch.equal(a, b)
    assert not torch.allclose(
        run(pipe, video_inputs, output_type="pt"),
        run(pipe, {**video_inputs, **other}, output_type="pt"),
        atol=1e-3,
    )


def test_temporal_windows_cover_every_frame() -> None:
    assert temporal_windows(5, 8, 2) == [(0, 5)]
    assert temporal_windows(8, 8, 2) == [(0, 8)]
    assert temporal_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert temporal_windows(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (7, 11)]
    with pytest.raises(ValueError):
        temporal_windows(10, 4, 4)


@pytest.fixture(scope="module")
def temporal_pipe() -> DurianPipeline:
    p = DurianPipeline(
        model=tiny_model(seed=1, temporal=True), scheduler=make_noise_scheduler("ddim")
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_one_window_video_equals_direct_path(temporal_pipe, video_inputs) -> None:
    direct = run(temporal_pipe, video_inputs, window=None, output_type="pt")
    windowed = run(temporal_pipe, video_inputs, window=4, overlap=2, output_type="pt")
    assert torch.equal(direct, windowed)
    # shorter windows on a temporal model do change the result (the path is really different)
    assert not torch.allclose(
        direct, run(temporal_pipe, video_inputs, window=2, overlap=1, output_type="pt"), atol=1e-4
    )


def test_save_and_load_round_trip(temporal_pipe, video_inputs, tmp_path) -> None:
    before = run(temporal_pipe, video_inputs, window=3, overlap=1, output_type="pt")
    temporal_pipe.save_pretrained(tmp_path / "pipe")
    assert not list((tmp_path / "pipe").rglob("*.bin")) and not list(
        (tmp_path / "pipe").rglob("*.pt")
    )
    assert (tmp_path / "pipe" / "model" / "diffusion_pytorch_model.safetensors").exists()
    loaded = DurianPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(before, run(loaded, video_inputs, window=3, overlap=1, output_type="pt"))
    # the model alone, as the trainer saves it
    temporal_pipe.model.save_pretrained(tmp_path / "model")
    assert DurianModel.from_pretrained(tmp_path / "model").temporal_enabled
    alone = DurianPipeline.from_pretrained(tmp_path / "model")  # a bare model folder loads too
    alone.set_progress_bar_config(disable=True)
    assert torch.equal(before, run(alone, video_inputs, window=3, overlap=1, output_type="pt"))


def test_pipeline_folder_keeps_its_scheduler_and_a_component_swaps(
    pipe, video_inputs, tmp_path
) -> None:
    """A saved model is a diffusers pipeline folder: the scheduler comes back from it (not from
    constants), and ``from_pretrained(folder, scheduler=…)`` replaces that one component."""
    first = save_durian_pipeline(pipe.model, tmp_path / "first")  # a new model's first scheduler
    saved = json.loads((first / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler" and saved["prediction_type"] == "sample"
    index = json.loads((first / "model_index.json").read_text())
    assert index["model"] == ["durian.models.durian_model", "DurianModel"]

    trailing = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    folder = save_durian_pipeline(pipe.model, tmp_path / "pipe", scheduler=trailing)
    loaded = DurianPipeline.from_pretrained(folder)
    assert loaded.scheduler.config.timestep_spacing == "trailing"
    swapped = DurianPipeline.from_pretrained(
        folder, scheduler=DDIMScheduler.from_config(pipe.scheduler.config)
    )
    assert swapped.scheduler.config.timestep_spacing == "leading"
    for p in (loaded, swapped):
        p.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "pt"}
    reference = run(pipe, video_inputs, **kwargs)
    assert torch.equal(run(swapped, video_inputs, **kwargs), reference)
    assert not torch.allclose(run(loaded, video_inputs, **kwargs), reference, atol=1e-4)


def test_input_formats_are_equivalent(pipe, video_inputs) -> None:
    import PIL.Image

    base = run(pipe, video_inputs, num_inference_steps=2)
    port, mask = video_inputs["portrait"], video_inputs["portrait_mask"]
    kp = video_inputs["keypoint_images"]
    as_tensors = {
        **video_inputs,
        "portrait": torch.from_numpy(port).permute(2, 0, 1).float() / 255,
        "portrait_mask": torch.from_numpy(mask.astype(np.uint8)),  # 0/1 uint8 tensor
        "attribute_image": PIL.Image.fromarray(video_inputs["attribute_image"]),
        "attribute_mask": video_inputs["attribute_mask"].astype(np.uint8) * 255,
        "keypoint_images": torch.from_numpy(kp).permute(0, 3, 1, 2).float() / 255,
    }
    assert np.array_equal(base, run(pipe, as_tensors, num_inference_steps=2))
