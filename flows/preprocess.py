"""Stage ``preprocess``: every clip of the manifest → face track → square crop → 478 landmarks
→ face parsing → identity embedding → one WebDataset sample; shards split by source video, plus
a Parquet index.

The identity embedding (``preprocess.identity_embedder``: dlib, arcface:<onnx path> or none) is
computed on one frame of the crop (:func:`preprocessing.identity.clip_identity`: the middle
one, else the next tried frame where the embedder finds a face) and stored as ``identity.npy``;
a clip where no tried frame shows a face still lands, without it (``identity_frame`` None in
its ``json``; counted as ``identity_missing`` in the summary).

One Prefect task per video (retried ``preprocess.retries`` times on I/O errors, with backoff;
at most ``preprocess.workers`` at a time; cached on the video's content + clips + params).
With ``preprocess.runner: ray`` the same per-video work fans out as Ray tasks on the local or
configured cluster instead, retried as often by Ray.
Synthetic videos carry exact labels in ``<video>.gt.npz``; with ``trust_ground_truth`` they
are used instead of the detector and parser. A clip that is rejected (no face, two faces, face
too small, undecodable) is recorded with its reason in ``data/shards/rejected.parquet``; the
run goes on. A video whose task fails after its retries is counted as failed and retried by the
next run.

Incremental and resumable (``preprocess.incremental``, default; the rule is in
:mod:`preprocessing.incremental`): only clips not yet in the index (nor rejected) are
processed; their samples go into new shards numbered after the existing ones, which stay
untouched. Samples are flushed in whole shards as results arrive, each flush followed by an
atomic rewrite of the index, so a run killed at any point (SIGKILL included) loses at most the
unflushed work, which the next run redoes (from the task cache when it was computed) with no
duplicate: keys already in the index are never written again. Partial (``.partial``) and
unlisted shards of a killed run are removed first. A change of the sample-shaping params or of
the preprocessing code (the fingerprint in ``state.json``) rebuilds the shards from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger, task

import durian.data.clip_codec as clip_lib
import durian.data.masks as masks_lib
import preprocessing.crop as process_lib
import preprocessing.faces as faces_lib
import preprocessing.identity as identity_lib
import preprocessing.parsing as parsing_lib
import preprocessing.shards as shards_lib
import preprocessing.video as video_lib
from durian.data.clip_codec import Clip, encode_clip
from durian.data.masks import category_fractions
from flows.locks import file_lock, lock_path
from flows.project import paths, read_params, run_main, write_json
from flows.retries import with_retries
from flows.stop import report_progress, stop_deferred
from preprocessing.crop import process_clip
from preprocessing.faces import ClipRejected, FaceAnalyzer
from preprocessing.identity import clip_identity, embedder_for, parse_embedder_spec
from preprocessing.incremental import (
    fingerprint,
    orphan_shards,
    pending_clips,
    read_state,
    write_state,
)
from preprocessing.ingest import read_parquet, write_parquet
from preprocessing.parsing import load_parser, parser_agreement, summarize_agreement
from preprocessing.shards import ShardWriter, assign_split, clean_partial_shards, read_index
from preprocessing.shards import write_index as write_shard_index
from preprocessing.video import VideoError, read_frames

REJECTED_SCHEMA = pa.schema(
    [("clip_id", pa.string()), ("video_id", pa.string()), ("path", pa.string()),
     ("reason", pa.string()), ("detail", pa.string())]
)
# cfg keys that do not change a sample: left out of the fingerprint and the task cache key.
NOT_IN_FINGERPRINT = frozenset(
    {"runner", "workers", "retries", "ray_address", "incremental", "parser_check"}
)
CODE = [clip_lib.__file__, masks_lib.__file__, faces_lib.__file__, parsing_lib.__file__,
        process_lib.__file__, video_lib.__file__, shards_lib.__file__, identity_lib.__file__]


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
    """All clips of one video → encoded samples, rejections and, for clips with exact labels
    and ``parser_check``, the parser's per-class IoU against them (plain data, picklable)."""
    samples, rejected, agreement = [], [], []
    with contextlib.ExitStack() as stack:
        parser = load_parser(cfg["parser"], cfg["parser_weights"])
        if hasattr(parser, "__exit__"):  # mediapipe-backed parsers hold native resources
            stack.enter_context(parser)
        analyzer = stack.enter_context(FaceAnalyzer())
        embedder = embedder_for(cfg["identity_embedder"])
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
                    second_face_min_ratio=cfg["second_face_min_ratio"],
                    second_face_min_fraction=cfg["second_face_min_fraction"],
                )
            except (ClipRejected, VideoError) as err:
                rejected.append({**base, "reason": err.reason, "detail": str(err)})
                continue
            if gt is not None and cfg.get("parser_check"):
                predicted = parser.parse(out.frames, out.landmarks)
                agreement.append({**base, "parser": parser.name,
                                  "iou": parser_agreement(predicted, out.parsing)})
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
            identity = None
            if embedder is not None:
                identity, meta["identity_frame"] = clip_identity(out.frames, embedder)
                meta["identity_embedder"] = embedder.name
            sample = encode_clip(
                clip["clip_id"], Clip(out.frames, out.parsing, out.landmarks, meta, identity),
                crf=cfg["crf"],
            )
            samples.append({"split": split, "sample": sample,
                            "identity_missing": embedder is not None and identity is None})
    return {"samples": samples, "rejected": rejected, "agreement": agreement}


