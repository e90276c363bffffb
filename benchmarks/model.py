"""Durian model benchmark: parameter counts and seconds per denoising step. Prints, never asserts.

    python benchmarks/model.py                       # tiny timings + parameter table (tiny, sd15)
    python benchmarks/model.py --sd15-timing         # also SD 1.5-size DNet steps (heavy on CPU)
    python benchmarks/model.py --sd15-timing --sd15-resolution 256 --frames 1

Parameter counts of the SD 1.5 profile are taken on the meta device (no weights allocated, no
download). A "denoising step" is one DNet call as the pipeline makes it: classifier-free guidance
(batch 2·F), dual reference fusion with the precomputed identity and attribute tokens, keypoint
features, and the temporal module when F > 1. Reference nets are not part of a step (they run
once per generation); the tiny rows also time that reference pass and a stage-1 training step.
For SD 1.5 only DNet and the temporal module get (random) weights, to keep memory at ~6 GB.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from torch import nn

from durian.models.durian_model import DurianModel, References
from durian.models.profiles import build_model, make_noise_scheduler
from durian.training.step import training_loss

COMPONENTS = (
    "arnet",
    "prnet",
    "dnet",
    "keypoint_guider",
    "temporal",
    "image_encoder",
    "identity_projector",
    "vae",
)


def parameter_table(profiles: dict[str, DurianModel]) -> None:
    names = list(profiles)
    print(f"\n{'parameters (M)':<20}" + "".join(f"{n:>12}" for n in names))
    for comp in COMPONENTS:
        row = []
        for model in profiles.values():
            module = getattr(model, comp)
            row.append(0 if module is None else sum(p.numel() for p in module.parameters()))
        print(f"{comp:<20}" + "".join(f"{r / 1e6:>12.3f}" for r in row))
    totals = [sum(p.numel() for p in m.parameters()) for m in profiles.values()]
    print(f"{'total':<20}" + "".join(f"{t / 1e6:>12.3f}" for t in totals))


def seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first calls pay one-off kernel set-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def meta_references(model: DurianModel, resolution: int) -> References:
    """Reference token shapes via the meta device, filled with random numbers on the CPU."""
    with torch.device("meta"):
        img, mask = (
            torch.zeros(1, 3, resolution, resolution),
            torch.zeros(1, 1, resolution, resolution),
        )
        refs = model.encode_references(img, mask, img, mask)

    def real(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, dtype=torch.float32)

    return References(
        {k: real(v) for k, v in refs.portrait.items()},
        [{k: real(v) for k, v in a.items()} for a in refs.attributes],
        [real(e) for e in refs.attribute_embeddings],
    )


def materialise(module: nn.Module) -> None:
    """Meta module → CPU with random weights of a sensible scale (and real frame positions)."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
        for sub in module.modules():
            if isinstance(sub, SinusoidalPositionalEmbedding):
                fresh = SinusoidalPositionalEmbedding(sub.pe.shape[-1], sub.pe.shape[1])
                sub.pe.copy_(fresh.pe)


def step_fn(model: DurianModel, refs: References, frames: int, cfg: bool) -> Callable[[], object]:
    n = 2 if cfg else 1
    c, h = model.latent_channels, model.config.resolution // model.latent_downscale
    x = torch.randn(n * frames, c, h, h, dtype=model.dnet.dtype)
    kp = torch.randn(n * frames, model.dnet.config.block_out_channels[0], h, h, dtype=x.dtype)
    drops = torch.tensor([True, False][-n:])
    refs_n = refs.repeat(n) if cfg else refs

    @torch.no_grad()
    def step() -> object:
        return model.denoise(
            x, 500, refs_n, kp, num_frames=frames, drop_identity=drops, drop_attribute=drops
        )

    return step


