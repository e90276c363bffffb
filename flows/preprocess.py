"""Stage ``preprocess``: every clip of the manifest → face track → square crop → 478 landmarks
→ face parsing → one WebDataset sample; shards split by source video, plus a Parquet index.

One Prefect task per video (retried on I/O errors). With ``preprocess.runner: ray`` the
per-video work fans out as Ray tasks on the local or configured cluster instead.
Synthetic videos carry exact labels in ``<video>.gt.npz``; with ``trust_ground_truth`` they
are used instead of the detector and parser. A clip that fails is recorded with its reason
in ``data/shards/rejected.parquet``; the run goes on.
"""

from __future__ import annotations

import contextlib
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.futures import wait

from durian.data.clip import Clip, encode_clip
from durian.data.masks import category_fractions
from flows.common import paths, read_params, run_main
from preprocessing.faces import ClipRejected, FaceAnalyzer
from preprocessing.ingest import read_parquet, write_parquet
from preprocessing.parsing import load_parser
from preprocessing.process import process_clip
from preprocessing.shards import ShardWriter, assign_split, write_index
from preprocessing.video import VideoError, read_frames

REJECTED_SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("video_id", pa.string()), ("path", pa.string()),
     ("reason", pa.string()), ("detail", pa.string())]
)


def ground_truth_for(video: str, source_indices: np.ndarray, shape: tuple[int, int]):
    """The sidecar labels of a synthetic video for the decoded frames, or None."""
    sidecar = Path(video).with_suffix(".gt.npz")
    if not sidecar.exists():
        return None
    with np.load(sidecar) as gt:
        landmarks = gt["landmarks"][source_indices]
        parsing = gt["parsing"][source_indices]
    if parsing.shape[1:] != shape:
        return None  # decoded at another size (max_side): fall back to the detector
    return {"landmarks": landmarks, "parsing": parsing}


def process_video(clips: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, list]:
    """All clips of one video → encoded samples and rejections (plain data, picklable)."""
    samples, rejected = [], []
    with contextlib.ExitStack() as stack:
        parser = load_parser(cfg["parser"], cfg["parser_weights"])
        if hasattr(parser, "__exit__"):  # mediapipe-backed parsers hold native resources
            stack.enter_context(parser)
        analyzer = stack.enter_context(FaceAnalyzer())
        for clip in clips:
            base = {"clip_id": clip["clip_id"], "video_id": clip["video_id"], "path": clip["path"]}
            try:
                frames, source_indices = read_frames(
                    clip["path"], fps=clip["fps"], start=clip["start"], count=clip["num_frames"],
                    max_side=cfg["max_side"],
                )
                gt = (ground_truth_for(clip["path"], source_indices, frames.shape[1:3])
                      if cfg["trust_ground_truth"] else None)
                out = process_clip(
                    frames, fps=clip["fps"], size=cfg["resolution"], margin=cfg["margin"],
                    min_face_size=cfg["min_face_size"], parser=parser, analyzer=analyzer,
                    ground_truth=gt,
                )
            except ClipRejected as err:
                rejected.append({**base, "reason": err.reason, "detail": str(err)})
                continue
            except VideoError as err:
                rejected.append({**base, "reason": err.reason, "detail": str(err)})
                continue
            split = assign_split(clip["video_id"], cfg["val_fraction"], cfg["seed"])
            meta = {
                "source_video": clip["path"],
                "identity": clip["video_id"],
                "video_id": clip["video_id"],
                "clip_index": clip["clip_index"],
                "fps": clip["fps"],
                "num_frames": int(out.frames.shape[0]),
                "split": split,
                "attribute_fractions": category_fractions(out.parsing),
                **out.meta(),
            }
            sample = encode_clip(
                clip["clip_id"], Clip(out.frames, out.parsing, out.landmarks, meta), crf=cfg["crf"]
            )
            samples.append({"split": split, "sample": sample})
    return {"samples": samples, "rejected": rejected}


@task(name="preprocess-video", retries=2, retry_delay_seconds=1,
      task_run_name="preprocess {video_id}")
def preprocess_video(video_id: str, clips: list[dict[str, Any]], cfg: dict[str, Any]) -> dict:
    return process_video(clips, cfg)


def _run_on_ray(groups: dict[str, list], cfg: dict[str, Any], workers: int) -> list[dict]:
    import ray

    from flows.ray_adapter import init_ray

    init_ray(cfg.get("ray_address"), num_cpus=None)
    remote = ray.remote(num_cpus=1, max_retries=cfg["retries"])(process_video)
    refs = [remote.remote(clips, cfg) for clips in groups.values()]
    return ray.get(refs)


@flow(name="preprocess")
def preprocess_flow() -> dict[str, int]:
    log = get_run_logger()
    params = read_params()
    p = paths()
    if not p.clips_manifest.exists():
        raise FileNotFoundError(f"{p.clips_manifest} not found: run the ingest stage first")
    clips = read_parquet(p.clips_manifest)
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for clip in clips:
        groups[clip["video_id"]].append(clip)
    cfg = {
        **params.preprocess.model_dump(),
        "max_side": params.ingest.max_side,
        "val_fraction": params.shards.val_fraction,
        "seed": params.shards.seed,
        "crf": params.shards.crf,
        "ray_address": params.train.ray_address,
    }
    log.info("preprocess: %d clips of %d videos (runner %s)", len(clips), len(groups),
             params.preprocess.runner)
    if params.preprocess.runner == "ray":
        results = _run_on_ray(groups, cfg, params.preprocess.workers)
    else:
        futures = [preprocess_video.submit(vid, group, cfg) for vid, group in groups.items()]
        wait(futures)
        results = [f.result() for f in futures]

    # The stage owns data/shards: write a fresh set in a deterministic (key) order.
    if p.shards.exists():
        shutil.rmtree(p.shards)
    samples = sorted(
        (s for r in results for s in r["samples"]), key=lambda s: s["sample"]["__key__"]
    )
    rejected = [x for r in results for x in r["rejected"]]
    with ShardWriter(p.shards, max_count=params.shards.max_samples,
                     max_bytes=int(params.shards.max_mb * 2**20)) as writer:
        for s in samples:
            writer.write(s["sample"], split=s["split"])
    write_index(writer.records, p.shard_index)
    write_parquet(rejected, p.shards / "rejected.parquet", REJECTED_SCHEMA)
    summary = {"samples": len(samples), "rejected": len(rejected), "shards": len(writer.shards)}
    by_split: dict[str, int] = defaultdict(int)
    for r in writer.records:
        by_split[r["split"]] += 1
    summary |= {f"split_{k}": v for k, v in sorted(by_split.items())}
    by_reason: dict[str, int] = defaultdict(int)
    for r in rejected:
        by_reason[r["reason"]] += 1
    log.info("preprocess: %s; rejected by reason: %s", summary, dict(by_reason))
    return summary


if __name__ == "__main__":
    run_main(preprocess_flow)
