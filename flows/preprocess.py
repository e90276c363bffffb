"""Stage ``preprocess``: every clip of the manifest → face track → square crop → 478 landmarks
→ face parsing → identity embedding → one WebDataset sample; shards split by source video, and
an append-only Parquet index (:mod:`preprocessing.shard_index`).

The pending videos go out in batches of ``preprocess.batch_videos``: one Prefect task run per
batch (local threads, at most ``preprocess.workers`` at a time) or, with ``preprocess.runner:
ray``, one Ray task per batch spread over the cluster's nodes (``train.ray_address`` /
``RAY_ADDRESS``; the shard folder must be a path every node sees). **Each batch is written by
its worker**: it loads the detector, parser and embedder once, preprocesses its videos, writes
their samples into shards of its own part (``{split}-{part}-{n:06d}.tar``) and commits the
part's index and rejections; the driver receives only a small record (counts, shard names,
rejections) and never holds frames. A batch whose task fails is retried (``preprocess.retries``,
transient failures only: Prefect's retries or Ray's); a failed try's files go first.

The identity embedding (``preprocess.identity_embedder``: dlib, arcface:<onnx path> or none) is
computed on one frame of the crop (:func:`preprocessing.identity.clip_identity`: the middle
one, else the next tried frame where the embedder finds a face) and stored as ``identity.npy``;
a clip where no tried frame shows a face still lands, without it (``identity_frame`` None in
its ``json``; counted as ``identity_missing`` in the summary).

Synthetic videos carry exact labels in ``<video>.gt.npz``; with ``trust_ground_truth`` they
are used instead of the detector and parser. A clip that is rejected (no face, two faces, face
too small, undecodable) is recorded with its reason in the part's rejections; the batch goes
on. A video that fails otherwise (a bug, an unreadable file) is left out of its batch, whose
other videos land, and is reported with its reason (``failed`` in ``summary.json``) and tried
again by the next run.

Incremental and resumable (``preprocess.incremental``, default): only clips in no committed
part (nor rejected) are processed; earlier shards and index parts are never touched. A run
killed at any point (SIGKILL included) loses at most the batches in flight: what they wrote
is removed by the next run, which does them again; no key is written twice. A stop request
(Ctrl-C, SIGTERM) abandons the local batches in flight at their next video. A change of the
sample-shaping params or of the preprocessing code (the fingerprint in ``state.json``)
rebuilds the shards from scratch.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

import durian.data.clip_codec as clip_lib
import durian.data.masks as masks_lib
import preprocessing.crop as process_lib
import preprocessing.faces as faces_lib
import preprocessing.identity as identity_lib
import preprocessing.parsing as parsing_lib
import preprocessing.shard_index as shard_index_lib
import preprocessing.shards as shards_lib
import preprocessing.video as video_lib
from durian.data.clip_codec import Clip, encode_clip
from durian.data.masks import category_fractions
from flows.locks import file_lock, lock_path
from flows.params import Params
from flows.project import paths, read_params, run_main, write_json
from flows.retries import with_retries
from flows.stop import report_progress, stop_requested
from preprocessing.crop import process_clip
from preprocessing.faces import ClipRejected, FaceAnalyzer
from preprocessing.identity import clip_identity, embedder_for, parse_embedder_spec
from preprocessing.incremental import fingerprint, pending_clips, read_state, write_state
from preprocessing.ingest import read_parquet
from preprocessing.parsing import (
    load_parser,
    parser_agreement,
    summarize_agreement,
    unseen_categories,
)
from preprocessing.shard_index import (
    INDEX_DIR,
    clean_uncommitted,
    part_name,
    read_index_table,
    read_rejected,
    write_part,
)
from preprocessing.shards import assign_split
from preprocessing.video import VideoError, read_frames

# cfg keys that do not change a sample: left out of the fingerprint.
NOT_IN_FINGERPRINT = frozenset(
    {"runner", "workers", "retries", "ray_address", "incremental", "parser_check",
     "batch_videos"}
)
# The trained parsers' modules by path: importing them would load torch into every driver.
_PARSERS = Path(parsing_lib.__file__).parent
CODE = [clip_lib.__file__, masks_lib.__file__, faces_lib.__file__, parsing_lib.__file__,
        process_lib.__file__, video_lib.__file__, shards_lib.__file__, identity_lib.__file__,
        shard_index_lib.__file__,
        *(str(_PARSERS / f"{m}.py") for m in ("beard", "bisenet", "segformer", "torch_parser"))]


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


@contextlib.contextmanager
def video_models(cfg: dict[str, Any]) -> Iterator[tuple[Any, FaceAnalyzer, Any]]:
    """(parser, analyzer, embedder), loaded once for a batch of videos, closed after it."""
    with contextlib.ExitStack() as stack:
        parser = load_parser(cfg["parser"], cfg["parser_weights"],
                             segment_every=cfg["segment_every"])
        if hasattr(parser, "__exit__"):  # mediapipe-backed parsers hold native resources
            stack.enter_context(parser)
        analyzer = stack.enter_context(FaceAnalyzer())
        yield parser, analyzer, embedder_for(cfg["identity_embedder"])


def process_video(
    clips: list[dict[str, Any]], cfg: dict[str, Any], models: tuple | None = None
) -> dict[str, list]:
    """All clips of one video → encoded samples, rejections and, for clips with exact labels
    and ``parser_check``, the parser's per-class IoU against them (plain data, picklable).
    ``models``: :func:`video_models` already open (else opened for this video)."""
    if models is None:
        with video_models(cfg) as opened:
            return process_video(clips, cfg, opened)
    parser, analyzer, embedder = models
    samples, rejected, agreement = [], [], []
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
            crf=cfg["crf"], preset=cfg["preset"],
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


class BatchStopped(RuntimeError):
    """A stop request reached a local batch between two videos: the batch is abandoned."""


class Progress:
    """What the run has committed, counted once per part (by the worker thread that committed
    it or by the driver on its record, whichever comes first); reported for a stop."""

    def __init__(self, samples: int, shards: int) -> None:
        self.samples, self.shards, self.added = samples, shards, 0
        self.parts: set[str] = set()
        self.lock = threading.Lock()

    def committed(self, record: dict[str, Any]) -> None:
        with self.lock:
            if record["part"] in self.parts:
                return
            self.parts.add(record["part"])
            self.samples += record["samples"]
            self.added += record["samples"]
            self.shards += len(record["shards"])
            report_progress(self.text())

    def text(self) -> str:
        return (f"{self.samples} samples in {self.shards} shards listed in the index "
                f"({self.added} added by this run)")


# The local runner's batches run in threads of the driver: they tell it what they committed
# at once, so a stop reports exactly what the index holds.
_progress_here: Progress | None = None


def process_batch(
    part: str, videos: dict[str, list[dict[str, Any]]], cfg: dict[str, Any], folder: str,
    worker: str | None = None,
) -> dict[str, Any]:
    """One worker's batch: its videos preprocessed with models loaded once, their samples
    written as shard part ``part`` of ``folder`` and committed (:func:`write_part`). Returns
    the part's record plus the videos that failed (with their reasons), the parser check and
    the count of samples without an identity embedding."""
    t0 = time.perf_counter()
    failed: dict[str, str] = {}
    agreement: list[dict] = []
    missing = 0

    def results() -> Iterator[dict[str, list]]:
        nonlocal missing
        with video_models(cfg) as models:
            for vid, clips in videos.items():
                if stop_requested():
                    raise BatchStopped(f"stop requested: batch {part} abandoned")
                try:
                    out = process_video(clips, cfg, models)
                except Exception as err:  # this video only: the batch's others still land
                    failed[vid] = f"{type(err).__name__}: {err}"
                    continue
                agreement.extend(out["agreement"])
                missing += sum(bool(s["identity_missing"]) for s in out["samples"])
                yield out
        if stop_requested():
            raise BatchStopped(f"stop requested: batch {part} abandoned before its commit")

    record = write_part(folder, part, results(), max_count=cfg["max_samples"],
                        max_bytes=cfg["max_bytes"], worker=worker or socket.gethostname())
    if _progress_here is not None:
        _progress_here.committed(record)
    return {**record, "failed": failed, "agreement": agreement, "identity_missing": missing,
            "seconds": time.perf_counter() - t0}


@task(name="preprocess-batch", task_run_name="preprocess {part}", cache_policy=NO_CACHE,
      persist_result=False)
def preprocess_batch(part: str, videos: dict[str, list[dict[str, Any]]], cfg: dict[str, Any],
                     folder: str) -> dict[str, Any]:
    return process_batch(part, videos, cfg, folder)


def make_batches(
    pending: dict[str, list[dict[str, Any]]], batch_videos: int
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Pending videos (sorted ids) in batches of ``batch_videos``, each named by its clips."""
    vids = list(pending)
    batches = {}
    for start in range(0, len(vids), batch_videos):
        videos = {vid: pending[vid] for vid in vids[start : start + batch_videos]}
        batches[part_name(c["clip_id"] for cs in videos.values() for c in cs)] = videos
    return batches


