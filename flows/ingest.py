"""Stage ``ingest``: list the source, probe every new video (one Prefect task each, a URL's
download retried ``ingest.download_retries`` times on transient failures, cached on the item's
content + params), split into clips at the target fps, drop exact duplicates, merge into the
earlier manifests.

Outputs: ``data/manifest/videos.parquet`` (one row per listed item, with status and reason),
``data/manifest/clips.parquet`` (one row per clip of an ``ok`` video), ``state.json`` (the
params/code fingerprint the manifests were made with) and ``summary.json`` (this run's counts).

Incremental (``ingest.incremental``, default): a video whose content hash is already ``ok`` in
the earlier manifest is not probed again; new videos are appended. Manifests are written
atomically at the end, so a killed run leaves the earlier ones intact (the per-item cache makes
the rerun cheap). A different fingerprint (params or ingest code changed) rebuilds from scratch.

Nothing a source lists can hang the run: rows that are bad text (empty, NUL bytes, not UTF-8,
too long) are recorded without a task; local files are checked with ``stat`` before anything
opens them, in the cache key too (a device or fifo is never read), and every read and
download is bounded in size and time (``ingest.max_mb``, ``probe_timeout_s``,
``download_max_mb``, ``download_timeout_s``, ``download_total_timeout_s``).
``ingest.allowed_roots`` confines local paths to some folders.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait
from prefect.runtime import task_run

import preprocessing.ingest as ingest_lib
import preprocessing.video as video_lib
from flows.locks import file_lock, lock_path
from flows.project import paths, read_params, run_main, write_json
from flows.retries import with_retries
from flows.stop import report_progress, stop_deferred
from preprocessing.incremental import (
    fingerprint,
    merge_clips,
    merge_videos,
    read_state,
    write_state,
)
from preprocessing.ingest import (
    DownloadError,
    SourceSpec,
    download,
    ingest,
    is_url,
    known_video_ids,
    list_source,
    read_parquet,
    write_parquet,
)
from preprocessing.video import VideoError, content_hash

# Params that do not change what a row holds (timeouts only decide whether one is tried to
# the end): left out of the fingerprint.
NOT_IN_FINGERPRINT = frozenset(
    {"download_timeout_s", "download_total_timeout_s", "probe_timeout_s", "download_retries",
     "incremental"}
)


def ingest_fingerprint(params: dict[str, Any]) -> str:
    settings = {k: v for k, v in params.items() if k not in NOT_IN_FINGERPRINT}
    return fingerprint(settings, [ingest_lib.__file__, video_lib.__file__])


def _mb(value: float) -> int:
    return int(value * 2**20)


def _item_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Same item, same bytes, same params → the earlier result (skips the probe on a rerun).

    The file is checked as the task will check it before a byte is hashed: a device or fifo
    must not hang the key either."""
    item, params = parameters["item"], parameters["params"]
    try:
        if is_url(item):
            content = item
        else:
            cap = _mb(params["max_mb"])
            real = ingest_lib.resolve_local(
                ingest_lib.local_path(item), cap, params["allowed_roots"]
            )
            content = content_hash(real, max_bytes=cap, timeout_s=params["probe_timeout_s"])
    except (ingest_lib.ItemError, VideoError, OSError):
        return None  # nothing to cache: the task records why
    known = parameters["known"]
    parts = [item, content, parameters["fingerprint"], str(content in known)]
    return "ingest-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


@task(name="ingest-video", task_run_name="ingest {item}", cache_key_fn=_item_cache_key,
      persist_result=True)
def ingest_item(
    item: str, params: dict[str, Any], download_dir: str, known: frozenset[str], fingerprint: str
) -> tuple[list, list]:
    if is_url(item):
        # Fetched here, once per attempt, so that a transient failure fails the task run and
        # Prefect retries it (flows.retries); ingest() below then finds the file in place.
        try:
            download(item, download_dir, timeout_s=params["download_timeout_s"],
                     max_bytes=_mb(params["download_max_mb"]),
                     total_timeout_s=params["download_total_timeout_s"])
        except DownloadError as e:
            if e.transient and task_run.get_run_count() <= params["download_retries"]:
                raise
            return [ingest_lib.failed_row(item, e.item_reason)], []
    return ingest(
        [item],
        fps=params["fps"],
        clip_frames=params["clip_frames"],
        min_clip_frames=params["min_clip_frames"],
        known_hashes=known,
        download_dir=download_dir,
        timeout_s=params["download_timeout_s"],
        max_bytes=_mb(params["download_max_mb"]),
        total_timeout_s=params["download_total_timeout_s"],
        max_file_bytes=_mb(params["max_mb"]),
        probe_timeout_s=params["probe_timeout_s"],
        allowed_roots=params["allowed_roots"],
    )


