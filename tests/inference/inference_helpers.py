"""Test media for the inference tests: real faces (astronaut, Grace Hopper), a synthetic
attribute image with exact labels, a driving video made by moving a real face, a tiny model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

SIZE = 64  # the tiny model's resolution


def astronaut() -> np.ndarray:
    from skimage.data import astronaut as load

    return load()


def grace_hopper() -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def save_png(path: Path, image: np.ndarray) -> Path:
    Image.fromarray(image).save(path)
    return path


def synthetic_portrait(
    path: Path, seed: int = 3, categories: tuple[str, ...] = ("hair", "glasses"), size: int = 192
) -> Path:
    """A drawn portrait with ``categories`` and its exact labels in ``<path>.gt.npz``."""
    from synthetic.params import (
        Attributes,
        Pose,
        random_beard,
        random_glasses,
        random_hair,
        random_hat,
        random_identity,
    )
    from synthetic.render import render_frame

    rng = np.random.default_rng(seed)
    identity = random_identity(rng)
    make = {"hair": random_hair, "glasses": random_glasses, "hat": random_hat,
            "beard": random_beard}  # fmt: skip
    attrs = Attributes(**{c: make[c](rng) for c in categories})
    image, labels, landmarks = render_frame(identity, attrs, Pose(), size, seed)
    save_png(path, image)
    np.savez(path.with_suffix(".gt.npz"), landmarks=landmarks, parsing=labels)
    return path


def moving_face_video(path: Path, image: np.ndarray, num_frames: int = 8, fps: int = 12) -> Path:
    """``image`` rotated, shifted and zoomed a little more each frame, as an H.264 MP4."""
    from preprocessing.video import write_video

    h, w = image.shape[:2]
    frames = []
    for t in range(num_frames):
        phase = 2 * np.pi * t / max(num_frames, 1)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), 8 * np.sin(phase), 1 + 0.05 * np.sin(phase))
        m[:, 2] += (12 * np.sin(phase), 6 * np.cos(phase))
        frames.append(cv2.warpAffine(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE))
    return write_video(path, np.stack(frames), fps)


def tiny_model(seed: int = 0, **fields):
    """The tiny profile (with ``ModelConfig`` ``fields``) with random weights, its
    zero-initialised keypoint output woken up so the driving keypoints change the result."""
    from durian.models.profiles import build_model

    torch.manual_seed(seed)
    model = build_model("tiny", resolution=SIZE, **fields)
    g = torch.Generator().manual_seed(seed)
    conv = model.keypoint_guider.conv_out
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return model.eval()


def tiny_pipeline(seed: int = 0, **fields):
    from durian.models.profiles import make_noise_scheduler
    from durian.pipelines.pipeline_durian import DurianPipeline

    model = tiny_model(seed, **fields)
    pipe = DurianPipeline(model=model, scheduler=make_noise_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_mp4(path: Path) -> np.ndarray:
    """Every frame of a video as (T, H, W, 3) uint8, decoded with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264", stream.codec_context.name
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


def eye_face_ratios(landmarks: np.ndarray) -> np.ndarray:
    """Per frame (…, 478, 2|3): inter-ocular distance / face width, and face height / width —
    numbers that describe a face's shape and do not change under a similarity transform."""
    lm = np.asarray(landmarks, np.float64)[..., :2]
    eyes = np.linalg.norm(lm[..., 263, :] - lm[..., 33, :], axis=-1)
    width = np.linalg.norm(lm[..., 454, :] - lm[..., 234, :], axis=-1)
    height = np.linalg.norm(lm[..., 152, :] - lm[..., 10, :], axis=-1)
    return np.stack([eyes / width, height / width], axis=-1)
