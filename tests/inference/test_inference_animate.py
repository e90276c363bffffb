"""animate(): composition, interpolation, driving, long videos, side-by-side output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from inference_helpers import (
    SIZE,
    astronaut,
    grace_hopper,
    moving_face_video,
    save_png,
    synthetic_portrait,
    tiny_pipeline,
)

from durian.inference import animate
from durian.inference.errors import DurianInputError
from durian.inference.prepare import Preparer

RUN = {"steps": 2, "guidance": 2.0, "seed": 5, "progress": False}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def prep():
    with Preparer(SIZE) as p:
        yield p


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("media")
    return {
        "astronaut": save_png(d / "astronaut.png", astronaut()),
        "grace": save_png(d / "grace.png", grace_hopper()),
        "glasses": synthetic_portrait(d / "glasses.png", seed=3, categories=("hair", "glasses")),
        "video": moving_face_video(d / "drive.mp4", grace_hopper(), num_frames=5),
    }


def single(pipe, anim, k: int, guidance: float = RUN["guidance"], **kwargs) -> np.ndarray:
    """The single-attribute pipeline path (no lists) on the inputs ``anim`` prepared."""
    a = anim.attributes[k]
    return pipe(
        anim.portrait.image,
        anim.portrait_mask,
        a.face.image,
        a.mask,
        anim.keypoints,
        num_inference_steps=RUN["steps"],
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(RUN["seed"]),
        **kwargs,
    ).frames


def test_composition_of_one_equals_single_attribute_path(pipe, prep, media) -> None:
    anim = animate(
        pipe,
        media["astronaut"],
        [(media["glasses"], "glasses")],
        "nod",
        frames=3,
        preparer=prep,
        **RUN,
    )
    assert anim.frames.shape == (3, SIZE, SIZE, 3) and anim.frames.dtype == np.uint8
    assert anim.alpha is None and anim.categories == ["glasses"] and anim.fps == 12.0
    assert np.array_equal(anim.frames, single(pipe, anim, 0))
    # Composing a second attribute changes the result (both references are used).
    both = animate(
        pipe,
        media["astronaut"],
        [(media["glasses"], "glasses"), (media["grace"], None)],
        "nod",
        frames=3,
        preparer=prep,
        **RUN,
    )
    assert both.categories == ["glasses", "hair"]
    assert np.abs(both.frames.astype(int) - anim.frames).mean() > 1


def test_interpolation_end_points_equal_each_single_attribute(pipe, prep, media) -> None:
    # A strong guidance scale magnifies the attribute's effect on a random tiny model.
    run = {**RUN, "guidance": 8.0}
    attrs = [(media["glasses"], "hair"), (media["grace"], "hair")]
    args = (pipe, media["astronaut"], attrs, "talk")
    at0 = animate(*args, alpha=0.0, frames=3, preparer=prep, **run)
    at1 = animate(*args, alpha=1.0, frames=3, preparer=prep, **run)
    half = animate(*args, alpha=0.5, frames=3, preparer=prep, **run)
    assert at0.alpha.tolist() == [0.0] * 3
    ref0 = single(pipe, at0, 0, guidance=8.0)
    ref1 = single(pipe, at0, 1, guidance=8.0)

    def diff(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(int) - b).mean())

    apart = diff(ref0, ref1)
    assert apart > 1.5  # the two attributes really give different videos
    for got, ref in ((at0.frames, ref0), (at1.frames, ref1)):
        assert np.abs(got.astype(int) - ref).max() <= 1  # float rounding at most
        assert diff(got, ref) < 0.02 * apart
    assert diff(half.frames, ref0) > 0.25 * apart and diff(half.frames, ref1) > 0.25 * apart
    # A ramp morphs from the first attribute (frame 0) to the second (last frame); the tiny
    # model has no temporal module, so frames only share the noise seed.
    assert not pipe.model.temporal_enabled
    ramp = animate(*args, alpha_ramp=True, frames=3, preparer=prep, **run)
    assert ramp.alpha.tolist() == [0.0, 0.5, 1.0]
    for k, ref in ((0, at0), (1, half), (2, at1)):
        assert np.abs(ramp.frames[k].astype(int) - ref.frames[k]).max() <= 1


def test_video_driving_long_output_and_side_by_side(pipe, prep, media) -> None:
    # 9 frames from a 5-frame video (played back and forth), through windows of 4.
    anim = animate(
        pipe,
        media["astronaut"],
        [(media["grace"], None)],
        media["video"],
        frames=9,
        preparer=prep,
        side_by_side=True,
        window=4,
        overlap=1,
        **RUN,
    )
    assert anim.frames.shape == (9, SIZE, 4 * SIZE, 3)
    assert anim.fps == pytest.approx(12.0, rel=0.01)
    assert np.array_equal(anim.frames[0, :, :SIZE], anim.portrait.image)
    assert np.array_equal(anim.frames[0, :, SIZE : 2 * SIZE], anim.attributes[0].face.image)
    # The keypoints follow the video, back and forth: frame 8 mirrors frame 0.
    assert np.array_equal(anim.keypoints[8], anim.keypoints[0])
    assert not np.array_equal(anim.keypoints[2], anim.keypoints[0])
    result = anim.frames[:, :, 3 * SIZE :]
    assert np.array_equal(result, single(pipe, anim, 0, window=4, overlap=1))
    # Driving panel: the driver's face crops, moving.
    driver = anim.frames[:, :, 2 * SIZE : 3 * SIZE]
    assert np.abs(driver[2].astype(int) - driver[0]).mean() > 2


def test_driving_and_attribute_errors_come_before_model_work(pipe, media) -> None:
    with pytest.raises(DurianInputError, match="neither a video file nor a preset"):
        animate(pipe, media["astronaut"], [(media["grace"], None)], "dance", **RUN)
    with pytest.raises(DurianInputError, match="cannot read driving video 'nope.mp4'"):
        animate(pipe, media["astronaut"], [(media["grace"], None)], "nope.mp4", **RUN)
    with pytest.raises(DurianInputError, match="at least one attribute"):
        animate(pipe, media["astronaut"], [], "nod", **RUN)
    with pytest.raises(DurianInputError, match="frames must be at least 1"):
        animate(pipe, media["astronaut"], [(media["grace"], None)], "nod", frames=0, **RUN)
