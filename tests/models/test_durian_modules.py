"""Shapes through every module, the reference attention processors, and the temporal module."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import SIZE, tiny_model, training_batch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import save_file

from durian.models.attention import DualReferenceAttnProcessor, FusionInputs
from durian.models.keypoint_guider import KeypointGuider
from durian.models.temporal import build_temporal_module, load_temporal_weights


def _refs(model, b: int = 2, n: int = 1, seed: int = 0):
    batch = training_batch(b, 1, seed)
    attr = batch["attribute_ref"]
    mask = batch["attribute_mask"]
    if n > 1:
        attr = torch.stack([attr.roll(i, dims=-1) for i in range(n)], dim=1)
        mask = torch.stack([mask] * n, dim=1)
    return model.encode_references(batch["identity_ref"], batch["identity_mask"], attr, mask)


def test_model_size_and_structure(model) -> None:
    total = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < total < 5_000_000
    # ARNet, PRNet: latent + mask channel in; DNet: latent only. Pixel space: 4x unshuffle.
    assert model.latent_channels == 48 and model.latent_downscale == 4
    assert model.arnet.conv_in.in_channels == 49 and model.prnet.conv_in.in_channels == 49
    assert model.dnet.conv_in.in_channels == 48
    assert len(model.reference_names) == 4  # every transformer block of the tiny U-Net


def test_latent_space_is_lossless_pixel_space(model) -> None:
    x = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    z = model.encode_images(x)
    assert z.shape == (3, 48, 16, 16)
    assert torch.equal(model.decode_latents(z), x)


def test_reference_feature_shapes(model) -> None:
    with torch.no_grad():
        refs = _refs(model, b=2, n=3)
    tokens = {"down_blocks.0": (256, 32), "mid_block": (64, 64), "up_blocks.1": (256, 32)}
    assert set(refs.portrait) == set(model.reference_names)
    for name in model.reference_names:
        length, dim = tokens[name.split(".attentions")[0]]
        assert refs.portrait[name].shape == (2, length, dim)
        assert refs.attributes[0][name].shape == (2, 3 * length, dim)  # N=3 concatenated
    assert refs.attribute_embeddings[0].shape == (2, 3, 64)


def test_denoise_and_keypoint_guider_shapes(model) -> None:
    b, f = 2, 3
    batch = training_batch(b, f)
    with torch.no_grad():
        refs = _refs(model, b=b)
        kp = model.encode_keypoints(batch["keypoints"].flatten(0, 1))
        assert kp.shape == (b * f, 32, 16, 16)
        x = torch.randn(b * f, 48, 16, 16)
        eps = model.denoise(x, torch.tensor([5, 900]), refs, kp, num_frames=f)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


def test_fresh_keypoint_guider_is_zero_and_changes_dnet_once_trained(model) -> None:
    guider = KeypointGuider(32, (8, 16, 32))
    assert guider(torch.rand(2, 3, SIZE, SIZE)).abs().max() == 0
    batch = training_batch(1, 1)
    x = torch.randn(1, 48, 16, 16)
    with torch.no_grad():
        refs = _refs(model, b=1)
        kp_a = model.encode_keypoints(batch["keypoints"][:, 0])
        kp_b = model.encode_keypoints(torch.rand(1, 3, SIZE, SIZE))
        out_a = model.denoise(x, 10, refs, kp_a)
        out_b = model.denoise(x, 10, refs, kp_b)
        out_none = model.denoise(x, 10, refs, None)
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, out_none)


def test_denoise_calls_leave_nothing_behind(model) -> None:
    """Two denoise calls with different references in a row give what each gives alone, and no
    processor or hook keeps a tensor after a call (references travel as call arguments)."""
    batch = training_batch(2, 1)
    x = torch.randn(2, 48, 16, 16)
    with torch.no_grad():
        refs_a, refs_b = _refs(model, b=2, seed=0), _refs(model, b=2, seed=5)
        kp = model.encode_keypoints(batch["keypoints"][:, 0])
        drop = torch.tensor([True, False])
        alone_b = model.denoise(x, 10, refs_b, None)
        alone_a = model.denoise(x, 10, refs_a, kp, drop_attribute=drop)
        then_b = model.denoise(x, 10, refs_b, None)  # nothing of A's call (refs, kp, drop)
        then_a = model.denoise(x, 10, refs_a, kp, drop_attribute=drop)  # nor of B's
    assert torch.equal(then_b, alone_b) and torch.equal(then_a, alone_a)
    assert not torch.allclose(alone_a, alone_b)
    nets = (*model.reference_nets, model.dnet)
    processors = [p for net in nets for p in net.attn_processors.values()]
    held = [(type(p).__name__, k) for p in processors for k, v in vars(p).items()
            if isinstance(v, torch.Tensor | dict | list)]  # fmt: skip
    assert not held
    assert model._keypoint_hook.residual is None


def _attention(dim: int = 16, heads: int = 2) -> Attention:
    torch.manual_seed(3)
    return Attention(query_dim=dim, heads=heads, dim_head=dim // heads)


def _read(
    attn: Attention, x: torch.Tensor, inputs: FusionInputs, positions=False, locality=False
) -> torch.Tensor:
    """DNet's reader on block "blk" with one call's references."""
    reader = DualReferenceAttnProcessor("blk", positions=positions, locality=locality)
    return reader(attn, x, reference_fusion=inputs)


def test_reader_without_references_is_plain_self_attention() -> None:
    attn = _attention()
    x = torch.randn(4, 10, 16)
    state = FusionInputs(num_frames=2)  # no portrait, no attributes
    with torch.no_grad():
        assert torch.allclose(_read(attn, x, state), AttnProcessor2_0()(attn, x), atol=1e-6)
        plain = DualReferenceAttnProcessor("blk")(attn, x)  # no reference_fusion at all
        assert torch.allclose(plain, AttnProcessor2_0()(attn, x), atol=1e-6)


def test_reader_attends_over_frame_portrait_and_attribute_tokens() -> None:
    attn = _attention()
    x = torch.randn(4, 10, 16)  # B=2 samples × F=2 frames
    port, a1 = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    state = FusionInputs(num_frames=2, portrait={"blk": port}, attributes=[{"blk": a1}])
    with torch.no_grad():
        out = _read(attn, x, state)
        # Reference: plain attention on concat([frame; portrait; attribute]) as key/value input,
        # the reference tokens repeated for each of a sample's frames.
        kv = torch.cat([x, port.repeat_interleave(2, 0), a1.repeat_interleave(2, 0)], dim=1)
        expected = AttnProcessor2_0()(attn, x, encoder_hidden_states=kv)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, AttnProcessor2_0()(attn, x), atol=1e-3)


def test_reader_per_sample_drop_equals_absent_tokens() -> None:
    attn = _attention()
    x = torch.randn(2, 10, 16)
    port, a1 = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    keep_attr = torch.tensor([False, True])
    state = FusionInputs(portrait={"blk": port}, attributes=[{"blk": a1}], keep_attribute=keep_attr)
    with torch.no_grad():
        mixed = _read(attn, x, state)
        without = AttnProcessor2_0()(
            attn, x[:1], encoder_hidden_states=torch.cat([x[:1], port[:1]], 1)
        )
        with_all = AttnProcessor2_0()(
            attn, x[1:], encoder_hidden_states=torch.cat([x[1:], port[1:], a1[1:]], 1)
        )
        # a different attribute for the dropped sample changes nothing there
        other = dataclasses.replace(state, attributes=[{"blk": torch.randn(2, 5, 16)}])
        mixed_other = _read(attn, x, other)
    assert torch.allclose(mixed[:1], without, atol=1e-5)
    assert torch.allclose(mixed[1:], with_all, atol=1e-5)
    assert torch.equal(mixed[0], mixed_other[0]) and not torch.allclose(mixed[1], mixed_other[1])


def test_reader_interpolates_attention_outputs() -> None:
    attn = _attention()
    x = torch.randn(3, 10, 16)  # one sample, three frames
    port, a1, a2 = torch.randn(1, 6, 16), torch.randn(1, 5, 16), torch.randn(1, 5, 16)
    alpha = torch.tensor([0.0, 0.3, 1.0])
    state = FusionInputs(
        num_frames=3, portrait={"blk": port}, attributes=[{"blk": a1}, {"blk": a2}], alpha=alpha
    )
    with torch.no_grad():
        out = _read(attn, x, state)
        ends = []
        for a in (a1, a2):
            s = FusionInputs(num_frames=3, portrait={"blk": port}, attributes=[{"blk": a}])
            ends.append(_read(attn, x, s))
    assert torch.allclose(out[0], ends[0][0], atol=1e-6)
    assert torch.allclose(out[2], ends[1][2], atol=1e-6)
    assert torch.allclose(out[1], 0.7 * ends[0][1] + 0.3 * ends[1][1], atol=1e-6)


def test_temporal_module_zero_init_then_mixes_frames_only_in_stage_2() -> None:
    model = tiny_model()
    b, f = 1, 3
    x = torch.randn(b * f, 48, 16, 16)
    with torch.no_grad():
        refs = _refs(model, b=b)
        before = model.denoise(x, 10, refs, num_frames=f)
        model.set_stage(2)  # inserts a fresh, zero-output temporal module
        assert model.temporal is not None and model.temporal_enabled
        assert torch.allclose(model.denoise(x, 10, refs, num_frames=f), before, atol=1e-6)
        for n, m in model.temporal.named_modules():
            if n.endswith("proj_out"):
                m.weight.normal_(std=0.1)
        x2 = x.clone()
        x2[2] += 1.0  # change the last frame only
        out, out2 = (
            model.denoise(x, 10, refs, num_frames=f),
            model.denoise(x2, 10, refs, num_frames=f),
        )
        assert not torch.allclose(out[0], out2[0])  # frame 0 sees frame 2 through time
        model.set_stage(1)  # bypassed: frames independent again
        out, out2 = (
            model.denoise(x, 10, refs, num_frames=f),
            model.denoise(x2, 10, refs, num_frames=f),
        )
        assert torch.equal(out[0], out2[0])
        assert torch.allclose(out, before, atol=1e-6)


def test_motion_module_checkpoint_loads_and_mismatch_is_explained(tmp_path) -> None:
    model = tiny_model()
    model.add_temporal_module()
    cfg = dict(model.config.temporal_config)
    source = build_temporal_module(cfg)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    save_file(source.state_dict(), str(tmp_path / "mm.safetensors"))
    model.add_temporal_module(cfg, checkpoint=tmp_path / "mm.safetensors")
    for k, v in source.state_dict().items():
        assert torch.equal(model.temporal.state_dict()[k], v)

    # (original AnimateDiff names and file forms: tests/models/test_published_checkpoints.py)
    wrong = build_temporal_module({**cfg, "motion_max_seq_length": 16})
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="mis-shaped"):
        load_temporal_weights(build_temporal_module(cfg), tmp_path / "wrong.safetensors")


def test_shared_reference_net_ablation_reads_both_references_through_one_net(tmp_path) -> None:
    """The paper's "one shared ReferenceNet" ablation: one net on identity ‖ attribute inputs."""
    from durian.models.durian_model import DurianModel
    from durian.models.profiles import build_model, make_noise_scheduler
    from durian.training.step import training_loss

    torch.manual_seed(0)
    model = build_model("tiny", resolution=SIZE, shared_reference_net=True)
    assert model.prnet is None and model.reference_nets == [model.arnet]
    assert model.arnet.conv_in.in_channels == 2 * 49
    batch = training_batch(2, 1)
    with torch.no_grad():
        refs = _refs(model, b=2)
        assert refs.attributes == [] and set(refs.portrait) == set(model.reference_names)
        x = torch.randn(2, 48, 16, 16)
        out = model.denoise(x, 10, refs)
        # The attribute image reaches the output through the shared stream …
        other = model.encode_references(
            batch["identity_ref"], batch["identity_mask"],
            batch["attribute_ref"].flip(-1), batch["attribute_mask"],
        )  # fmt: skip
        assert not torch.allclose(model.denoise(x, 10, other), out)
        # … and dropping either reference removes that stream (and φ_attr) for that sample.
        drop = model.denoise(x, 10, refs, drop_attribute=torch.tensor([True, False]))
        assert not torch.allclose(drop[0], out[0]) and torch.allclose(drop[1], out[1])
        with pytest.raises(ValueError, match="exactly one attribute"):
            _refs(model, b=2, n=2)

    model.set_stage(1)
    assert all(p.requires_grad for p in model.arnet.conv_in.parameters())
    loss = training_loss(model, make_noise_scheduler(), batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert model.arnet.conv_in.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path)
    again = DurianModel.from_pretrained(tmp_path)
    assert again.config.shared_reference_net and again.prnet is None


