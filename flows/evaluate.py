"""Stage ``evaluate``: self-attribute transfer on the validation split (held-out identities)
and cross-identity transfer with exact targets on synthetic portraits (metrics ``xid_*``);
L1/PSNR/SSIM over the whole frame, the attribute region and the identity region, temporal
flicker, motion error, identity similarity to the portrait (``id_sim``), attribute similarity
on the attribute crop (``attr_*_sim``), and LPIPS / FID / FVD when their weights are in
``evaluate.metric_weights``.

A metric that cannot be measured (weights missing, no face found, …) is left out of the
numbers, never faked: its reason is logged, printed under the metrics table, tagged on the
MLflow run (``skipped.<metric>``) and kept in ``models/evaluate.json`` (``skipped``).

Writes ``metrics.json`` (a DVC metric), ``plots/metrics.json`` (per case, a DVC plot) and
``plots/preview.png`` (portrait | attribute | driving | output | target), and logs them to an
MLflow run linked to the training run, with a side-by-side MP4 per case (``videos/``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from prefect import flow, get_run_logger

from durian.data.clip_codec import decode_clip
from durian.evaluation.attribute import ClipImageEncoder, attribute_similarity
from durian.evaluation.cases import (
    EvalCase,
    case_metrics,
    motion_error,
    self_transfer_case,
    targets_at,
)
from durian.evaluation.identity import (
    FaceEmbedder,
    frame_subset,
    identity_similarity,
    make_embedder,
)
from durian.evaluation.perceptual import (
    PerceptualModels,
    frechet_distance_of,
    i3d_features,
    inception_features,
    load_perceptual,
)
from durian.evaluation.side_by_side import preview_row, side_by_side_frames
from durian.inference.errors import DurianInputError
from durian.inference.prepare import portrait_identity
from durian.models.config import identity_embedder_of
from durian.pipelines.pipeline_durian import DurianPipeline, load_durian_pipeline
from flows.eval_cases import cross_identity_cases
from flows.mlflow_adapter import start_run
from flows.params import EvaluateParams
from flows.project import paths, read_params, run_main, write_json
from flows.stop import report_progress
from preprocessing.faces import FaceAnalyzer
from preprocessing.shard_index import committed_shards
from preprocessing.video import write_video

FPS = 12.0  # of the evaluation videos (the sample data's rate)


def load_pipeline(model_dir: Path) -> DurianPipeline:
    from flows.model_store import ModelNotFoundError, resolve_model

    try:
        folder = resolve_model(model_dir)
    except ModelNotFoundError:
        raise FileNotFoundError(
            f"no trained model in {model_dir}: run the train stage first"
        ) from None
    pipe = load_durian_pipeline(folder)  # the GPU in half precision when there is one
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_png(image: np.ndarray, path: Path) -> None:
    """Atomic PNG write: a stopped run never leaves a truncated picture."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def evaluation_cases(shards: list[str], limit: int, frames: int) -> list:
    cases = []
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        case = self_transfer_case(decode_clip(sample), sample["__key__"], num_frames=frames)
        if case is not None:
            cases.append(case)
        if len(cases) >= limit:
            break
    return cases


def content_hash(cases: list) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(c.key.encode())
        h.update(c.portrait.tobytes())
        h.update(c.attribute.tobytes())
        h.update(c.target.tobytes())
    return h.hexdigest()[:16]


def output_landmarks(analyzer: FaceAnalyzer, frames: np.ndarray, fps: float) -> np.ndarray:
    """The largest face's landmarks per output frame (F×478×3), NaN where none was found."""
    out = np.full((len(frames), 478, 3), np.nan, np.float32)
    for i, faces in enumerate(analyzer.landmarks(frames, fps)):
        if len(faces):
            out[i] = max(faces, key=lambda f: np.ptp(f[:, 0]) * np.ptp(f[:, 1]))
    return out


@dataclass
class Evaluators:
    """The optional evaluators that could be set up; ``skipped`` says why each other is off."""

    perceptual: PerceptualModels
    embedder: FaceEmbedder | None = None
    # The face embedder whose embedding of the portrait the model reads (None: CLIP's own).
    model_identity: FaceEmbedder | None = None
    clip: ClipImageEncoder | None = None
    video_dir: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def _local(path: str | None, root: Path) -> Path | None:
    if path is None:
        return None
    return Path(path) if Path(path).is_absolute() else root / path