def drop_duplicates(
    results: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Videos probed in parallel: keep the first item (in source order) of each content hash."""
    first: dict[str, str] = {}
    videos, clips = [], []
    for rows, video_clips in results:
        for row in rows:
            vid = row.get("video_id")
            if row["status"] == "ok" and vid in first:
                row = {**row, "status": "duplicate", "reason": f"same_content_as:{first[vid]}"}
                video_clips = []
            elif row["status"] == "ok":
                first[vid] = row["source"]
            videos.append(row)
        clips.extend(video_clips)
    return videos, clips


def earlier_manifests(manifest_dir: Path, fp: str, incremental: bool) -> tuple[list, list, str]:
    """(videos, clips, why) of the earlier run when they can be extended, else empty lists."""
    videos_path, clips_path = manifest_dir / "videos.parquet", manifest_dir / "clips.parquet"
    if not incremental:
        return [], [], "incremental off"
    if not (videos_path.exists() and clips_path.exists()):
        return [], [], "no earlier manifest"
    if read_state(manifest_dir).get("fingerprint") != fp:
        return [], [], "params or ingest code changed: rebuilding"
    return read_parquet(videos_path), read_parquet(clips_path), "extending the earlier manifest"


class _ProbeCount:
    """Says how many items are done, as their tasks finish (each is then in the task cache,
    so a stopped run's rerun does not probe it again)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.lock = total, 0, threading.Lock()
        report_progress(f"0 of {total} items probed")

    def __call__(self, future: Any) -> None:  # called in the task's thread
        with self.lock:
            self.done += 1
            report_progress(f"{self.done} of {self.total} items probed (cached for the "
                            "rerun); the manifests are written at the end")


@flow(name="ingest")
def ingest_flow() -> dict[str, Any]:
    params = read_params()
    p = paths()
    spec = SourceSpec(kind=params.source.kind, path=str(p.root / params.source.path)
                      if params.source.kind != "glob" else params.source.path)
    items = list_source(spec)
    cfg = params.ingest.model_dump()
    fp = ingest_fingerprint(cfg)
    # One ingest at a time: two would each merge into the same earlier manifest.
    with file_lock(lock_path("ingest"), timeout_s=600, what="ingest"):
        return _ingest(items, spec, cfg, fp, params.ingest.incremental)


def _ingest(items: list[str], spec: SourceSpec, cfg: dict[str, Any], fp: str,
            incremental: bool) -> dict[str, Any]:
    log = get_run_logger()
    p = paths()
    old_videos, old_clips, why = earlier_manifests(p.manifest, fp, incremental)
    known = frozenset(known_video_ids(old_videos))
    log.info("ingest: %d items from %s %s; %d known videos (%s)", len(items), spec.kind,
             spec.path, len(known), why)
    download_dir = str(p.root / "data" / "downloads")
    # The tasks get the roots resolved (relative ones against the project dir).
    task_cfg = {**cfg, "allowed_roots": ingest_lib.resolve_roots(cfg["allowed_roots"], p.root)}
    # Bad text (a 100k-character row, undecodable bytes) never becomes a task or its name.
    problems = [ingest_lib.item_problem(item) for item in items]
    probed = _ProbeCount(sum(problem is None for problem in problems))
    futures = {}
    ingest_task = with_retries(ingest_item, cfg["download_retries"])
    for i, (item, problem) in enumerate(zip(items, problems, strict=True)):
        if problem is None:
            futures[i] = ingest_task.submit(item, task_cfg, download_dir, known, fp)
            futures[i].add_done_callback(probed)
    wait(list(futures.values()))
    results = [
        futures[i].result() if problem is None else ([ingest_lib.failed_row(item, problem)], [])
        for i, (item, problem) in enumerate(zip(items, problems, strict=True))
    ]
    new_videos, new_clips = drop_duplicates(results)
    videos = merge_videos(old_videos, new_videos)
    clips = merge_clips(old_clips, new_clips)
    # Clips first: a kill between the two writes leaves clips whose videos are not yet listed,
    # which the rerun (same fingerprint, those videos not known) simply probes again. A stop
    # request waits for the three.
    with stop_deferred():
        write_parquet(clips, p.clips_manifest, "clips")
        write_parquet(videos, p.videos_manifest, "videos")
        write_state(p.manifest, {"fingerprint": fp, "params": cfg})
        report_progress(f"the manifests: {len(videos)} videos, {len(clips)} clips")

    run: dict[str, int] = {}
    for row in new_videos:
        run[row["status"]] = run.get(row["status"], 0) + 1
    failed_by_reason: dict[str, int] = {}
    for row in new_videos:
        if row["status"] == "failed":
            failed_by_reason[row["reason"]] = failed_by_reason.get(row["reason"], 0) + 1
            log.warning("ingest: %s failed: %s", row["source"], row["reason"])
    summary: dict[str, Any] = {
        **run,
        "new_videos": run.get("ok", 0),
        "new_clips": len(clips) - len(old_clips),
        "clips": len(clips),
        "videos_total": sum(r["status"] == "ok" for r in videos),
        "failed_by_reason": failed_by_reason,
    }
    write_json(p.manifest / "summary.json", summary)
    log.info("ingest: %s", summary)
    print(f"ingest: {run.get('ok', 0)} new, {run.get('skipped_known', 0)} known, "
          f"{run.get('failed', 0)} failed {failed_by_reason or ''}, "
          f"{run.get('duplicate', 0)} duplicate; {len(clips)} clips in all")
    return summary


if __name__ == "__main__":
    run_main(ingest_flow)