def tiny_rows(frames_list: list[int], cfg: bool, repeats: int) -> None:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    model.add_temporal_module()
    size = model.config.resolution
    img, mask = torch.rand(1, 3, size, size) * 2 - 1, torch.ones(1, 1, size, size)
    with torch.no_grad():
        refs = model.encode_references(img, mask, img, mask)
    print(f"\ntiny ({size} px, pixel space {model.latent_channels}×{size // 4}², CFG={cfg})")
    for frames in frames_list:
        model.set_stage(2 if frames > 1 else 1)  # temporal module only for videos
        s = seconds(step_fn(model, refs, frames, cfg), repeats)
        print(f"  denoising step, batch 1, {frames} frame(s): {s:.3f} s")
    with torch.no_grad():
        s = seconds(lambda: model.encode_references(img, mask, img, mask), repeats)
    print(f"  reference pass (ARNet + PRNet, once per generation): {s:.3f} s")

    model = build_model("tiny").train()
    model.set_stage(1)
    opt = torch.optim.AdamW(model.trainable_parameters(1), lr=1e-4)
    scheduler = make_noise_scheduler("ddpm")
    g = torch.Generator().manual_seed(0)
    batch = {
        "target": torch.rand(2, 1, 3, size, size) * 2 - 1,
        "identity_ref": torch.rand(2, 3, size, size) * 2 - 1,
        "identity_mask": torch.ones(2, 1, size, size),
        "attribute_ref": torch.rand(2, 3, size, size) * 2 - 1,
        "attribute_mask": torch.ones(2, 1, size, size),
        "keypoints": torch.rand(2, 1, 3, size, size),
        "drop_identity": torch.zeros(2, dtype=torch.bool),
        "drop_attribute": torch.zeros(2, dtype=torch.bool),
    }

    def train_step() -> None:
        loss = training_loss(model, scheduler, batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()

    s = seconds(train_step, repeats)
    print(f"  stage-1 training step (batch 2, fwd+bwd ARNet+PRNet+DNet, AdamW): {s:.3f} s")


def sd15_rows(resolution: int, frames_list: list[int], cfg: bool, repeats: int, dtype: str) -> None:
    with torch.device("meta"):
        model = build_model("sd15", resolution=resolution)
        model.add_temporal_module()
    refs = meta_references(model, resolution)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    started = time.perf_counter()
    for module in (model.dnet, model.temporal):
        materialise(module)
        nn.Module.to(module, torch_dtype)
    refs = References(
        {k: v.to(torch_dtype) for k, v in refs.portrait.items()},
        [{k: v.to(torch_dtype) for k, v in a.items()} for a in refs.attributes],
        [e.to(torch_dtype) for e in refs.attribute_embeddings],
    )
    print(
        f"\nsd15 ({resolution} px, latents 4×{resolution // 8}², {dtype}, CFG={cfg}; "
        f"DNet + temporal materialised in {time.perf_counter() - started:.1f} s)"
    )
    for frames in frames_list:
        model._temporal_hooks.enabled = frames > 1
        s = seconds(step_fn(model, refs, frames, cfg), repeats)
        print(f"  denoising step, batch 1, {frames} frame(s): {s:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cfg", action="store_true", help="time batch F, not 2·F")
    parser.add_argument("--sd15-timing", action="store_true", help="time SD 1.5-size steps too")
    parser.add_argument("--sd15-resolution", type=int, default=512)
    parser.add_argument("--sd15-repeats", type=int, default=1)
    parser.add_argument("--sd15-dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with torch.device("meta"):  # shapes only: no memory, no download
        sd15 = build_model("sd15")
        sd15.add_temporal_module()
    tiny = build_model("tiny")
    tiny.add_temporal_module()
    parameter_table({"tiny": tiny, "sd15": sd15})

    tiny_rows(args.frames, not args.no_cfg, args.repeats)
    if args.sd15_timing:
        sd15_rows(
            args.sd15_resolution, args.frames, not args.no_cfg, args.sd15_repeats, args.sd15_dtype
        )


if __name__ == "__main__":
    main()
