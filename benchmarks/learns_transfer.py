"""Does our implementation of the method learn cross-identity attribute transfer? Prints
numbers against exact ground truth; asserts nothing.

    python benchmarks/learns_transfer.py [--params params/learns_transfer.yaml]
        [--set SECTION.KEY=VALUE ...] [--steps N] [--out DIR] [--train-videos 640]
        [--frames 16] [--eval-cases 24] [--sample-steps 1 4 20]
        [--variants durian unmasked shared] [--init-from DIR] [--jobs 0] [--device cpu]
        [--data DIR] [--quick]

The recipe (model, training pairs, optimisation, crop and mask-bank settings) is the params
file, ``params/learns_transfer.yaml``: the same file ``durian run`` trains from, through the same
``Trainer.from_config`` (the saved models record its config hash). ``--set`` overrides a value of
it (``--set model.pixel_downscale=2 --set train.timestep_bias=none``); what the benchmark's
options set is its own: the synthetic data, the variants, the evaluation.

1. Generates synthetic portrait videos (``synthetic``: random identities with
   hair / glasses / hats / beards under random motion), crops them with the preprocessing crop
   rule (exact labels and landmarks), writes WebDataset shards and a mask bank — the same data
   path as the pipeline.
2. Trains the tiny model (stage 1, self-reconstruction with complementary masks, mask expansion
   and augmentation of the references: colour jitter and a random affine, ``pair`` in the
   params file) for a fixed number of steps per variant, on this machine's CPU cores,
   the variants side by side in their own processes (``--jobs``):
   * ``durian``: the method, the params file's recipe as it is;
   * ``unmasked`` (c): references not masked (``pair.mask_references: false``) — the paper's
     copy-paste shortcut ablation;
   * ``shared`` (d): one ReferenceNet on the channel-concatenated references
     (``model.shared_reference_net: true``).
3. Evaluates cross-identity transfer on held-out identities (portrait of X, attribute of Y,
   driving motion; the exact target is X wearing Y's attribute, rendered by the generator):
   L1 / PSNR / SSIM over the whole frame, the attribute region (``_attr``) and the identity
   region (``_id``), for the variants and the baselines
   * (a) ``no_attribute``: the trained Durian model with the attribute reference dropped;
   * (b) ``copy_paste``: the attribute pixels pasted into the portrait, both warped to each
     driving frame by the landmark similarity (training-free).

A denoising check prints, per variant, the L1 of the model's one-step x0 estimate from the
held-out targets noised to t (50, 200, 500, 900) next to that of the rescaled noisy input: a
model that cannot beat the noisy input at a noise level will not sample clean frames.

Every model is sampled with each ``--sample-steps`` DDIM step count, trailing spacing (the
first step at t=999; a short-trained diffusion model often scores better with fewer steps, and
one step is the tiny model's x0 estimate from pure noise; every method gets the same counts).
Calibration rows (not methods) put the numbers in scale: the exact target blurred by σ = 1, 2,
3 px; Durian's output smoothed by σ = 1 px (the SSIM this gains is high-frequency noise in the
output, not blur); and Durian's output averaged over 4 initial noises (the SSIM its sample's
dependence on the sampling noise costs: the one-step x0 estimate of an exact model would hardly
depend on it).

Writes ``results.json`` (metrics, per-case numbers, loss curves, denoising check, calibration,
timings), ``samples_ddim<N>.png`` (rows: portrait | attribute | driving | each method |
target) and the trained models (``models/<variant>``, pipeline folders) to ``--out``. The
budget is a step count, so results do not depend on machine load; the wall time of each
phase is printed.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_PARAMS = ROOT / "params" / "learns_transfer.yaml"
SOURCE_SIZE = 128
METRIC_KEYS = ("psnr_attr", "ssim", "psnr", "l1", "l1_attr", "ssim_attr", "psnr_id", "l1_id")


# ----------------------------------------------------------------------------- data
def make_training_shards(
    out: Path, n_videos: int, n_frames: int, seed: int, rule: Any
) -> tuple[list, list]:
    """Synthetic videos → clips cropped by the params' ``preprocess`` rule → shards (64 clips
    each). Returns (shards, clips)."""
    import webdataset as wds

    from durian.data.clip_codec import Clip, encode_clip
    from preprocessing.crop import process_clip
    from synthetic.sample import synthetic_clip

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    clips, shards = [], []
    for i in range(n_videos):
        frames, labels, landmarks, _ = synthetic_clip(i, n_frames, SOURCE_SIZE, seed)
        crop = process_clip(
            frames, fps=12, size=rule.resolution, margin=rule.margin,
            min_face_size=rule.min_face_size, parser=None,
            analyzer=None, ground_truth={"landmarks": landmarks, "parsing": labels},
        )  # fmt: skip
        meta = {"identity": f"train{i:04d}", "video_id": f"train{i:04d}", "fps": 12}
        clips.append(Clip(crop.frames, crop.parsing, crop.landmarks, meta))
    per_shard = 64
    for s in range(0, n_videos, per_shard):
        path = shard_dir / f"train-{s // per_shard:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j, clip in enumerate(clips[s : s + per_shard]):
                sink.write(encode_clip(f"train{s + j:04d}", clip))
        shards.append(str(path))
    return shards, clips


DATA_INDEX = "data.json"


def save_data(out: Path, shards: list[str], bank: Path, cases: list) -> None:
    """Record the generated data (shards, mask bank, evaluation cases) for ``--data``."""
    with open(out / "eval_cases.pkl", "wb") as f:
        pickle.dump(cases, f)
    index = {"shards": [str(Path(s).relative_to(out)) for s in shards],
             "mask_bank": str(bank.relative_to(out)), "eval_cases": "eval_cases.pkl"}  # fmt: skip
    (out / DATA_INDEX).write_text(json.dumps(index, indent=2))


def load_data(folder: Path) -> tuple[list[str], Path, list]:
    """The data an earlier run saved (e.g. generated on a CPU machine for a GPU one that lacks
    mediapipe, which the synthetic renderer needs)."""
    index = json.loads((folder / DATA_INDEX).read_text())
    with open(folder / index["eval_cases"], "rb") as f:
        cases = pickle.load(f)  # our own file, written by save_data
    return [str(folder / s) for s in index["shards"]], folder / index["mask_bank"], cases


def make_eval_cases(n: int, seed: int, crop: Any) -> list:
    from flows.eval_cases import cross_identity_cases

    # A seed far from the training videos': every evaluated identity is unseen.
    return cross_identity_cases(n, crop.resolution, crop.margin, seed + 100_003,
                                source_size=SOURCE_SIZE)


# ----------------------------------------------------------------------------- training
def variant_recipe(recipe: Any, variant: str, init_from: Path | None = None) -> Any:
    """A variant's recipe: ``durian`` is ``recipe`` as it is, ``unmasked`` without masked
    references, ``shared`` with one ReferenceNet; with ``init_from`` (an earlier ``--out``) each
    continues from its saved model (its EMA weights; optimiser and EMA start afresh)."""
    model, pair, train = recipe.model, recipe.pair, recipe.train
    if variant == "shared":
        model = model.model_copy(update={"shared_reference_net": True})
    if variant == "unmasked":
        pair = pair.model_copy(update={"mask_references": False})
    if init_from is not None:  # train further: a longer budget without starting over
        train = train.model_copy(update={"init_from": str(init_from / "models" / variant)})
    return recipe.model_copy(update={"model": model, "pair": pair, "train": train})


def train_variant(
    variant: str, recipe: Any, shards: list[str], bank: Path | None, out: Path,
    device: str = "cpu", threads: int = 1, init_from: Path | None = None,
) -> dict[str, Any]:
    """Train one variant of ``recipe`` with the pipeline's trainer and save it to
    ``out/models/<variant>`` with its recipe (run in its own process)."""
    import torch
    from tqdm import tqdm

    import flows  # noqa: F401  - offline environment variables (a fresh process)
    from durian.pipelines.pipeline_durian import save_durian_pipeline
    from durian.training.config import save_recipe
    from durian.training.loop import Trainer

    torch.set_num_threads(threads)
    recipe = variant_recipe(recipe, variant, init_from)
    trainer = Trainer.from_config(recipe, shards, bank, device=device)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(trainer.steps(), total=trainer.total_steps, desc=f"train {variant}",
               mininterval=30)  # fmt: skip
    for stats in bar:
        losses.append(stats["loss"])
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    wall = time.perf_counter() - start
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.model)
    folder = out / "models" / variant
    save_durian_pipeline(trainer.model, folder)  # what durian run exports
    save_recipe(folder, recipe)
    window = max(1, min(100, len(losses) // 10))
    curve = [float(np.mean(losses[i : i + window])) for i in range(0, len(losses), window)]
    return {"train_s": wall, "loss_curve": curve, "loss_window": window,
            "final_loss": curve[-1] if curve else float("nan"),
            "config_hash": trainer.config_hash}


def train_all(shards: list[str], bank: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Every variant, ``args.jobs`` at a time in separate processes (each with its share of
    ``args.threads``): on 2 cores two single-threaded trainings do ~30% more steps per second
    than one two-threaded one. Same seeds and step counts either way."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, args.threads // args.jobs)
    recipe = args.settings.recipe()
    common = (shards, bank, args.out, args.device, threads, args.init_from)
    if args.jobs == 1:
        return {v: train_variant(v, recipe, *common) for v in args.variants}
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = {v: pool.submit(train_variant, v, recipe, *common) for v in args.variants}
        return {v: f.result() for v, f in futures.items()}


def load_variant(out: Path, variant: str, device: str = "cpu") -> Any:
    from durian.pipelines.pipeline_durian import load_model

    return load_model(out / "models" / variant).to(device).eval()


# ----------------------------------------------------------------------------- evaluation
def run_model(model: Any, cases: list, args: argparse.Namespace, steps: int, *,
              unmasked: bool = False, drop_attribute: bool = False,
              seed: int | None = None) -> list[np.ndarray]:
    import torch

    from durian.models.profiles import make_noise_scheduler
    from durian.pipelines.pipeline_durian import DurianPipeline

    # The pipeline applies the model's own settings (parameterisation; a zero-terminal-SNR
    # model is always sampled trailing) over this scheduler.
    scheduler = make_noise_scheduler("ddim", timestep_spacing=args.timestep_spacing)
    pipe = DurianPipeline(model=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    outputs = []
    for case in cases:
        full = np.ones(case.portrait.shape[:2], bool)
        outputs.append(
            pipe(
                case.portrait,
                ~full if unmasked else case.portrait_mask,  # unmasked: nothing removed …
                case.attribute,
                full if unmasked else case.attribute_mask,  # … and everything kept
                case.keypoints,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(args.seed if seed is None else seed),
                drop_attribute=drop_attribute,
            ).frames
        )
    return outputs


def case_batch(case: Any, unmasked: bool = False) -> dict[str, Any]:
    """An evaluation case in the training batch contract (durian/training/step.py); with
    ``unmasked`` the references as the shortcut ablation sees them (whole, no masks)."""
    import torch

    def img(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).float().movedim(-1, -3) / 127.5 - 1

    def mask(m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(m.astype(np.float32))[None, None]

    port_mask = np.zeros_like(case.portrait_mask) if unmasked else case.portrait_mask
    attr_mask = np.ones_like(case.attribute_mask) if unmasked else case.attribute_mask
    return {
        "target": img(case.target)[None],
        "identity_ref": img(np.where(port_mask[..., None], 0, case.portrait))[None],
        "identity_mask": mask(port_mask),
        "attribute_ref": img(np.where(attr_mask[..., None], case.attribute, 0))[None],
        "attribute_mask": mask(attr_mask),
        "keypoints": torch.from_numpy(case.keypoints).float().movedim(-1, -3)[None] / 255,
    }


DENOISE_TIMESTEPS = (50, 200, 500, 900)


def denoising_check(model: Any, cases: list, unmasked: bool = False) -> dict[str, float]:
    """Mean L1 (in [0, 1] units) of the one-step x0 estimate from the exact target noised to
    t, on the held-out cases: how far the model is from denoising at each noise level. The
    ``identity`` numbers are what returning the rescaled noisy input would score."""
    import torch

    from durian.models.profiles import noise_scheduler_for
    from durian.training.preview import predict_x0

    sched = noise_scheduler_for(model)
    out: dict[str, float] = {}
    for t in DENOISE_TIMESTEPS:
        a = float(sched.alphas_cumprod[t])
        errs, trivial = [], []
        for i, case in enumerate(cases):
            batch = case_batch(case, unmasked)
            target = batch["target"]
            with torch.no_grad():
                x0 = predict_x0(model, sched, batch, t, seed=i)
            errs.append(float((x0.cpu().clamp(-1, 1) - target).abs().mean() / 2))
            noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(i))
            noisy = (target * a**0.5 + noise * (1 - a) ** 0.5) / a**0.5
            trivial.append(float((noisy.clamp(-1, 1) - target).abs().mean() / 2))
        out[f"x0_l1_t{t}"] = float(np.mean(errs))
        out[f"identity_l1_t{t}"] = float(np.mean(trivial))
    return out


def score(cases: list, outputs: list[np.ndarray]) -> dict[str, Any]:
    from durian.evaluation.cases import case_metrics

    per_case = [case_metrics(c, o) for c, o in zip(cases, outputs, strict=True)]
    mean = {k: float(np.nanmean([m[k] for m in per_case])) for k in per_case[0]}
    return {"mean": mean, "per_case": per_case}


BLUR_SIGMAS = (1.0, 2.0, 3.0)


def blurred(frames: np.ndarray, sigma: float) -> np.ndarray:
    import cv2

    return np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in frames])


def target_blur_rows(cases: list) -> dict[str, dict[str, float]]:
    """Calibration, not a method: the exact target Gaussian-blurred by σ px (what pure blur
    costs). The same for every sampling step count."""
    return {f"target_blur{s:g}": score(cases, [blurred(c.target, s) for c in cases])["mean"]
            for s in BLUR_SIGMAS}


NOISE_DRAWS = 4


def noise_averaged(model: Any, cases: list, args: argparse.Namespace, steps: int,
                   first: list[np.ndarray]) -> list[np.ndarray]:
    """Durian's outputs averaged over ``NOISE_DRAWS`` initial noises (``first`` is the seed-
    ``args.seed`` one already sampled)."""
    draws = [first] + [run_model(model, cases, args, steps, seed=args.seed + k)
                       for k in range(1, NOISE_DRAWS)]
    return [np.mean([d[i].astype(np.float32) for d in draws], axis=0).round().astype(np.uint8)
            for i in range(len(cases))]


def durian_calibration_rows(cases: list, durian: list[np.ndarray] | None,
                  averaged: list[np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Calibration, not methods: Durian's output smoothed by σ=1 px (how much of its error is
    high-frequency noise rather than wrong content), and averaged over ``NOISE_DRAWS`` initial
    noises (how much is the sample's dependence on the sampling noise: with one DDIM step the
    output is the model's x0 estimate from pure noise, which an exact model would make almost
    independent of that noise, as √ᾱ at t=999 is 0.07)."""
    rows = {}
    if durian is not None:
        rows["durian_smoothed1"] = score(cases, [blurred(o, 1.0) for o in durian])["mean"]
    if averaged is not None:
        rows[f"durian_noise_mean{NOISE_DRAWS}"] = score(cases, averaged)["mean"]
    return rows


