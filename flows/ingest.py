"""Stage ``ingest``: list the source, probe every video (one Prefect task each, retried on I/O
errors), split into clips at the target fps, drop exact duplicates, write the manifests.

Outputs: ``data/manifest/videos.parquet`` (one row per listed item, with status and reason)
and ``data/manifest/clips.parquet`` (one row per clip of an ``ok`` video).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.futures import wait

from flows.common import paths, read_params, run_main
from preprocessing.ingest import SourceSpec, ingest, list_source, write_parquet


@task(name="ingest-video", retries=2, retry_delay_seconds=1, task_run_name="ingest {item}")
def ingest_item(item: str, params: dict[str, Any], download_dir: str) -> tuple[list, list]:
    return ingest(
        [item],
        fps=params["fps"],
        clip_frames=params["clip_frames"],
        min_clip_frames=params["min_clip_frames"],
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


@flow(name="ingest")
def ingest_flow() -> dict[str, int]:
    log = get_run_logger()
    params = read_params()
    p = paths()
    spec = SourceSpec(kind=params.source.kind, path=str(p.root / params.source.path)
                      if params.source.kind != "glob" else params.source.path)
    items = list_source(spec)
    log.info("ingest: %d items from %s %s", len(items), spec.kind, spec.path)
    futures = [
        ingest_item.submit(item, params.ingest.model_dump(), str(p.root / "data" / "downloads"))
        for item in items
    ]
    wait(futures)
    videos, clips = drop_duplicates([f.result() for f in futures])
    write_parquet(videos, p.videos_manifest, "videos")
    write_parquet(clips, p.clips_manifest, "clips")
    summary: dict[str, int] = {"clips": len(clips)}
    for row in videos:
        summary[row["status"]] = summary.get(row["status"], 0) + 1
    for row in videos:
        if row["status"] == "failed":
            log.warning("ingest: %s failed: %s", row["source"], row["reason"])
    log.info("ingest: %s", summary)
    return summary


if __name__ == "__main__":
    run_main(ingest_flow)