def load_evaluators(e: EvaluateParams, root: Path, video_dir: Path | None) -> Evaluators:
    """Load what params and the local files allow; never downloads anything."""
    perceptual = load_perceptual(_local(e.metric_weights, root), e.lpips_net)
    ev = Evaluators(perceptual=perceptual, video_dir=video_dir, skipped=dict(perceptual.skipped))
    if e.identity == "none":
        ev.skipped["id_sim"] = "evaluate.identity is none"
    else:
        try:
            ev.embedder = make_embedder(e.identity, _local(e.arcface_model, root))
        except Exception as err:  # noqa: BLE001 - a missing optional model only skips its metric
            ev.skipped["id_sim"] = f"{e.identity} face embedder unavailable: {err}"
    if e.clip_model is None:
        ev.skipped["attr_clip_sim"] = "evaluate.clip_model is not set (no local CLIP folder)"
    else:
        try:
            ev.clip = ClipImageEncoder(_local(e.clip_model, root))
        except Exception as err:  # noqa: BLE001
            ev.skipped["attr_clip_sim"] = f"CLIP image encoder unavailable: {err}"
    return ev


def model_identity_embedder(
    pipe: DurianPipeline, e: EvaluateParams, root: Path, metric: FaceEmbedder | None
) -> FaceEmbedder | None:
    """The embedder of the identity embedding the model reads (the id_sim metric's when it is
    the same kind); None for a model that embeds the portrait with CLIP. A model whose
    embedder cannot be had cannot be evaluated: that raises."""
    kind = identity_embedder_of(pipe.model.config)
    if kind is None:
        return None
    if metric is not None and metric.name == kind:
        return metric
    return make_embedder(kind, _local(e.arcface_model, root))


@dataclass
class SetFeatures:
    """Per-set features for FID (frames) and FVD (videos), output and target side."""

    fid: tuple[list[np.ndarray], list[np.ndarray]] = field(default_factory=lambda: ([], []))
    fvd: tuple[list[np.ndarray], list[np.ndarray]] = field(default_factory=lambda: ([], []))
    failed: dict[str, str] = field(default_factory=dict)


def optional_case_metrics(
    case: EvalCase,
    output: np.ndarray,
    ev: Evaluators,
    e: EvaluateParams,
    feats: SetFeatures,
) -> tuple[dict[str, float], dict[str, str]]:
    """Identity, attribute and LPIPS metrics of one case (and its FID/FVD features): the
    values, and for each value that is nan, why."""
    out: dict[str, float] = {}
    why: dict[str, str] = {}
    target, masks = targets_at(case, output.shape[1:3])
    if ev.embedder is not None:
        frames = output[frame_subset(len(output), e.identity_frames)]
        out["id_sim"], reason = identity_similarity(
            ev.embedder, ev.embedder.embed(case.portrait), frames
        )
        if reason:
            why["id_sim"] = reason
    out |= attribute_similarity(output, masks, case.attribute, case.attribute_mask, ev.clip)
    for k in ("attr_hist_sim", "attr_crop_ssim", "attr_clip_sim"):
        if k in out and math.isnan(out[k]):
            why[k] = "empty attribute mask (reference or target)"
    p = ev.perceptual
    if p.lpips is not None:
        out["lpips"] = float(np.mean(p.lpips.distance(output, target)))
    if p.inception is not None:
        feats.fid[0].append(inception_features(p.inception, output))
        feats.fid[1].append(inception_features(p.inception, target))
    if p.i3d is not None and "fvd" not in feats.failed:
        try:
            o, t = i3d_features(p.i3d, [output]), i3d_features(p.i3d, [target])
            feats.fvd[0].append(o)
            feats.fvd[1].append(t)
        except Exception as err:  # noqa: BLE001 - e.g. clips too short for I3D's pooling
            feats.failed["fvd"] = f"I3D failed on a {len(output)}-frame clip: {err}"
    return out, why


