"""The paper path on one GPU, offline: sd15-size networks from folders in the published layouts,
one stage-1 step, stage-2 steps with a checkpoint and a resume, and 24 frames of inference,
placed and with model CPU offload; prints s/step, s/frame and the peak GPU memory of each
phase. Asserts nothing; a phase that runs out of memory is reported as such and the next one
runs.

    python benchmarks/gpu_smoke.py [--out DIR] [--resolution 512] [--batch 4]
        [--stage2-batch 4] [--frames 24] [--mixed-precision fp16] [--inference-steps 4]
    python benchmarks/gpu_smoke.py --tiny          # the same on the CPU, small widths (a test)

Weights are random (nothing can be downloaded), written first to ``--out`` in the layouts
people hold (``tests/fixtures/checkpoints``): an SD image-variations folder (``unet/``, ``vae/``,
``image_encoder/`` as ``CLIPVisionModelWithProjection``, ``feature_extractor/``, ``scheduler/``)
and AnimateDiff's original ``mm_sd_v15_v2.ckpt`` (its 588 tensor names and shapes). The model is
then built the way ``durian run`` builds it (``ModelConfig`` → ``model_from_config`` →
``Trainer``) with the training settings of ``params/paper.yaml`` (its memory strategy: EMA
device, gradient checkpointing; the batch and precision are the flags'): the motion module is
read for stage 2 only, the frozen parts are kept in half precision under autocast, gradient
checkpointing covers the motion modules.

Needs torch, transformers, accelerate, safetensors (in the usual GPU images) and the wheels
durian imports beyond them: diffusers, pydantic (+ pydantic-core, annotated-types,
typing-inspection), webdataset (+ braceexpand), av and pyyaml — not the project's venv.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LAYOUTS = ROOT / "tests" / "fixtures" / "checkpoints"
BASE = "sd-image-variations"
MOTION_MODULE = "mm_sd_v15_v2"

# --tiny: the same layouts with every width divided (names, block structure and layers kept).
TINY_UNET = {"block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 64}
TINY_VAE = {"block_out_channels": [32, 32, 64, 64], "layers_per_block": 1}
TINY_CLIP = {
    "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
    "num_hidden_layers": 2, "projection_dim": 64,
}  # fmt: skip
TINY_DIVISOR = 10  # motion-module widths 320 → 32 (the U-Net's first level above)


# ----------------------------------------------------------------------------- weights
def write_base_folder(out: Path, tiny: bool = False, device: str = "cpu") -> Path:
    """Random weights in the SD image-variations layout (configs from the fixture)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    src, folder = LAYOUTS / BASE, out / BASE
    shutil.copytree(src, folder, dirs_exist_ok=True)  # model_index, scheduler, feature extractor

    def config(part: str, tiny_fields: dict[str, Any]) -> dict[str, Any]:
        cfg = json.loads((src / part / "config.json").read_text())
        return {**cfg, **tiny_fields} if tiny else cfg

    with torch.device(device):  # random init where it is fast; saved from the CPU
        unet = UNet2DConditionModel.from_config(config("unet", TINY_UNET))
        unet.save_pretrained(folder / "unet")
        del unet
        vae = AutoencoderKL.from_config(config("vae", TINY_VAE))
        vae.save_pretrained(folder / "vae")
        del vae
        clip_cfg = {
            k: v for k, v in config("image_encoder", TINY_CLIP).items() if k != "architectures"
        }
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**clip_cfg))
        clip.save_pretrained(folder / "image_encoder")
        del clip
    return folder