def _in_order(
    keys: list[str], submit: Callable[[str], Any], result: Callable[[Any], dict], width: int
) -> Iterator[tuple[str, dict | BaseException]]:
    """Results in ``keys`` order with at most ``width`` submitted and unconsumed at a time
    (the concurrency limit, and a memory bound on records held)."""
    todo, window = deque(keys), deque()
    while todo or window:
        while todo and len(window) < width:
            key = todo.popleft()
            window.append((key, submit(key)))
        key, handle = window.popleft()
        try:
            yield key, result(handle)
        except Exception as err:  # a batch that failed after its retries: reported, not fatal
            yield key, err


def _ray_batch(part: str, videos: dict, cfg: dict[str, Any], folder: str) -> dict[str, Any]:
    import ray

    return process_batch(part, videos, cfg, folder,
                         worker=ray.get_runtime_context().get_node_id())


def _ray_runner(batches: dict[str, dict], cfg: dict[str, Any], folder: str):
    import ray

    from flows.ray_adapter import init_ray

    init_ray(cfg.get("ray_address"), num_cpus=None)
    # The failures flows.retries calls transient; SPREAD puts the batches on every node.
    remote = ray.remote(num_cpus=1, max_retries=cfg["retries"], retry_exceptions=[OSError],
                        scheduling_strategy="SPREAD")(_ray_batch)
    return lambda part: remote.remote(part, batches[part], cfg, folder), ray.get