def set_metrics(feats: SetFeatures, ev: Evaluators) -> tuple[dict[str, float], dict[str, str]]:
    """FID over all frames and FVD over all videos of a set, or why each could not be had."""
    out: dict[str, float] = {}
    why = dict(feats.failed)
    for name, enabled, (gen, real), unit in (
        ("fid", ev.perceptual.inception is not None, feats.fid, "frames"),
        ("fvd", ev.perceptual.i3d is not None, feats.fvd, "videos"),
    ):
        if not enabled or name in why:
            continue
        gen_f = np.concatenate(gen) if gen else np.empty((0, 0))
        real_f = np.concatenate(real) if real else np.empty((0, 0))
        if len(gen_f) < 2:
            why[name] = f"needs at least 2 {unit}, the set has {len(gen_f)}"
            continue
        out[name] = frechet_distance_of(gen_f, real_f)
    return out, why


def run_cases(
    pipe: DurianPipeline,
    cases: list[EvalCase],
    e: EvaluateParams,
    kind: str,
    analyzer: FaceAnalyzer,
    ev: Evaluators,
) -> tuple[list[dict[str, Any]], list[np.ndarray], dict[str, float], dict[str, list[str]]]:
    """Animate every case; per-case metrics (motion error from landmarks detected on the output
    by mediapipe, as on the driving video), preview rows, the set's FID/FVD, and per metric
    the reasons it could not be measured (one per case or set that lacks it). Writes a
    side-by-side MP4 per case into ``ev.video_dir``."""
    per_case, rows = [], []
    feats = SetFeatures()
    reasons: dict[str, list[str]] = {}
    skipped_cases = ""
    for i, case in enumerate(cases):
        identity = None
        if ev.model_identity is not None:
            try:
                identity = torch.from_numpy(
                    portrait_identity(ev.model_identity, case.portrait, "portrait")
                )
            except DurianInputError as err:
                skipped_cases = f"left out: {err}"
                continue
        generator = torch.Generator().manual_seed(e.seed + i)
        output = pipe(
            case.portrait,
            case.portrait_mask,
            case.attribute,
            case.attribute_mask,
            case.keypoints,
            num_inference_steps=e.steps,
            guidance_scale=e.guidance,
            generator=generator,
            window=None,
            identity_embedding=identity,
        ).frames
        motion = motion_error(case, output_landmarks(analyzer, output, FPS), output.shape[1])
        extra, why = optional_case_metrics(case, output, ev, e, feats)
        for k, r in why.items():
            reasons.setdefault(k, []).append(r)
        per_case.append(
            {
                "case": len(per_case),
                "set": kind,
                "key": case.key,
                "category": case.category,
                **case_metrics(case, output),
                "motion_error": motion,
                **extra,
            }
        )
        rows.append(preview_row(case, output))
        if ev.video_dir is not None:
            write_video(
                ev.video_dir / f"{kind}_{i:03d}_{case.key}.mp4",
                side_by_side_frames(case, output),
                FPS,
            )
    if skipped_cases:  # one fixed reason, so skip_reasons counts the cases
        reasons["cases"] = [skipped_cases] * (len(cases) - len(per_case))
    set_values, set_why = set_metrics(feats, ev)
    for k, r in set_why.items():
        reasons.setdefault(k, []).append(r)
    return per_case, rows, set_values, reasons


def skip_reasons(
    measured: dict[str, float], reasons: dict[str, list[str]], prefix: str = ""
) -> dict[str, str]:
    """Why each metric missing from ``measured`` is missing: its distinct reasons with counts."""
    out = {}
    for k, rs in reasons.items():
        if k in measured:
            continue
        out[f"{prefix}{k}"] = "; ".join(
            f"{r} ({n} cases)" if n > 1 else r for r, n in Counter(rs).items()
        )
    return out


