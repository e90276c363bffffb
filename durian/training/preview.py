"""A training preview: what the model makes of a fixed batch at a fixed noise level.

One row per example: identity ref | attribute ref | keypoints | target | prediction, where the
prediction is the model's one-step x0 estimate from the target's latent noised to ``timestep``
(fixed noise, so successive previews differ only by the weights). Frame 0 of each clip.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from durian.models.durian_model import DurianModel
from durian.training.step import batch_identity_embedding

COLUMNS = ("identity_ref", "attribute_ref", "keypoints", "target", "prediction")


@torch.no_grad()
def predict_x0(
    model: DurianModel,
    scheduler: DDPMScheduler,
    batch: dict[str, Any],
    timestep: int = 500,
    seed: int = 0,
) -> torch.Tensor:
    """(B, F, 3, H, W) in [-1, 1]: the x0 estimate from ``target`` noised to ``timestep``.
    ``scheduler`` is the training (DDPM) scheduler: its ``step`` needs no inference timesteps."""
    was_training = model.training
    model.eval()
    try:
        device, dtype = model.device, model.dtype
        target = batch["target"].to(device, dtype)
        b, f = target.shape[:2]
        generator = torch.Generator().manual_seed(seed)
        x0 = model.encode_images(target.flatten(0, 1), generator, sample=False)
        noise = torch.randn(tuple(x0.shape), generator=generator).to(device, dtype)
        t = torch.full((b * f,), int(timestep), dtype=torch.long, device=device)
        noisy = scheduler.add_noise(x0, noise, t)
        # The preview is conditional: no classifier-free-guidance drop.
        keep = torch.zeros(b, dtype=torch.bool, device=device)
        identity = batch_identity_embedding(model, batch)
        pred = model(
            noisy,
            t,
            identity_ref=batch["identity_ref"].to(device, dtype),
            identity_mask=batch["identity_mask"].to(device, dtype),
            attribute_ref=batch["attribute_ref"].to(device, dtype),
            attribute_mask=batch["attribute_mask"].to(device, dtype),
            keypoints=batch["keypoints"].flatten(0, 1).to(device, dtype),
            num_frames=f,
            drop_identity=keep,
            drop_attribute=keep,
            identity_embedding=None if identity is None else identity.to(device, dtype),
        )
        # The scheduler's own x0 for its prediction type (ε, v or x0). ``step`` also draws
        # the noise of the next sample, from this generator, not the global one.
        x0_hat = scheduler.step(pred, int(timestep), noisy, generator=generator)
        x0_hat = x0_hat.pred_original_sample
        images = model.decode_latents(x0_hat).float().clamp(-1, 1)
        return images.view(b, f, *images.shape[1:]).cpu()
    finally:
        model.train(was_training)


def _to_uint8(image: torch.Tensor, unit: bool) -> np.ndarray:
    """(3, H, W) in [-1, 1] (or [0, 1] when ``unit``) → H×W×3 uint8."""
    x = image.detach().float().cpu()
    x = x if unit else (x + 1) / 2
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def preview_grid(batch: dict[str, Any], prediction: torch.Tensor, border: int = 2) -> np.ndarray:
    """An H×W×3 uint8 grid: one row per example, the :data:`COLUMNS` left to right."""
    rows = []
    for i in range(prediction.shape[0]):
        tiles = [
            _to_uint8(batch["identity_ref"][i], unit=False),
            _to_uint8(batch["attribute_ref"][i], unit=False),
            _to_uint8(batch["keypoints"][i, 0], unit=True),
            _to_uint8(batch["target"][i, 0], unit=False),
            _to_uint8(prediction[i, 0], unit=False),
        ]
        h, w, _ = tiles[0].shape
        row = np.full((h, len(tiles) * (w + border) - border, 3), 255, np.uint8)
        for j, tile in enumerate(tiles):
            row[:, j * (w + border) : j * (w + border) + w] = tile
        rows.append(row)
    h, w, _ = rows[0].shape
    grid = np.full((len(rows) * (h + border) - border, w, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        grid[i * (h + border) : i * (h + border) + h] = row
    return grid