def motion_module_shapes(tiny: bool = False) -> dict[str, list[int]]:
    """The published ``mm_sd_v15_v2.ckpt`` tensor shapes by name (``tiny``: widths / 10)."""
    keys = json.loads((LAYOUTS / f"{MOTION_MODULE}.json").read_text())["keys"]
    if not tiny:
        return keys
    return {
        k: [s if (k.endswith(".pe") and i < 2) else s // TINY_DIVISOR for i, s in enumerate(v)]
        for k, v in keys.items()
    }


def write_motion_module(out: Path, tiny: bool = False, seed: int = 0) -> Path:
    """Random weights under the published names and shapes, saved as the original ``.ckpt``."""
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in motion_module_shapes(tiny).items():
        if key.endswith("pos_encoder.pe"):
            # AnimateDiff's table, the one diffusers' adapter computes (as published).
            state[key] = SinusoidalPositionalEmbedding(shape[2], shape[1]).pe
        else:
            state[key] = torch.randn(shape, generator=g) * 0.02
    path = out / f"{MOTION_MODULE}.ckpt"
    torch.save(state, path)
    return path


# ----------------------------------------------------------------------------- batches
# ----------------------------------------------------------------------------- phases
class Report:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: list[dict[str, Any]] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def phase(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            info = fn()
            status = "ok"
        except torch.OutOfMemoryError as err:
            info, status = {"error": str(err).splitlines()[0]}, "out of memory"
        except Exception as err:  # a smoke run reports every phase, then the next one runs
            traceback.print_exc()
            info, status = {"error": f"{type(err).__name__}: {err}"[:300]}, "failed"
        self.sync()
        row = {
            "phase": name,
            "status": status,
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_gpu_gb": None if self.peak_gb() is None else round(self.peak_gb(), 2),
            **info,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return info if status == "ok" else None


def timed_steps(trainer: Any, n: int, report: Report) -> dict[str, Any]:
    """``n`` optimiser steps; s/step from the steps after the first (kernel selection)."""
    steps = trainer.steps()
    times, losses = [], []
    for _ in range(n):
        report.sync()
        t0 = time.perf_counter()
        stats = next(steps)
        report.sync()
        times.append(time.perf_counter() - t0)
        losses.append(stats["loss"])
    timed = times[1:] or times
    return {
        "s_per_step": round(sum(timed) / len(timed), 3),
        "first_step_s": round(times[0], 2),
        "losses": [round(x, 5) for x in losses],
        "finite": all(math.isfinite(x) for x in losses),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, small widths, 64² (a test)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--out", type=Path, default=None, help="weights and checkpoints (temp dir)")
    p.add_argument("--resolution", type=int, default=None, help="default 512 (64 with --tiny)")
    p.add_argument("--batch", type=int, default=None, help="stage 1 per GPU [base: 4]")
    p.add_argument("--stage2-batch", type=int, default=None, help="stage 2 clips [base: 4]")
    p.add_argument("--frames", type=int, default=None, help="stage 2 and inference [base: 24]")
    p.add_argument("--stage1-steps", type=int, default=2)
    p.add_argument("--stage2-steps", type=int, default=2)
    p.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"],
                   help="default fp16 on a GPU (paper.yaml's), bf16 on the CPU")  # fmt: skip
    p.add_argument("--inference-steps", type=int, default=4)
    p.add_argument("--skip", nargs="*", default=[], choices=["stage1", "stage2", "inference"])
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    res = args.resolution or (64 if args.tiny else 512)
    batch = args.batch or (1 if args.tiny else 4)
    batch2 = args.stage2_batch or (1 if args.tiny else 4)
    frames = args.frames or (4 if args.tiny else 24)
    precision = args.mixed_precision or ("fp16" if device.type == "cuda" else "bf16")

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from durian.models.config import ModelConfig
    from durian.models.profiles import model_from_config, noise_scheduler_for
    from durian.pipelines.pipeline_durian import DurianPipeline
    from durian.training.config import TrainConfig, library_fields
    from durian.training.loop import Trainer
    from durian.training.step import random_training_batch
    from flows.params import load_params  # the project's params files (no Prefect/Ray import)

    diffusers_logging.disable_progress_bar()  # one line per phase, not per weight file
    transformers_logging.disable_progress_bar()
    out = args.out or Path(tempfile.mkdtemp(prefix="durian_gpu_smoke_"))
    out.mkdir(parents=True, exist_ok=True)
    report = Report(device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{name}, torch {torch.__version__}, {res}², stage 1 batch {batch}, "
          f"stage 2 {batch2}×{frames} frames, {precision}", flush=True)  # fmt: skip

    paths: dict[str, Path] = {}

    def write() -> dict[str, Any]:
        paths["base"] = write_base_folder(out, args.tiny, str(device))
        paths["mm"] = write_motion_module(out, args.tiny)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        return {"written_gb": round(size / 1e9, 2)}

    report.phase("write random weights (published layouts)", write)
    config = ModelConfig(
        profile="sd15", resolution=res, pretrained=str(paths["base"]),
        motion_module=str(paths["mm"]),
    )  # fmt: skip
    # The paper run's optimisation and memory strategy as params/paper.yaml sets them (EMA
    # device, checkpointing, …); the batch, precision and budget are this run's.
    paper = load_params(ROOT / "params" / "paper.yaml", {})
    train = TrainConfig.model_validate(library_fields(paper.train, TrainConfig)).model_copy(
        update={"stage": 1, "steps": 1000, "batch_size": batch, "mixed_precision": precision,
                "init_from": None, "grad_accum": 1}
    )  # fmt: skip
    print(f"paper.yaml strategy: ema {train.ema} on {train.ema_device}, gradient checkpointing "
          f"{train.gradient_checkpointing}, shard_optimizer {train.shard_optimizer} (one "
          "process: no effect)", flush=True)  # fmt: skip

    def stage1() -> dict[str, Any]:
        t0 = time.perf_counter()
        model = model_from_config(config, stage=1)
        load_s = time.perf_counter() - t0
        data = itertools.repeat(random_training_batch(batch, 1, res))
        trainer = Trainer(model, data, train, device=device)
        n_train = sum(p.numel() for p in trainer.params)
        info = {"load_s": round(load_s, 1), "trainable_M": round(n_train / 1e6, 1)}
        info |= timed_steps(trainer, args.stage1_steps, report)
        info["motion_module_loaded"] = model.temporal is not None
        return info

    if "stage1" not in args.skip:
        report.phase(f"stage 1: {batch}x{res}² per step", stage1)

    model_holder: dict[str, Any] = {}
    saved_weights: dict[str, torch.Tensor] = {}
    train2 = train.model_copy(update={"stage": 2, "batch_size": batch2})

    def stage2() -> dict[str, Any]:
        t0 = time.perf_counter()
        model = model_from_config(config, stage=2)
        load_s = time.perf_counter() - t0
        data = itertools.repeat(random_training_batch(batch2, frames, res))
        trainer = Trainer(model, data, train2, device=device)
        info = {"load_s": round(load_s, 1),
                "trainable_M": round(sum(p.numel() for p in trainer.params) / 1e6, 1)}  # fmt: skip
        info |= timed_steps(trainer, args.stage2_steps, report)
        t0 = time.perf_counter()
        trainer.save(out / "checkpoint")
        info["checkpoint_s"] = round(time.perf_counter() - t0, 1)
        info["checkpoint_gb"] = round(
            sum(f.stat().st_size for f in (out / "checkpoint").iterdir()) / 1e9, 2
        )
        saved_weights.update(
            {n: p.detach().cpu().clone() for n, p in trainer.trained_weights().items()}
        )
        model_holder["model"] = model
        return info

    def resume() -> dict[str, Any]:
        model = model_holder.pop("model")
        data = itertools.repeat(random_training_batch(batch2, frames, res, seed=1))
        # A fresh trainer over the same model object (its weights perturbed first): the load
        # must bring back the checkpoint's weights, optimizer state and step.
        with torch.no_grad():
            for p in model.temporal.parameters():
                p.add_(1.0)
        trainer = Trainer(model, data, train2, device=device)
        t0 = time.perf_counter()
        state = trainer.load(out / "checkpoint")
        load_s = time.perf_counter() - t0
        restored = all(
            torch.equal(trainer.trained_weights()[n].detach().cpu(), v)
            for n, v in saved_weights.items()
        )
        opt_on_device = all(
            t.device == p.device
            for p in trainer.params
            for t in trainer.optimizer.state.get(p, {}).values()
            if isinstance(t, torch.Tensor) and t.ndim > 0
        )
        info = {
            "resumed_at_step": int(state["step"]), "load_s": round(load_s, 1),
            "weights_restored": restored, "optimizer_state_on_device": opt_on_device,
        }  # fmt: skip
        info |= timed_steps(trainer, 1, report)
        model_holder["model"] = model
        return info

    if "stage2" not in args.skip:
        report.phase(f"stage 2: {batch2}x{frames} frames x{res}² per step", stage2)
        if "model" in model_holder:
            report.phase("stage 2: checkpoint resume + 1 step", resume)

    def inference(offload: bool = False) -> dict[str, Any]:
        pipe = model_holder.get("pipe")
        if pipe is None:
            model = model_holder.pop("model", None)
            if model is None:
                model = model_from_config(config, stage=2)
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            # Inference: all of it in half precision (nn.Module.to: ModelMixin's warns about
            # fp32-kept modules this model does not have).
            model = torch.nn.Module.to(model, device=device, dtype=dtype)
            model.set_stage(2)
            model.eval()
            pipe = DurianPipeline(model=model, scheduler=noise_scheduler_for(model, "ddim"))
            pipe.set_progress_bar_config(disable=True)
            model_holder["pipe"] = pipe
        if offload:  # the weights to the CPU; each phase brings its parts
            pipe.enable_model_cpu_offload(device=device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        g = torch.Generator().manual_seed(0)
        portrait = torch.rand(3, res, res, generator=g)
        mask = torch.zeros(1, res, res)
        mask[:, : res // 3] = 1
        keypoints = torch.rand(frames, 3, res, res, generator=g)
        report.sync()
        t0 = time.perf_counter()
        video = pipe(
            portrait, mask, portrait, mask, keypoints, num_inference_steps=args.inference_steps,
            guidance_scale=3.5, window=min(frames, 24), generator=torch.Generator().manual_seed(0),
        ).frames  # fmt: skip
        report.sync()
        wall = time.perf_counter() - t0
        placed = model_holder.setdefault("video", video)
        return {
            "frames": int(video.shape[0]),
            "ddim_steps": args.inference_steps,
            "s_per_frame": round(wall / frames, 3),
            "s_per_frame_per_step": round(wall / frames / args.inference_steps, 4),
            "output": list(video.shape),
            **({"same_frames_as_placed": bool((video == placed).all())} if offload else {}),
        }

    if "inference" not in args.skip:
        report.phase(f"inference: {frames} frames, CFG, {args.inference_steps} DDIM steps",
                     inference)  # fmt: skip
        report.phase("inference, model CPU offload", lambda: inference(offload=True))

    print("\n| phase | status | wall s | peak GPU GiB | s/step or s/frame |")
    print("| --- | --- | --- | --- | --- |")
    for r in report.rows:
        rate = r.get("s_per_step", r.get("s_per_frame", ""))
        peak = "" if r["peak_gpu_gb"] is None else r["peak_gpu_gb"]
        print(f"| {r['phase']} | {r['status']} | {r['wall_s']} | {peak} | {rate} |")
    if args.json:
        args.json.write_text(json.dumps(report.rows, indent=2))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