def _prefect_runner(batches: dict[str, dict], cfg: dict[str, Any], folder: str):
    task = with_retries(preprocess_batch, cfg["retries"])
    return (lambda part: task.submit(part, batches[part], cfg, folder),
            lambda future: future.result())


class RunTally:
    """What this run added, from the batches' records (never the samples themselves)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.new_shards: list[str] = []
        self.new_rejected: list[dict] = []
        self.added_by_split: Counter = Counter()
        self.agreement: list[dict] = []
        self.failed: dict[str, str] = {}
        self.identity_missing = 0
        self.workers: set[str] = set()
        self.batches = 0
        self.batch_seconds = 0.0  # inside the batches (workers' time), for the overhead share

    def add(self, record: dict[str, Any]) -> None:
        self.progress.committed(record)
        self.batches += 1
        self.new_shards.extend(record["shards"])
        self.new_rejected.extend(record["rejected"])
        self.added_by_split.update(record["splits"])
        self.agreement.extend(record["agreement"])
        self.failed.update(record["failed"])
        self.identity_missing += record["identity_missing"]
        self.workers.update(record["workers"])
        self.batch_seconds += record["seconds"]


def stage_config(params: Params) -> dict[str, Any]:
    """What the stage's workers get: the ``preprocess`` section and the parts of ``ingest``,
    ``shards`` and ``train`` that shape a sample or say where to run (plain data: it travels
    to Ray workers and into Prefect task inputs)."""
    return {
        **params.preprocess.model_dump(),
        "max_side": params.ingest.max_side,
        "val_fraction": params.shards.val_fraction,
        "seed": params.shards.seed,
        "crf": params.shards.crf,
        "preset": params.shards.preset,
        "max_samples": params.shards.max_samples,
        "max_bytes": int(params.shards.max_mb * 2**20),
        "ray_address": params.train.ray_address,
    }


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # the summary still says everything
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc="preprocess", unit="video", file=sys.stderr, mininterval=1.0)


def open_shard_folder(folder: Path, fp: str, incremental: bool) -> str:
    """Make ``folder`` ready to extend (what uncommitted parts left removed) or empty; says why."""
    state = read_state(folder)
    if incremental and state.get("fingerprint") == fp:
        removed = clean_uncommitted(folder)
        why = "extending the earlier shards"
        if any(removed.values()):
            why += (f"; removed {removed['partial']} partial and {removed['unlisted']} unlisted "
                    f"shards and {removed['rejected']} uncommitted rejections of a stopped run")
        return why
    why = ("incremental off" if not incremental else
           "no earlier shards" if not state else
           "params or preprocessing code changed: rebuilding")
    if folder.exists():
        shutil.rmtree(folder)
    (folder / INDEX_DIR).mkdir(parents=True)  # the shard set exists (empty) from here on
    write_state(folder, {"fingerprint": fp})
    return why


@flow(name="preprocess")
def preprocess_flow() -> dict[str, Any]:
    global _progress_here
    log = get_run_logger()
    params = read_params()
    p = paths()
    if not p.clips_manifest.exists():
        raise FileNotFoundError(f"{p.clips_manifest} not found: run the ingest stage first")
    cfg = stage_config(params)
    weights = cfg["parser_weights"]
    if weights and not Path(weights).is_absolute():  # every worker reads the same file
        weights = str(p.root / weights)
    # Loaded once here: a missing or wrong checkpoint fails at once, and its version (the
    # weights' hash) joins the fingerprint, so other weights at the same path rebuild.
    parser = load_parser(cfg["parser"], weights, segment_every=cfg["segment_every"])
    cfg["parser_version"] = parser.version
    unseen = unseen_categories(parser)
    if hasattr(parser, "close"):
        parser.close()
    del parser
    cfg["fingerprint"] = fp = preprocess_fingerprint(cfg)
    # Resolved after the fingerprint: moving the project folder changes no sample.
    cfg["parser_weights"] = weights
    cfg["identity_embedder"] = identity_setting(cfg["identity_embedder"], p.root)
    embedder_for(cfg["identity_embedder"])  # a missing model or onnxruntime fails here, once
    if unseen:
        log.info("preprocess: face parser %r cannot see %s (no such labels in the shards)",
                 cfg["parser"], ", ".join(unseen))
    folder = p.shards.resolve()
    with file_lock(lock_path("preprocess"), timeout_s=600, what="preprocess"):
        why = open_shard_folder(folder, fp, params.preprocess.incremental)
        index = read_index_table(folder).select(["key", "shard", "split"])
        rejected = read_rejected(folder)
        earlier_by_split = Counter(index.column("split").to_pylist())
        clips = read_parquet(p.clips_manifest)
        pending = pending_clips(clips, index.select(["key"]).to_pylist(), rejected)
        batches = make_batches(pending, params.preprocess.batch_videos)
        n_videos = len({c["video_id"] for c in clips})
        progress = Progress(index.num_rows, len(set(index.column("shard").to_pylist())))
        del index, clips  # the driver keeps counts from here on, not rows
        log.info("preprocess: %d videos, %d to do in %d batches of up to %d (%s; runner %s)",
                 n_videos, len(pending), len(batches), params.preprocess.batch_videos, why,
                 params.preprocess.runner)
        report_progress(progress.text())
        tally = RunTally(progress)
        runner = _ray_runner if params.preprocess.runner == "ray" else _prefect_runner
        submit, result = runner(batches, cfg, str(folder))
        _progress_here = progress if runner is _prefect_runner else None
        done_videos = 0
        try:
            with _progress_bar(len(pending)) as bar:
                for part, out in _in_order(list(batches), submit, result,
                                           params.preprocess.workers):
                    if isinstance(out, BaseException):
                        # The last line: a Ray task's error carries its whole traceback.
                        last = (str(out).strip().splitlines() or [""])[-1]
                        reason = f"{type(out).__name__}: {last}"
                        tally.failed.update({vid: reason for vid in batches[part]})
                        log.warning("preprocess: batch %s (%d videos) failed: %s", part,
                                    len(batches[part]), reason)
                    else:
                        tally.add(out)
                        for vid, why_failed in out["failed"].items():
                            log.warning("preprocess: video %s failed: %s", vid, why_failed)
                    done_videos += len(batches[part])
                    if bar is not None:
                        bar.update(len(batches[part]))
                    log.info("preprocess: %d/%d videos; %s", done_videos, len(pending),
                             progress.text())
        finally:
            _progress_here = None

    summary = preprocess_summary(tally, earlier_by_split, len(rejected), n_videos, len(pending))
    write_json(p.shards / "summary.json", summary)
    log.info("preprocess: %s", summary)
    if (check := summary["parser_agreement"]) is not None:
        log.info("preprocess: parser %s vs exact labels on %d clips: mIoU %.3f; per class %s",
                 check["parser"], check["clips"], check["miou"],
                 ", ".join(f"{c} {v:.3f}" for c, v in check["iou"].items()))
    print(f"preprocess: {summary['videos_processed']} videos processed in "
          f"{summary['batches']} batches, {summary['videos_skipped']} skipped (done), "
          f"{summary['videos_failed']} failed; +{summary['samples_added']} samples in "
          f"{summary['shards_added']} new shards, {summary['rejected_added']} clips rejected "
          f"{summary['rejected_by_reason'] or ''}, {summary['identity_missing']} added without "
          f"an identity embedding (no face found); {summary['samples']} samples in "
          f"{summary['shards']} shards")
    return summary


def preprocess_summary(tally: RunTally, earlier_by_split: Counter, earlier_rejected: int,
                       n_videos: int, n_todo: int) -> dict[str, Any]:
    by_split = earlier_by_split + tally.added_by_split
    agreement = None
    if tally.agreement:  # this run's clips with exact labels, when parser_check is on
        agreement = {"parser": tally.agreement[0]["parser"],
                     **summarize_agreement([row["iou"] for row in tally.agreement])}
    return {
        "videos_processed": n_todo - len(tally.failed),
        "videos_skipped": n_videos - n_todo,
        "videos_failed": len(tally.failed),
        "failed": tally.failed,
        "batches": tally.batches,
        "batch_seconds": round(tally.batch_seconds, 3),
        "workers": sorted(tally.workers),
        "samples_added": tally.progress.added,
        "identity_missing": tally.identity_missing,
        "shards_added": len(tally.new_shards),
        "new_shards": tally.new_shards,
        "rejected_added": len(tally.new_rejected),
        "rejected_by_reason": dict(Counter(r["reason"] for r in tally.new_rejected)),
        "samples": tally.progress.samples,
        "rejected": earlier_rejected + len(tally.new_rejected),
        "shards": tally.progress.shards,
        **{f"split_{k}": v for k, v in sorted(by_split.items())},
        "parser_agreement": agreement,
    }


if __name__ == "__main__":
    run_main(preprocess_flow)
