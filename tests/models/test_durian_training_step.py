"""training_loss on the loader's batch contract; stages; overfitting one batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, training_batch

from durian.models.profiles import make_noise_scheduler
from durian.training.step import timestep_weights, training_loss


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


@pytest.mark.parametrize("freeze_last_up", [False, True])
def test_reference_nets_freeze_exactly_their_unused_tail(freeze_last_up: bool) -> None:
    """Every reference-net parameter a fusion point depends on is trained (tiny profile), or
    also the last up block ([base], SD weights); what stays frozen otherwise has no gradient."""
    model = tiny_model().train()
    model.register_to_config(freeze_reference_last_up_block=freeze_last_up)
    model.set_stage(1)
    for net in model.reference_nets:
        net.requires_grad_(True)  # ask autograd which parameters the loss really reaches
    loss = training_loss(
        model, make_noise_scheduler("ddpm"), training_batch(2, 1), torch.Generator().manual_seed(0)
    )
    loss.backward()
    trainable = {id(p) for p in model.trainable_parameters(1)}
    last_up = f"up_blocks.{len(model.dnet.up_blocks) - 1}."
    for net in model.reference_nets:
        for name, p in net.named_parameters():
            reached = p.grad is not None and bool(p.grad.any())
            if freeze_last_up and name.startswith(last_up):
                assert id(p) not in trainable, name
            else:
                assert (id(p) in trainable) == reached, name
    up = [n for n, p in model.arnet.named_parameters() if id(p) in trainable]
    assert any(n.startswith(last_up) for n in up) != freeze_last_up


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


def test_timestep_bias_weights_the_chosen_end_of_the_schedule() -> None:
    later = timestep_weights(1000, "later", multiplier=3.0, portion=0.3)
    earlier = timestep_weights(1000, "earlier", multiplier=3.0, portion=0.3)
    assert timestep_weights(1000) is None
    for w in (later, earlier):
        assert w.shape == (1000,) and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    assert torch.isclose(later[999], 3 * later[0]) and torch.isclose(later[700], later[999])
    assert torch.isclose(later[699], later[0])
    assert torch.equal(earlier, later.flip(0))
    # "later" puts 3·0.3 / (0.7 + 3·0.3) of the draws in the last 30% of the timesteps
    assert abs(float(later[700:].sum()) - 0.9 / 1.6) < 1e-9
    with pytest.raises(ValueError, match="later"):
        timestep_weights(1000, "middle")
    with pytest.raises(ValueError, match="portion"):
        timestep_weights(1000, "later", multiplier=2.0, portion=0.0)


def test_training_loss_draws_timesteps_from_the_weights() -> None:
    """All weight on one timestep: the loss is the x0 loss computed by hand at that timestep."""
    model = tiny_model()
    scheduler = make_noise_scheduler("ddpm", prediction_type="sample")
    batch = training_batch(2, 1)
    losses = {}
    for t in (20, 980):
        weights = torch.zeros(1000, dtype=torch.float64)
        weights[t] = 1.0
        with torch.no_grad():
            loss = training_loss(
                model, scheduler, batch, torch.Generator().manual_seed(0), timestep_weights=weights
            )
            x0 = model.encode_images(batch["target"].flatten(0, 1))
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
            ts = torch.full((2,), t)
            pred = model(
                scheduler.add_noise(x0, noise, ts), ts, batch["identity_ref"],
                batch["identity_mask"], batch["attribute_ref"], batch["attribute_mask"],
                batch["keypoints"].flatten(0, 1), drop_identity=batch["drop_identity"],
                drop_attribute=batch["drop_attribute"],
            )  # fmt: skip
        assert torch.isclose(loss, torch.nn.functional.mse_loss(pred, x0), rtol=1e-5)
        losses[t] = float(loss)
    assert losses[20] != losses[980]
    with pytest.raises(ValueError, match="1000 entries"):
        training_loss(model, scheduler, batch, timestep_weights=torch.ones(10))