def identity_setting(spec: str, root: Path) -> str:
    """``preprocess.identity_embedder`` with an ArcFace model path made absolute (relative
    paths are the project's), so every worker reads the same file."""
    kind, path = parse_embedder_spec(spec)
    if path is None or Path(path).is_absolute():
        return spec
    return f"{kind}:{root / path}"


def preprocess_fingerprint(cfg: dict[str, Any]) -> str:
    return fingerprint({k: v for k, v in cfg.items() if k not in NOT_IN_FINGERPRINT}, CODE)


def _video_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    # video_id is the content hash of the file; the clip rows fix the frames taken from it.
    clips = json.dumps(parameters["clips"], sort_keys=True, default=str)
    text = "\0".join([parameters["video_id"], clips, parameters["cfg"]["fingerprint"]])
    return "preprocess-" + hashlib.sha256(text.encode()).hexdigest()[:32]


@task(name="preprocess-video", task_run_name="preprocess {video_id}",
      cache_key_fn=_video_cache_key, persist_result=True)
def preprocess_video(video_id: str, clips: list[dict[str, Any]], cfg: dict[str, Any]) -> dict:
    return process_video(clips, cfg)


def _in_order(
    keys: list[str], submit: Callable[[str], Any], result: Callable[[Any], dict], width: int
) -> Iterator[tuple[str, dict | BaseException]]:
    """Results in ``keys`` order with at most ``width`` submitted and unconsumed at a time
    (the concurrency limit, and a memory bound: results are flushed as they come)."""
    todo, window = deque(keys), deque()
    while todo or window:
        while todo and len(window) < width:
            key = todo.popleft()
            window.append((key, submit(key)))
        key, handle = window.popleft()
        try:
            yield key, result(handle)
        except Exception as err:  # a video that failed after its retries: reported, not fatal
            yield key, err


def _ray_runner(groups: dict[str, list], cfg: dict[str, Any]):
    import ray

    from flows.ray_adapter import init_ray

    init_ray(cfg.get("ray_address"), num_cpus=None)
    # The failures flows.retries calls transient (the only ones process_video lets out).
    remote = ray.remote(num_cpus=1, max_retries=cfg["retries"], retry_exceptions=[OSError])(
        process_video)
    return lambda vid: remote.remote(groups[vid], cfg), ray.get