def test_parameterisation_follows_the_model(tmp_path) -> None:
    """The tiny pixel-space profile predicts x0 (ε cannot pass its 48→32 channel bottleneck);
    trainer and pipeline take the parameterisation from the model, whatever scheduler is given."""
    from durian.models.durian_model import DurianModel
    from durian.models.profiles import build_model, make_noise_scheduler, noise_scheduler_for
    from durian.pipelines.pipeline_durian import DurianPipeline
    from durian.training.loop import Trainer

    tiny = build_model("tiny", resolution=SIZE)
    assert tiny.config.prediction_type == "sample"
    assert noise_scheduler_for(tiny, "ddim").config.prediction_type == "sample"
    pipe = DurianPipeline(model=tiny, scheduler=make_noise_scheduler("ddim"))  # ε scheduler
    assert pipe.scheduler.config.prediction_type == "sample"
    trainer = Trainer(tiny, [training_batch(1, 1)], stage=1, steps=1, lr=1e-4)
    assert trainer.scheduler.config.prediction_type == "sample"
    wide = build_model("tiny", resolution=SIZE, widths=(64, 128))
    assert tuple(wide.dnet.config.block_out_channels) == (64, 128)
    assert wide.dnet.conv_in.out_channels == 64
    # A model saved before the parameter existed (or an SD 1.5 one) is ε: the config default.
    wide.register_to_config(prediction_type="epsilon")
    wide.save_pretrained(tmp_path)
    assert DurianModel.from_pretrained(tmp_path).config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        build_model("tiny", resolution=SIZE, prediction_type="flow")


