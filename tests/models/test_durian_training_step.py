"""training_loss on the loader's batch contract; stages; overfitting one batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, training_batch

from durian.models.profiles import make_noise_scheduler
from durian.training.step import training_loss


def test_stage_1_loss_reaches_every_trainable_parameter() -> None:
    model = tiny_model().train()
    model.set_stage(1)
    scheduler = make_noise_scheduler("ddpm")
    loss = training_loss(model, scheduler, training_batch(2, 1), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = model.trainable_parameters(1)
    assert all(p.requires_grad for p in trainable)
    # a list a trainer can hand to DDP without find_unused_parameters
    assert all(p.grad is not None for p in trainable)
    ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in ids]
    assert all(p.grad is None for p in frozen)
    assert model.temporal is None


def test_stage_2_trains_only_the_temporal_module() -> None:
    model = tiny_model().train()
    model.set_stage(2)
    loss = training_loss(
        model, make_noise_scheduler("ddpm"), training_batch(1, 3), torch.Generator().manual_seed(0)
    )
    loss.backward()
    temporal = {id(p) for p in model.temporal.parameters()}
    assert all(p.grad is not None for p in model.temporal.parameters())
    assert all(p.grad is None for p in model.parameters() if id(p) not in temporal)


def test_missing_batch_key_is_named() -> None:
    batch = training_batch(1, 1)
    del batch["keypoints"]
    with pytest.raises(KeyError, match="keypoints"):
        training_loss(tiny_model(), make_noise_scheduler("ddpm"), batch)


def test_cfg_dropout_flags_are_honoured() -> None:
    model = tiny_model()
    scheduler = make_noise_scheduler("ddpm")
    batch = training_batch(2, 1)
    batch["drop_attribute"] = torch.tensor([True, False])
    other = dict(batch, attribute_ref=-batch["attribute_ref"])
    with torch.no_grad():
        a = training_loss(model, scheduler, batch, torch.Generator().manual_seed(0))
        b = training_loss(model, scheduler, other, torch.Generator().manual_seed(0))
        batch["drop_attribute"] = torch.tensor([True, True])
        other["drop_attribute"] = batch["drop_attribute"]
        c = training_loss(model, scheduler, batch, torch.Generator().manual_seed(0))
        d = training_loss(model, scheduler, other, torch.Generator().manual_seed(0))
    assert a != b  # sample 1 keeps its attribute stream
    assert torch.equal(c, d)  # every attribute stream dropped: the image is irrelevant


def test_overfitting_one_batch_lowers_the_loss() -> None:
    model = tiny_model().train()
    model.set_stage(1)
    scheduler = make_noise_scheduler("ddpm")
    batch = training_batch(2, 1)
    opt = torch.optim.AdamW(model.trainable_parameters(1), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = training_loss(model, scheduler, batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        model.set_stage(1)
        if checkpointing:
            model.enable_gradient_checkpointing()
        batch = training_batch(2, 1)
        batch["drop_identity"] = torch.tensor([False, True])  # per-sample masks survive recompute
        loss = training_loss(
            model, make_noise_scheduler("ddpm"), batch, torch.Generator().manual_seed(0)
        )
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters(1)]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_x0_parameterisation_regresses_the_clean_latent() -> None:
    """With ``prediction_type="sample"`` the loss is the MSE between DNet's output and x0."""
    model = tiny_model().train()
    model.set_stage(1)
    scheduler = make_noise_scheduler("ddpm", prediction_type="sample")
    batch = training_batch(2, 1)
    x0 = model.encode_images(batch["target"].flatten(0, 1))
    with torch.no_grad():
        model.dnet.conv_out.weight.zero_()
        model.dnet.conv_out.bias.zero_()  # DNet now outputs 0 whatever its input
        loss = training_loss(model, scheduler, batch, torch.Generator().manual_seed(0))
    assert torch.allclose(loss, (x0**2).mean(), atol=1e-6)