def cache_dir() -> Path:
    """Where Prefect persists task results (``<PREFECT_HOME>/storage`` unless configured)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path)


def _prefect_runner(groups: dict[str, list], cfg: dict[str, Any]):
    task = with_retries(preprocess_video, cfg["retries"])
    return (lambda vid: task.submit(vid, groups[vid], cfg), lambda future: future.result())


def drop_cached(groups: dict[str, list], cfg: dict[str, Any], keep: set[str]) -> int:
    """Delete the task cache of videos now recorded in the index: the cache is there to carry
    work across a crash, not to hold a second copy of every shard."""
    removed = 0
    for vid, clips in groups.items():
        if vid in keep:
            continue
        path = cache_dir() / _video_cache_key(None, {"video_id": vid, "clips": clips, "cfg": cfg})
        if path.exists():
            path.unlink()
            removed += 1
    return removed


class IncrementalShards:
    """The shard folder as an append-only set: buffers samples, writes whole shards, and
    rewrites the index (and rejections) after every flush, dropping keys already done."""

    def __init__(self, folder: Path, index: list[dict], rejected: list[dict], max_count: int,
                 max_bytes: int) -> None:
        self.folder, self.max_count, self.max_bytes = folder, max_count, max_bytes
        self.index = index
        self.done = {r["key"] for r in index}
        self.rejected = {r["clip_id"]: r for r in rejected}
        self.buffer: dict[str, list[dict]] = defaultdict(list)
        self.added_samples = 0
        self.identity_missing = 0  # added samples whose clip showed the embedder no face
        self.duplicates_dropped = 0
        self.new_shards: list[str] = []
        self.new_rejected: list[dict] = []
        self.agreement: list[dict] = []  # parser vs exact labels, clips of this run

    def add(self, result: dict[str, list]) -> None:
        self.agreement.extend(result.get("agreement", []))
        for row in result["rejected"]:
            if row["clip_id"] not in self.rejected:
                self.rejected[row["clip_id"]] = row
                self.new_rejected.append(row)
        for s in result["samples"]:
            if s["sample"]["__key__"] in self.done:
                self.duplicates_dropped += 1
                continue
            self.buffer[s["split"]].append(s)
        full = {split: len(b) - len(b) % self.max_count for split, b in self.buffer.items()}
        if any(full.values()):
            self.flush(full)

    def flush(self, counts: dict[str, int] | None = None) -> None:
        """Write ``counts[split]`` buffered samples per split (all when None), then the index."""
        counts = counts or {split: len(b) for split, b in self.buffer.items()}
        # A stop request waits for the shards and the index that lists them (well under a
        # second for the usual shard), so a stopped run leaves no unlisted shard behind.
        with stop_deferred():
            with ShardWriter(self.folder, max_count=self.max_count,
                             max_bytes=self.max_bytes) as writer:
                for split, n in sorted(counts.items()):
                    for s in self.buffer[split][:n]:
                        writer.write(s["sample"], split=split)
                        self.identity_missing += bool(s.get("identity_missing"))
                    self.buffer[split] = self.buffer[split][n:]
            self.index.extend(writer.records)
            self.done.update(r["key"] for r in writer.records)
            self.added_samples += len(writer.records)
            self.new_shards.extend(Path(s).name for s in writer.shards)
            self.write_index()
            report_progress(self.progress())  # before a held stop request is let through

    def progress(self) -> str:
        shards = len({r["shard"] for r in self.index})
        return (f"{len(self.index)} samples in {shards} shards listed in the index "
                f"({self.added_samples} added by this run)")

    def write_index(self) -> None:
        # Rejections first: a kill between the two writes only re-records them (deduped).
        write_parquet(list(self.rejected.values()), self.folder / "rejected.parquet",
                      REJECTED_SCHEMA)
        write_shard_index(self.index, self.folder / "index.parquet")


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # the summary still says everything
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc="preprocess", unit="video", file=sys.stderr, mininterval=1.0)


def open_shard_folder(folder: Path, fp: str, incremental: bool) -> tuple[list, list, str]:
    """(index, rejected, why): the earlier shard set ready to extend, or an empty folder."""
    removed = clean_partial_shards(folder)
    index_path, rejected_path = folder / "index.parquet", folder / "rejected.parquet"
    state = read_state(folder)
    if incremental and index_path.exists() and state.get("fingerprint") == fp:
        index = read_index(index_path)
        rejected = read_parquet(rejected_path) if rejected_path.exists() else []
        orphans = orphan_shards(folder, index)
        for shard in orphans:
            Path(shard).unlink()
        why = f"extending {len(index)} samples"
        if removed or orphans:
            why += f"; removed {len(removed)} partial and {len(orphans)} unlisted shards"
        return index, rejected, why
    why = ("incremental off" if not incremental else
           "no earlier shards" if not index_path.exists() else
           "params or preprocessing code changed: rebuilding")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_state(folder, {"fingerprint": fp})
    write_shard_index([], index_path)  # the shard set exists (empty) from here on
    return [], [], why


@flow(name="preprocess")
def preprocess_flow() -> dict[str, Any]:
    log = get_run_logger()
    params = read_params()
    p = paths()
    if not p.clips_manifest.exists():
        raise FileNotFoundError(f"{p.clips_manifest} not found: run the ingest stage first")
    cfg = {
        **params.preprocess.model_dump(),
        "max_side": params.ingest.max_side,
        "val_fraction": params.shards.val_fraction,
        "seed": params.shards.seed,
        "crf": params.shards.crf,
        "ray_address": params.train.ray_address,
    }
    cfg["fingerprint"] = fp = preprocess_fingerprint(cfg)
    # Resolved after the fingerprint: moving the project folder changes no sample.
    cfg["identity_embedder"] = identity_setting(cfg["identity_embedder"], p.root)
    embedder_for(cfg["identity_embedder"])  # a missing model or onnxruntime fails here, once
    with file_lock(lock_path("preprocess"), timeout_s=600, what="preprocess"):
        index, rejected, why = open_shard_folder(p.shards, fp, params.preprocess.incremental)
        clips = read_parquet(p.clips_manifest)
        groups = pending_clips(clips, index, rejected)
        n_videos = len({c["video_id"] for c in clips})
        log.info("preprocess: %d clips of %d videos; %d videos to do (%s; runner %s)",
                 len(clips), n_videos, len(groups), why, params.preprocess.runner)
        shards = IncrementalShards(p.shards, index, rejected, params.shards.max_samples,
                                   int(params.shards.max_mb * 2**20))
        report_progress(shards.progress())
        runner = _ray_runner if params.preprocess.runner == "ray" else _prefect_runner
        submit, result = runner(groups, cfg)
        failed: dict[str, str] = {}
        with _progress(len(groups)) as bar:
            for i, (vid, out) in enumerate(
                _in_order(list(groups), submit, result, params.preprocess.workers), 1
            ):
                if isinstance(out, BaseException):
                    failed[vid] = f"{type(out).__name__}: {out}"
                    log.warning("preprocess: video %s failed: %s", vid, failed[vid])
                else:
                    shards.add(out)
                if bar is not None:
                    bar.update(1)
                if i % 10 == 0 or i == len(groups):
                    log.info("preprocess: %d/%d videos, %d samples added", i, len(groups),
                             shards.added_samples)
        shards.flush()
        if runner is _prefect_runner:
            drop_cached(groups, cfg, keep=set(failed))

    summary = preprocess_summary(shards, n_videos, len(groups), failed)
    write_json(p.shards / "summary.json", summary)
    log.info("preprocess: %s", summary)
    if (check := summary["parser_agreement"]) is not None:
        log.info("preprocess: parser %s vs exact labels on %d clips: mIoU %.3f; per class %s",
                 check["parser"], check["clips"], check["miou"],
                 ", ".join(f"{c} {v:.3f}" for c, v in check["iou"].items()))
    print(f"preprocess: {summary['videos_processed']} videos processed, "
          f"{summary['videos_skipped']} skipped (done), {summary['videos_failed']} failed; "
          f"+{summary['samples_added']} samples in {summary['shards_added']} new shards, "
          f"{summary['rejected_added']} clips rejected {summary['rejected_by_reason'] or ''}, "
          f"{summary['identity_missing']} added without an identity embedding (no face found); "
          f"{summary['samples']} samples in {summary['shards']} shards")
    return summary


def preprocess_summary(shards: IncrementalShards, n_videos: int, n_todo: int,
                       failed: dict[str, str]) -> dict[str, Any]:
    by_split = Counter(r["split"] for r in shards.index)
    agreement = None
    if shards.agreement:  # this run's clips with exact labels, when parser_check is on
        agreement = {"parser": shards.agreement[0]["parser"],
                     **summarize_agreement([row["iou"] for row in shards.agreement])}
    return {
        "videos_processed": n_todo - len(failed),
        "videos_skipped": n_videos - n_todo,
        "videos_failed": len(failed),
        "failed": failed,
        "samples_added": shards.added_samples,
        "identity_missing": shards.identity_missing,
        "shards_added": len(shards.new_shards),
        "new_shards": shards.new_shards,
        "rejected_added": len(shards.new_rejected),
        "rejected_by_reason": dict(Counter(r["reason"] for r in shards.new_rejected)),
        "duplicates_dropped": shards.duplicates_dropped,
        "samples": len(shards.index),
        "rejected": len(shards.rejected),
        "shards": len({r["shard"] for r in shards.index}),
        **{f"split_{k}": v for k, v in sorted(by_split.items())},
        "parser_agreement": agreement,
    }


if __name__ == "__main__":
    run_main(preprocess_flow)
