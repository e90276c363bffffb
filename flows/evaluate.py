"""Stage ``evaluate``: self-attribute transfer on the validation split (held-out identities)
and cross-identity transfer with exact targets on synthetic portraits (metrics ``xid_*``);
L1/PSNR/SSIM over the whole frame, the attribute region and the identity region.

Writes ``metrics.json`` (a DVC metric), ``plots/metrics.json`` (per case, a DVC plot) and
``plots/preview.png`` (portrait | attribute | driving | output | target), and logs them to an
MLflow run linked to the training run.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from prefect import flow, get_run_logger

from durian.config import EvaluateParams
from durian.data.clip import decode_clip
from durian.evaluation.cases import (
    EvalCase,
    case_metrics,
    motion_error,
    preview_row,
    self_transfer_case,
)
from durian.pipelines.pipeline_durian import DurianPipeline
from flows.common import paths, read_params, run_main, write_json
from flows.mlflow_adapter import start_run
from preprocessing.faces import FaceAnalyzer
from preprocessing.shards import list_shards
from preprocessing.synthetic.eval_cases import cross_identity_cases


def load_pipeline(model_dir: Path) -> DurianPipeline:
    from durian.models.durian_model import DurianModel
    from durian.models.profiles import make_noise_scheduler

    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"no trained model in {model_dir}: run the train stage first")
    model = DurianModel.from_pretrained(str(model_dir)).eval()
    pipe = DurianPipeline(model=model, scheduler=make_noise_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def run_cases(
    pipe: DurianPipeline, cases: list[EvalCase], e: EvaluateParams, kind: str,
    analyzer: FaceAnalyzer,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Animate every case; per-case metrics (motion error from landmarks detected on the output
    by mediapipe, as on the driving video) and preview rows."""
    per_case, rows = [], []
    for i, case in enumerate(cases):
        generator = torch.Generator().manual_seed(e.seed + i)
        output = pipe(
            case.portrait, case.portrait_mask, case.attribute, case.attribute_mask,
            case.keypoints, num_inference_steps=e.steps, guidance_scale=e.guidance,
            generator=generator, window=None,
        ).frames
        motion = motion_error(case, output_landmarks(analyzer, output, 12.0), output.shape[1])
        per_case.append({"case": len(per_case), "set": kind, "key": case.key,
                         "category": case.category, **case_metrics(case, output),
                         "motion_error": motion})
        rows.append(preview_row(case, output))
    return per_case, rows


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


@flow(name="evaluate")
def evaluate_flow() -> dict[str, float]:
    log = get_run_logger()
    params = read_params()
    e = params.evaluate
    p = paths()
    split = "val"
    shards = list_shards(p.shards, split="val")
    if not shards:
        # A tiny sample can put every identity in train; say so rather than pretend.
        split, shards = "train", list_shards(p.shards, split="train")
        log.warning("evaluate: no validation shards; evaluating on train (not held out)")
    cases = evaluation_cases(shards, e.num_cases, frames=4)
    if not cases:
        raise ValueError(f"no evaluation case with an attribute in {len(shards)} {split} shards")
    pipe = load_pipeline(p.model)
    xid_cases = cross_identity_cases(
        e.cross_identity_cases, params.preprocess.resolution, params.preprocess.margin, e.seed
    )
    with FaceAnalyzer() as analyzer:
        per_case, rows = run_cases(pipe, cases, e, "self", analyzer)
        xid_per_case, xid_rows = run_cases(pipe, xid_cases, e, "xid", analyzer)
    metrics = mean_metrics(per_case)
    metrics |= {f"xid_{k}": v for k, v in mean_metrics(xid_per_case).items()}
    metrics |= {"num_cases": len(cases), "num_xid_cases": len(xid_cases)}
    if "motion_error" not in metrics:
        log.warning("evaluate: no face found in any output: motion_error is missing")
    per_case += xid_per_case
    write_json(p.metrics, metrics)
    write_json(p.plots / "metrics.json", {"cases": per_case})
    p.plots.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows + xid_rows, axis=0)).save(p.plots / "preview.png")

    train_run = None
    if p.train_info.exists():
        train_run = json.loads(p.train_info.read_text()).get("mlflow_run_id")
    tags = {"stage": "evaluate", "eval_split": split}
    if train_run:
        tags["training_run_id"] = train_run
    with start_run("evaluate", tags=tags) as run:
        mlflow.log_params({**e.model_dump(), "eval_set_hash": content_hash(cases + xid_cases),
                           "split": split})
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        mlflow.log_artifact(str(p.plots / "preview.png"))
        mlflow.log_artifact(str(p.plots / "metrics.json"))
    table = "\n".join(f"  {k:<12} {v:.4f}" for k, v in metrics.items())
    log.info("evaluate (%s, %d cases, run %s):\n%s", split, len(cases), run.info.run_id, table)
    write_json(p.root / "models" / "evaluate.json", {"mlflow_run_id": run.info.run_id})
    return metrics


if __name__ == "__main__":
    run_main(evaluate_flow)
