"""The sd15 code path on a tiny SD-format folder written by diffusers' and transformers' own
classes: weights land unchanged in ARNet, PRNet and DNet, the extra mask channel is zero."""

from __future__ import annotations

import torch
from diffusers import MotionAdapter
from safetensors.torch import save_file
from sd_helpers import tiny_sd_folder

from durian.models.profiles import load_sd15


def test_sd15_path_loads_weights_and_zero_mask_channel(tmp_path) -> None:
    unet, vae, clip = tiny_sd_folder(tmp_path)
    motion = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_num_attention_heads=4,
        motion_norm_num_groups=8,
    )
    save_file(motion.state_dict(), str(tmp_path / "mm.safetensors"))

    model = load_sd15(
        tmp_path / "sd",
        image_encoder_path=tmp_path / "clip",
        motion_module_path=tmp_path / "mm.safetensors",
        resolution=64,
        keypoint_guider_channels=[8, 16, 16, 32],
    )
    source = unet.state_dict()
    for net in (model.dnet, model.arnet, model.prnet):
        own = net.state_dict()
        assert set(own) == set(source)
        for key, value in source.items():
            if key != "conv_in.weight":
                assert torch.equal(own[key], value), key
    assert torch.equal(model.dnet.conv_in.weight, source["conv_in.weight"])
    for net in (model.arnet, model.prnet):
        assert net.conv_in.weight.shape == (32, 5, 3, 3)
        assert torch.equal(net.conv_in.weight[:, :4], source["conv_in.weight"])
        assert torch.count_nonzero(net.conv_in.weight[:, 4:]) == 0
    for key, value in vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[key], value)
    for key, value in clip.state_dict().items():
        assert torch.equal(model.image_encoder.clip.state_dict()[key], value)
    for key, value in motion.state_dict().items():
        assert torch.equal(model.temporal.state_dict()[key], value)

    # The pretrained CLIP is frozen in stage 1; the mask channel has no effect at load time.
    trainable = {id(p) for p in model.trainable_parameters(1)}
    assert not any(id(p) in trainable for p in model.image_encoder.clip.parameters())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = model.encode_images(x)
        assert latents.shape == (1, 4, 8, 8)
        ones = model._reference_input(x, torch.ones(1, 1, 64, 64))
        zeros = model._reference_input(x, torch.zeros(1, 1, 64, 64))
        t, ctx = torch.zeros(1, dtype=torch.long), torch.randn(1, 1, 32)
        assert torch.equal(model.arnet(ones, t, ctx).sample, model.arnet(zeros, t, ctx).sample)
        assert torch.allclose(
            model.arnet(ones, t, ctx).sample, unet(latents, t, ctx).sample, atol=1e-5
        )
