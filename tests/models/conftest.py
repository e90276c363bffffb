"""Shared tiny-model fixtures for the model, pipeline and training-step tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from durian.models.durian_model import DurianModel
from durian.models.profiles import build_model, make_noise_scheduler
from durian.pipelines.pipeline_durian import DurianPipeline
from durian.training.step import random_training_batch

SIZE = 64


def wake_zero_inits(model: DurianModel, seed: int = 0) -> None:
    """Give the zero-initialised outputs (keypoint guider, temporal proj_out) random weights so
    that every path of the network influences the output in the tests."""
    g = torch.Generator().manual_seed(seed)
    modules = [model.keypoint_guider.conv_out]
    if model.temporal is not None:
        modules += [m for n, m in model.temporal.named_modules() if n.endswith("proj_out")]
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def tiny_model(seed: int = 0, temporal: bool = False) -> DurianModel:
    torch.manual_seed(seed)
    model = build_model("tiny", resolution=SIZE)
    if temporal:
        model.add_temporal_module()
    wake_zero_inits(model, seed)
    return model.eval()


def rect_mask(top: int, left: int, h: int, w: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[top : top + h, left : left + w] = True
    return m


def random_image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def keypoint_images(frames: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, SIZE, SIZE, 3), dtype=np.uint8)


def training_batch(batch: int, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_training_batch(batch, frames, SIZE, seed, attribute_rows=24)  # "hair" on top


@pytest.fixture(scope="module")
def model() -> DurianModel:
    return tiny_model()


@pytest.fixture(scope="module")
def pipe(model: DurianModel) -> DurianPipeline:
    p = DurianPipeline(model=model, scheduler=make_noise_scheduler("ddim"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def video_inputs() -> dict:
    return {
        "portrait": random_image(1),
        "portrait_mask": rect_mask(0, 0, 24, SIZE),
        "attribute_image": random_image(2),
        "attribute_mask": rect_mask(0, 8, 20, 48),
        "keypoint_images": keypoint_images(4),
    }


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for these small models: with the 2 cores shared by other processes,
    2 OpenMP threads wait on each other and a 5 s test can take minutes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