def sample_grid(cases: list, outputs: dict[str, list[np.ndarray]], n: int) -> np.ndarray:
    """Rows: portrait (masked) | attribute (masked) | driving | each method | target."""
    rows = []
    for i, case in enumerate(cases[:n]):
        tiles = [
            case.portrait * (~case.portrait_mask[..., None]),
            case.attribute * case.attribute_mask[..., None],
            case.keypoints[1],
            *(out[i][1] for out in outputs.values()),
            case.target[1],
        ]
        rows.append(np.concatenate([t.astype(np.uint8) for t in tiles], axis=1))
    return np.concatenate(rows, axis=0)


# ----------------------------------------------------------------------------- report
def print_table(results: dict[str, dict[str, float]]) -> None:
    print(f"\n{'method':<22}" + "".join(f"{k:>11}" for k in METRIC_KEYS))
    for name, m in results.items():
        print(f"{name:<22}" + "".join(f"{m[k]:>11.4f}" for k in METRIC_KEYS))


def verdict(results: dict[str, dict[str, float]]) -> list[str]:
    """The issue's target: Durian ahead of (a), (b), (c) on psnr_attr and on whole-frame ssim."""
    lines = []
    ours = results.get("durian")
    if ours is None:
        return ["durian not trained: no verdict"]
    for rival in ("a_no_attribute", "b_copy_paste", "c_unmasked", "d_shared"):
        if rival not in results:
            continue
        r = results[rival]
        ahead = [k for k in ("psnr_attr", "ssim") if ours[k] > r[k]]
        behind = [k for k in ("psnr_attr", "ssim") if k not in ahead]
        lines.append(
            f"durian vs {rival}: psnr_attr {ours['psnr_attr']:.3f} vs {r['psnr_attr']:.3f}, "
            f"ssim {ours['ssim']:.4f} vs {r['ssim']:.4f} -> "
            + ("ahead on both" if not behind else f"NOT ahead on {', '.join(behind)}")
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/learns_transfer"))
    p.add_argument("--train-videos", type=int, default=640,
                   help="synthetic training identities (one video each). With 160, a model "
                        "trained 4000 steps scored a 30%% higher loss on unseen identities than "
                        "on its own: identities, not frames, are what it must generalise over")
    p.add_argument("--frames", type=int, default=16, help="frames per training video")
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                   help="the recipe: model, pair, train, preprocess (crop) and mask_bank "
                        "sections of a params file (default: params/learns_transfer.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE",
                   help="override a value of the params file (YAML), repeatable: e.g. "
                        "--set model.pixel_downscale=2 --set pair.max_rotate=0")
    p.add_argument("--steps", type=int, default=None,
                   help="optimisation steps per variant (--set train.steps=N)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="an earlier --out: each variant continues from its saved model (its "
                   "EMA weights; optimiser and EMA start afresh), train.steps more steps")
    p.add_argument("--eval-cases", type=int, default=24)
    p.add_argument("--data", type=Path, default=None,
                   help="reuse the data an earlier --out wrote (its data.json: shards, mask "
                        "bank, evaluation cases); --train-videos, --frames and --eval-cases "
                        "are then that run's")  # fmt: skip
    p.add_argument("--sample-steps", type=int, nargs="+", default=[1, 4, 20],
                   help="DDIM steps; every method is sampled with each")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--timestep-spacing", default="trailing", choices=["leading", "trailing"],
                   help="DDIM timesteps; trailing starts at t=999, so --sample-steps 1 scores "
                        "the model's x0 estimate from pure noise")
    p.add_argument("--variants", nargs="+", default=["durian", "unmasked", "shared"],
                   choices=["durian", "unmasked", "shared"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="where training and sampling run (cuda on a GPU machine: the same "
                        "benchmark with a budget --steps a CPU cannot afford)")
    p.add_argument("--quick", action="store_true", help="a minutes-long smoke run")
    p.add_argument("--jobs", type=int, default=0,
                   help="variants trained at once, each in its own process (0: all)")
    args = p.parse_args()
    if args.quick:
        args.train_videos, args.steps, args.eval_cases, args.sample_steps = 16, 20, 4, [1, 4]
    args.jobs = min(args.jobs or len(args.variants), len(args.variants))

    import torch

    import flows  # noqa: F401  - offline environment variables
    from durian.data.masks import MaskBank, build_mask_bank
    from flows.params import load_params, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.steps is not None:
        overrides.setdefault("train", {})["steps"] = args.steps
    args.settings = settings = load_params(args.params, overrides)
    args.seed = settings.train.seed  # data, evaluation cases and sampling noise too
    from durian.evaluation.baselines import copy_paste_transfer

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    crop = settings.preprocess
    if args.data is not None:
        shards, bank_path, cases = load_data(args.data)
        bank = MaskBank.load(bank_path)
    else:
        shards, clips = make_training_shards(args.out, args.train_videos, args.frames, args.seed,
                                             crop)  # fmt: skip
        bank = build_mask_bank(clips, settings.mask_bank.per_category_limit,
                               np.random.default_rng(args.seed),
                               frames_per_clip=settings.mask_bank.frames_per_clip)  # fmt: skip
        bank_path = args.out / "mask_bank.npz"
        bank.save(bank_path)
        del clips
        cases = make_eval_cases(args.eval_cases, args.seed, crop)
        save_data(args.out, shards, bank_path, cases)
    timings["data_s"] = time.perf_counter() - t0
    print(f"data: {len(shards)} shards, {len(cases)} cross-identity cases "
          f"({', '.join(sorted({c.category for c in cases}))}), bank {bank.counts()}, "
          f"{timings['data_s']:.0f} s")

    # outputs[steps][method]: every sampled method at every DDIM step count.
    outputs: dict[int, dict[str, list[np.ndarray]]] = {s: {} for s in args.sample_steps}
    averaged: dict[int, list[np.ndarray]] = {}  # calibration: Durian over NOISE_DRAWS noises
    t1 = time.perf_counter()
    training = train_all(shards, bank_path, args)
    timings["train_s"] = time.perf_counter() - t1
    print(f"trained {', '.join(args.variants)} ({args.jobs} at a time): "
          f"{timings['train_s'] / 60:.1f} min", flush=True)
    for variant in args.variants:
        info = training[variant]
        model = load_variant(args.out, variant, args.device)
        t1 = time.perf_counter()
        label = {"durian": "durian", "unmasked": "c_unmasked", "shared": "d_shared"}[variant]
        for steps in args.sample_steps:
            outputs[steps][label] = run_model(model, cases, args, steps,
                                              unmasked=variant == "unmasked")
            if variant == "durian":
                outputs[steps]["a_no_attribute"] = run_model(model, cases, args, steps,
                                                             drop_attribute=True)
                averaged[steps] = noise_averaged(model, cases, args, steps,
                                                 outputs[steps]["durian"])
        info["denoising"] = denoising_check(model, cases, unmasked=variant == "unmasked")
        info["eval_s"] = time.perf_counter() - t1
        print(f"{variant}: one-step x0 L1 on held-out cases by t: " + ", ".join(
            f"t={t} {info['denoising'][f'x0_l1_t{t}']:.3f} (noisy input "
            f"{info['denoising'][f'identity_l1_t{t}']:.3f})" for t in DENOISE_TIMESTEPS))
        print(f"{variant}: {settings.train.steps} steps in {info['train_s']:.0f} s, final loss "
              f"{info['final_loss']:.4f}; sampling {info['eval_s']:.0f} s", flush=True)
    copy_paste = [copy_paste_transfer(c) for c in cases]
    blur_rows = target_blur_rows(cases)
    order = ["durian", "a_no_attribute", "b_copy_paste", "c_unmasked", "d_shared"]
    report: dict[str, Any] = {"results": {}, "by_category_psnr_attr": {}, "per_case": {},
                              "verdict": {}, "calibration": {}}
    for steps, outs in outputs.items():
        outs["b_copy_paste"] = copy_paste
        outs = {k: outs[k] for k in order if k in outs}
        outputs[steps] = outs
        scores = {k: score(cases, v) for k, v in outs.items()}
        results = {k: v["mean"] for k, v in scores.items()}
        print(f"\ncross-identity transfer, {len(cases)} held-out cases × "
              f"{cases[0].target.shape[0]} frames at {crop.resolution}px, DDIM {steps} steps "
              f"(copy-paste needs no sampling; mean over cases)")
        print_table(results)
        by_category: dict[str, dict[str, float]] = {}
        for name, s in scores.items():
            for cat in sorted({c.category for c in cases}):
                vals = [m["psnr_attr"] for c, m in zip(cases, s["per_case"], strict=True)
                        if c.category == cat]
                by_category.setdefault(cat, {})[name] = float(np.nanmean(vals))
        print("psnr_attr by category: " + "; ".join(
            f"{cat}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())
            for cat, row in by_category.items()))
        for line in verdict(results):
            print(line)
        key = f"ddim{steps}"
        report["results"][key] = results
        report["by_category_psnr_attr"][key] = by_category
        report["per_case"][key] = {k: v["per_case"] for k, v in scores.items()}
        report["verdict"][key] = verdict(results)
        report["calibration"][key] = blur_rows | durian_calibration_rows(cases, outs.get("durian"),
                                                                        averaged.get(steps))
        print("calibration (not methods): " + "; ".join(
            f"{k} {v['psnr_attr']:.2f} dB / {v['ssim']:.3f}"
            for k, v in report["calibration"][key].items()))
    timings["total_s"] = time.perf_counter() - t0
    print(f"\ntotal wall time {timings['total_s'] / 60:.1f} min")

    import cv2

    for steps, outs in outputs.items():
        grid = sample_grid(cases, outs, n=min(8, len(cases)))
        cv2.imwrite(str(args.out / f"samples_ddim{steps}.png"),
                    cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    own = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
           if k != "settings"}
    report |= {"args": own, "params": settings.model_dump(mode="json"),
               "config_hash": settings.recipe().config_hash(),
               "cases": [{"key": c.key, "category": c.category} for c in cases],
               "training": training, "timings": timings,
               "columns": ["portrait", "attribute", "driving", *next(iter(outputs.values())),
                           "target"]}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out / 'results.json'} and samples_ddim*.png")


if __name__ == "__main__":
    main()
