"""Stage ``ingest``: list the source, probe every new video (one Prefect task each, retried on
I/O errors, cached on the item's content + params), split into clips at the target fps, drop
exact duplicates, merge into the earlier manifests.

Outputs: ``data/manifest/videos.parquet`` (one row per listed item, with status and reason),
``data/manifest/clips.parquet`` (one row per clip of an ``ok`` video), ``state.json`` (the
params/code fingerprint the manifests were made with) and ``summary.json`` (this run's counts).

Incremental (``ingest.incremental``, default): a video whose content hash is already ``ok`` in
the earlier manifest is not probed again; new videos are appended. Manifests are written
atomically at the end, so a killed run leaves the earlier ones intact (the per-item cache makes
the rerun cheap). A different fingerprint (params or ingest code changed) rebuilds from scratch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait

import preprocessing.ingest as ingest_lib
import preprocessing.video as video_lib
from flows.common import paths, read_params, run_main, write_json
from flows.locks import file_lock, lock_path
from preprocessing.incremental import (
    fingerprint,
    merge_clips,
    merge_videos,
    read_state,
    write_state,
)
from preprocessing.ingest import (
    SourceSpec,
    ingest,
    is_url,
    known_video_ids,
    list_source,
    read_parquet,
    write_parquet,
)
from preprocessing.video import content_hash

# Params that do not change what a row holds: left out of the fingerprint.
NOT_IN_FINGERPRINT = frozenset({"download_timeout_s", "download_retries", "incremental"})


def ingest_fingerprint(params: dict[str, Any]) -> str:
    settings = {k: v for k, v in params.items() if k not in NOT_IN_FINGERPRINT}
    return fingerprint(settings, [ingest_lib.__file__, video_lib.__file__])


def _item_cache_key(context: Any, parameters: dict[str, Any]) -> str | None:
    """Same item, same bytes, same params → the earlier result (skips the probe on a rerun)."""
    item = parameters["item"]
    try:
        content = item if is_url(item) else content_hash(item)
    except OSError:
        return None  # missing file: nothing to cache, the task reports it
    known = parameters["known"]
    parts = [item, content, parameters["fingerprint"], str(content in known)]
    return "ingest-" + hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


@task(name="ingest-video", retries=2, retry_delay_seconds=1, task_run_name="ingest {item}",
      cache_key_fn=_item_cache_key, persist_result=True)
def ingest_item(
    item: str, params: dict[str, Any], download_dir: str, known: frozenset[str], fingerprint: str
) -> tuple[list, list]:
    return ingest(
        [item],
        fps=params["fps"],
        clip_frames=params["clip_frames"],
        min_clip_frames=params["min_clip_frames"],
        known_hashes=known,
        download_dir=download_dir,
        timeout_s=params["download_timeout_s"],
        max_bytes=int(params["download_max_mb"] * 2**20),
        retries=params["download_retries"],
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
    futures = [ingest_item.submit(item, cfg, download_dir, known, fp) for item in items]
    wait(futures)
    new_videos, new_clips = drop_duplicates([f.result() for f in futures])
    videos = merge_videos(old_videos, new_videos)
    clips = merge_clips(old_clips, new_clips)
    # Clips first: a kill between the two writes leaves clips whose videos are not yet listed,
    # which the rerun (same fingerprint, those videos not known) simply probes again.
    write_parquet(clips, p.clips_manifest, "clips")
    write_parquet(videos, p.videos_manifest, "videos")
    write_state(p.manifest, {"fingerprint": fp, "params": cfg})

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