def test_zero_terminal_snr_schedule_follows_the_model() -> None:
    """With ``zero_terminal_snr`` the trainer's last timestep is (numerically) pure noise and
    the pipeline samples that schedule with trailing timesteps, starting at t = 999."""
    from durian.models.profiles import build_model, make_noise_scheduler
    from durian.pipelines.pipeline_durian import DurianPipeline
    from durian.training.loop import Trainer

    plain = build_model("tiny", resolution=SIZE, zero_terminal_snr=False)
    model = build_model("tiny", resolution=SIZE, zero_terminal_snr=True)
    signal = {}
    for name, m in (("plain", plain), ("zero", model)):
        trainer = Trainer(m, [training_batch(1, 1)], stage=1, steps=1, lr=1e-4)
        signal[name] = float(trainer.scheduler.alphas_cumprod[-1])
    assert signal["plain"] > 1e-3 and signal["zero"] < 1e-6
    pipe = DurianPipeline(model=model, scheduler=make_noise_scheduler("ddim"))
    assert pipe.scheduler.config.rescale_betas_zero_snr
    pipe.scheduler.set_timesteps(4)
    assert int(pipe.scheduler.timesteps[0]) == 999
    assert pipe.scheduler.config.prediction_type == model.config.prediction_type


def test_grid_positions_name_one_place_at_every_level() -> None:
    from durian.models.attention import grid_positions

    fine, coarse = grid_positions(16 * 16, 1.0, 32), grid_positions(8 * 8, 1.0, 32)
    assert fine.shape == (256, 32) and coarse.shape == (64, 32)
    # token (2, 4) of the 16-grid and token (1, 2) of the 8-grid start at the same image place
    assert torch.allclose(fine[2 * 16 + 4], coarse[1 * 8 + 2], atol=1e-6)
    assert not torch.allclose(fine[0], fine[1], atol=1e-3)  # neighbours differ
    wide = grid_positions(8 * 16, 2.0, 32)  # 8 rows × 16 columns: row 1 is row 2 of 16
    assert torch.allclose(wide[1 * 16 + 5], fine[2 * 16 + 5], atol=1e-6)
    with pytest.raises(ValueError, match="grid"):
        grid_positions(15, 1.0, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        grid_positions(16, 1.0, 30)


def test_reader_with_positions_adds_codes_to_queries_and_keys_only() -> None:
    from durian.models.attention import grid_positions

    attn = _attention()
    x, port = torch.randn(2, 16, 16), torch.randn(2, 16, 16)  # a 4×4 token grid
    state = FusionInputs(portrait={"blk": port})
    codes = grid_positions(16, 1.0, 16)
    with torch.no_grad():
        out = _read(attn, x, state, positions=True)
        q = attn.to_q(x + codes)
        k = attn.to_k(torch.cat([x + codes, port + codes], 1))
        v = attn.to_v(torch.cat([x, port], 1))
        h = attn.heads
        split = lambda t: t.view(2, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        expected = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        expected = attn.to_out[0](expected.transpose(1, 2).reshape(2, 16, -1))
        plain = _read(attn, x, state)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_locality_bias_is_distance_times_a_slope_per_head() -> None:
    from durian.models.attention import locality_bias, locality_slopes

    assert torch.equal(locality_slopes(4), torch.tensor([2.0, 1.0, 0.5, 0.25]))
    fine = locality_bias(16 * 16, 1.0, 4, 3)  # frame + identity + one attribute grid
    assert fine.shape == (4, 256, 768)
    q = 5 * 16 + 7  # token (5, 7)
    for grid in range(3):
        row = fine[:, q, grid * 256 : (grid + 1) * 256]
        assert torch.equal(row[:, q], torch.zeros(4))  # the same place: no penalty
        assert torch.allclose(row[:, q + 1], -locality_slopes(4))  # one token right
        assert torch.allclose(row[:, q + 16 * 3 + 4], -5 * locality_slopes(4))  # 3 down, 4 right
    # one image place, one distance at every level: token (1, 2) of the 8-grid is (2, 4) of 16
    coarse = locality_bias(8 * 8, 1.0, 4, 1)
    assert torch.allclose(coarse[:, 0, 1 * 8 + 2], fine[:, 0, 2 * 16 + 4])


def test_reader_with_locality_adds_the_bias_to_the_logits() -> None:
    from durian.models.attention import locality_bias

    attn = _attention()
    x, port = torch.randn(2, 16, 16), torch.randn(2, 16, 16)  # a 4×4 token grid
    keep = torch.tensor([True, False])  # the second sample's identity reference is dropped
    state = FusionInputs(portrait={"blk": port}, keep_identity=keep)
    with torch.no_grad():
        out = _read(attn, x, state, locality=True)
        q = attn.to_q(x)
        k = attn.to_k(torch.cat([x, port], 1))
        v = attn.to_v(torch.cat([x, port], 1))
        h = attn.heads
        split = lambda t: t.view(2, t.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        logits = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // h) ** 0.5
        logits = logits + locality_bias(16, 1.0, h, 2)
        logits[1, :, :, 16:] = float("-inf")
        expected = logits.softmax(-1) @ split(v)
        expected = attn.to_out[0](expected.transpose(1, 2).reshape(2, 16, -1))
        plain = _read(attn, x, state)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)


def test_tiny_profile_starts_reference_nets_from_dnet_and_uses_positions() -> None:
    from durian.models.profiles import build_model

    model = build_model("tiny", resolution=SIZE)
    readers = [model.dnet.attn_processors[n] for n in model.reference_names]
    assert model.config.reference_positions and all(r.positions for r in readers)
    assert model.config.reference_locality and all(r.locality for r in readers)
    assert not model.config.freeze_reference_last_up_block
    dnet = model.dnet.state_dict()
    for net in model.reference_nets:
        for name, value in net.state_dict().items():
            if name == "conv_in.weight":  # + the mask channel, zero at the start
                assert torch.equal(value[:, : dnet[name].shape[1]], dnet[name])
                assert not value[:, dnet[name].shape[1] :].any()
            else:
                assert torch.equal(value, dnet[name]), name
