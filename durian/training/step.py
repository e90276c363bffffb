"""One training step's loss: ε-prediction MSE of DNet given the dual references (method note §3).

Contract with the data loader (one batch, float32 unless noted)::

    target          B×F×3×H×W in [-1, 1]   frames to reconstruct (F = 1 in stage 1)
    identity_ref    B×3×H×W  in [-1, 1]    I_port ⊙ (1 − M_port), masked-out pixels = -1
    identity_mask   B×1×H×W                M_port (1 = removed attribute region)
    attribute_ref   B×3×H×W  in [-1, 1]    I_attr ⊙ M_attr, masked-out pixels = -1
    attribute_mask  B×1×H×W                M_attr
    keypoints       B×F×3×H×W in [0, 1]    rendered landmarks of the target frames
    drop_identity   bool B                 classifier-free-guidance dropout (decided by the loader)
    drop_attribute  bool B
    identity_embedding B×D                 the external identity embedding (dlib / ArcFace)
                                           a model with identity_embed_dim D reads; ignored by
                                           one that embeds the portrait with CLIP

Usage::

    model = build_model("tiny"); model.set_stage(1)
    scheduler = make_noise_scheduler("ddpm")
    loss = training_loss(model, scheduler, batch, generator)
    loss.backward()

One timestep per clip (shared by its F frames), uniform or drawn from
:func:`timestep_weights`; the stage is whatever ``model.set_stage`` chose.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from durian.models.durian_model import DurianModel

BATCH_KEYS = (
    "target",
    "identity_ref",
    "identity_mask",
    "attribute_ref",
    "attribute_mask",
    "keypoints",
    "drop_identity",
    "drop_attribute",
)


TIMESTEP_BIAS_STRATEGIES = ("none", "later", "earlier")


def random_training_batch(
    batch: int,
    frames: int,
    size: int,
    seed: int = 0,
    attribute_rows: int | None = None,
    identity_dim: int | None = None,
) -> dict[str, torch.Tensor]:
    """A batch in the loader's keys, shapes and ranges with random content (speed and memory
    checks, tests): images in [-1, 1], the attribute region the top ``attribute_rows`` rows
    (default a third), masked references as the loader makes them, no drops; with
    ``identity_dim``, an identity embedding of that width."""
    g = torch.Generator().manual_seed(seed)

    def img(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g) * 2 - 1

    masks = torch.zeros(batch, 1, size, size)
    masks[:, :, : size // 3 if attribute_rows is None else attribute_rows] = 1
    extra = {} if identity_dim is None else {"identity_embedding": img(batch, identity_dim)}
    return extra | {
        "target": img(batch, frames, 3, size, size),
        "identity_ref": img(batch, 3, size, size) * (1 - masks) - masks,
        "identity_mask": masks.clone(),
        "attribute_ref": img(batch, 3, size, size) * masks - (1 - masks),
        "attribute_mask": masks.clone(),
        "keypoints": torch.rand(batch, frames, 3, size, size, generator=g),
        "drop_identity": torch.zeros(batch, dtype=torch.bool),
        "drop_attribute": torch.zeros(batch, dtype=torch.bool),
    }


def timestep_weights(
    num_timesteps: int, strategy: str = "none", multiplier: float = 1.0, portion: float = 0.25
) -> torch.Tensor | None:
    """Sampling weights of the training timesteps, the timestep bias of diffusers' SDXL
    training script: ``later`` (``earlier``) multiplies the weight of the last (first)
    ``portion`` of the timesteps by ``multiplier``. ``none`` → None (uniform). A model sampled
    in few steps starts from the noisiest timesteps, which ``later`` trains more often."""
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(
            f"timestep bias must be one of {TIMESTEP_BIAS_STRATEGIES}, got {strategy!r}"
        )
    if strategy == "none":
        return None
    if multiplier <= 0 or not 0 < portion <= 1:
        raise ValueError("timestep bias needs multiplier > 0 and 0 < portion <= 1")
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    n = max(1, round(portion * num_timesteps))
    biased = slice(num_timesteps - n, None) if strategy == "later" else slice(0, n)
    weights[biased] *= multiplier
    return weights / weights.sum()


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator with a GPU model), then move.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def batch_identity_embedding(
    model: DurianModel, batch: dict[str, torch.Tensor]
) -> torch.Tensor | None:
    """The batch's identity embedding when the model reads one (it must be there, of the
    model's width), else None (the model embeds the portrait with CLIP)."""
    width = model.config.identity_embed_dim
    if width is None:
        return None
    embedding = batch.get("identity_embedding")
    if embedding is None or embedding.shape[-1] != width:
        got = "none" if embedding is None else f"{embedding.shape[-1]}-d ones"
        raise ValueError(
            f"the model reads {width}-d identity embeddings but the batch has {got}: make the "
            "loader with identity_embedder=identity_embedder_of(model.config)"
        )
    return embedding


def training_loss(
    model: DurianModel | torch.nn.Module,
    scheduler: DDPMScheduler | DDIMScheduler,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator | None = None,
    *,
    noise_offset: float = 0.0,
    timestep_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar ε-prediction MSE (v or x0 prediction if the scheduler is configured for it).

    ``model`` may be a ``DurianModel`` or a DDP wrapper of one. ``generator`` drives the latent
    sampling, the noise and the timesteps (one per clip, shared by its F frames; uniform, or
    drawn with ``timestep_weights``, one weight per training timestep).
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"training batch lacks {missing}")
    # A DDP-wrapped model: helpers from the inner model, the forward through the wrapper
    # (so gradients are synchronised).
    core = model.module if isinstance(getattr(model, "module", None), DurianModel) else model
    identity = batch_identity_embedding(core, batch)
    target = batch["target"]
    b, f = target.shape[:2]
    dtype = core.dtype
    with torch.no_grad():  # the latent space is never trained
        x0 = core.encode_images(target.flatten(0, 1).to(dtype), generator, sample=True)
    noise = _randn(tuple(x0.shape), generator, x0)
    if noise_offset:
        noise = noise + noise_offset * _randn((b * f, x0.shape[1], 1, 1), generator, x0)
    tdev = generator.device if generator is not None else x0.device
    n_t = scheduler.config.num_train_timesteps
    if timestep_weights is None:
        t = torch.randint(0, n_t, (b,), generator=generator, device=tdev)
    else:
        if timestep_weights.shape != (n_t,):
            raise ValueError(
                f"timestep_weights needs {n_t} entries, got {tuple(timestep_weights.shape)}"
            )
        t = torch.multinomial(timestep_weights.to(tdev), b, replacement=True, generator=generator)
    t = t.to(x0.device)
    t_frames = t.repeat_interleave(f)
    noisy = scheduler.add_noise(x0, noise, t_frames)
    pred = model(
        noisy,
        t_frames,
        identity_ref=batch["identity_ref"].to(dtype),
        identity_mask=batch["identity_mask"].to(dtype),
        attribute_ref=batch["attribute_ref"].to(dtype),
        attribute_mask=batch["attribute_mask"].to(dtype),
        keypoints=batch["keypoints"].flatten(0, 1).to(dtype),
        num_frames=f,
        drop_identity=batch["drop_identity"],
        drop_attribute=batch["drop_attribute"],
        identity_embedding=identity,
    )
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        goal = scheduler.get_velocity(x0, noise, t_frames)
    elif kind == "sample":
        goal = x0
    else:
        goal = noise
    return F.mse_loss(pred.float(), goal.float())