def mean_metrics(per_case: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over cases. inf PSNR (identical frames) is capped at 100 dB so JSON stays valid; a
    metric no case could measure (e.g. no face found in any output) is left out, not faked."""
    if not per_case:
        return {}
    keys = [k for k, v in per_case[0].items() if k != "case" and isinstance(v, float)]
    means = {}
    for k in keys:
        values = np.array([c[k] for c in per_case], dtype=np.float64)
        if np.isnan(values).all():
            continue
        v = float(np.nanmean(values))
        means[k] = 100.0 if math.isinf(v) else v
    return means


def metrics_table(metrics: dict[str, float], skipped: dict[str, str]) -> str:
    """The printed table: every number, then every skipped metric with its reason."""
    lines = [f"  {k:<20} {v:.4f}" for k, v in metrics.items()]
    lines += [f"  {k:<20} skipped: {r}" for k, r in sorted(skipped.items())]
    return "\n".join(lines)


@flow(name="evaluate")
def evaluate_flow() -> dict[str, float]:
    log = get_run_logger()
    params = read_params()
    e = params.evaluate
    p = paths()
    split = "val"
    shards = committed_shards(p.shards, split="val")
    if not shards:
        # A tiny sample can put every identity in train; say so rather than pretend.
        split, shards = "train", committed_shards(p.shards, split="train")
        log.warning("evaluate: no validation shards; evaluating on train (not held out)")
    cases = evaluation_cases(shards, e.num_cases, frames=e.frames)
    if not cases:
        raise ValueError(f"no evaluation case with an attribute in {len(shards)} {split} shards")
    pipe = load_pipeline(p.model)
    xid_cases = cross_identity_cases(
        e.cross_identity_cases, params.preprocess.resolution, params.preprocess.margin, e.seed
    )
    with tempfile.TemporaryDirectory(prefix="durian-eval-") as tmp:
        video_dir = Path(tmp) / "videos" if e.videos else None
        ev = load_evaluators(e, p.root, video_dir)
        ev.model_identity = model_identity_embedder(pipe, e, p.root, ev.embedder)
        with FaceAnalyzer() as analyzer:
            per_case, rows, set_values, reasons = run_cases(pipe, cases, e, "self", analyzer, ev)
            xid_per_case, xid_rows, xid_set_values, xid_reasons = run_cases(
                pipe, xid_cases, e, "xid", analyzer, ev
            )
        self_means = mean_metrics(per_case) | set_values
        xid_means = mean_metrics(xid_per_case) | xid_set_values
        metrics = dict(self_means)
        metrics |= {f"xid_{k}": v for k, v in xid_means.items()}
        metrics |= {"num_cases": len(per_case), "num_xid_cases": len(xid_per_case)}
        # Skips: the metrics nothing could compute, then per set those no case could measure.
        skipped = dict(ev.skipped)
        skipped |= skip_reasons(self_means, reasons)
        if xid_cases:
            skipped |= skip_reasons(xid_means, xid_reasons, prefix="xid_")
        for prefix, means, n in (("", self_means, len(cases)), ("xid_", xid_means, len(xid_cases))):
            if n and "motion_error" not in means:
                skipped[f"{prefix}motion_error"] = "mediapipe found no face in any output frame"
        for k, r in sorted(skipped.items()):
            log.warning("evaluate: %s skipped: %s", k, r)
        per_case += xid_per_case
        # Each file whole (hidden temporary, then renamed); metrics.json, the DVC metric the
        # next stage reads, last.
        write_json(p.plots / "metrics.json", {"cases": per_case})
        save_png(np.concatenate(rows + xid_rows, axis=0), p.plots / "preview.png")
        write_json(p.metrics, metrics)
        report_progress(f"metrics in {p.metrics}, plots in {p.plots}; MLflow run not logged")

        train_run = None
        if p.train_info.exists():
            train_run = json.loads(p.train_info.read_text()).get("mlflow_run_id")
        tags = {"stage": "evaluate", "eval_split": split}
        tags |= {f"skipped.{k}": r for k, r in skipped.items()}
        if train_run:
            tags["training_run_id"] = train_run
        with start_run("evaluate", tags=tags) as run:
            mlflow.log_params(
                {**e.model_dump(), "eval_set_hash": content_hash(cases + xid_cases), "split": split}
            )
            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
            mlflow.log_artifact(str(p.plots / "preview.png"))
            mlflow.log_artifact(str(p.plots / "metrics.json"))
            if video_dir is not None and video_dir.is_dir():
                mlflow.log_artifacts(str(video_dir), artifact_path="videos")
    log.info(
        "evaluate (%s, %d cases, run %s):\n%s",
        split,
        len(cases),
        run.info.run_id,
        metrics_table(metrics, skipped),
    )
    write_json(
        p.root / "models" / "evaluate.json", {"mlflow_run_id": run.info.run_id, "skipped": skipped}
    )
    report_progress(f"metrics in {p.metrics}, MLflow run {run.info.run_id}")
    return metrics


if __name__ == "__main__":
    run_main(evaluate_flow)
