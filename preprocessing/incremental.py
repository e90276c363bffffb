"""Pure helpers for incremental, resumable ingest and preprocessing.

An output folder is extended, never rewritten, while the settings that shape its content stay
the same: :func:`fingerprint` names those settings (params and the code that interprets them);
a different fingerprint means the old output is stale and is rebuilt from scratch.

Resume rule for shards: a shard file is part of the dataset only once a committed index part
lists it (:mod:`preprocessing.shard_index`); the index is the single record of what is done
(:func:`pending_clips`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def fingerprint(settings: dict[str, Any], code_files: Iterable[str | os.PathLike] = ()) -> str:
    """sha256 (16 hex) of the settings (JSON, sorted keys) and the bytes of the code files."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in sorted(str(p) for p in code_files):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def read_state(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {}  # a torn write is treated as no state: the caller rebuilds


def write_state(folder: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomic write of ``state.json`` (a killed run leaves the old file or the new one)."""
    path = Path(folder) / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:  # a stop between the two leaves no temporary behind
        tmp.unlink(missing_ok=True)
    return path


def merge_videos(
    earlier: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The video manifest after an incremental ingest.

    Earlier ``ok`` rows stay (their clips are in the earlier clip manifest); earlier failures
    and duplicates are replaced by this run's rows (they were listed and tried again); this
    run's ``skipped_known`` rows are dropped, since the earlier ``ok`` row stands for them.
    """
    kept = [r for r in earlier if r.get("status") == "ok"]
    ok_ids = {r["video_id"] for r in kept}
    fresh = [r for r in new if r.get("status") != "skipped_known"]
    fresh = [r for r in fresh if not (r.get("status") == "ok" and r["video_id"] in ok_ids)]
    return kept + fresh


def merge_clips(
    earlier: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Earlier clips then new ones, one row per ``clip_id`` (the earlier row wins)."""
    seen: set[str] = set()
    out = []
    for row in [*earlier, *new]:
        if row["clip_id"] not in seen:
            seen.add(row["clip_id"])
            out.append(row)
    return out


def pending_clips(
    clips: Sequence[dict[str, Any]],
    index_rows: Sequence[dict[str, Any]],
    rejected_rows: Sequence[dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Clips of the manifest not yet in the index nor rejected, grouped by video (sorted ids,
    clips in order). Done clips are never handed out again, so no key is written twice."""
    done = {r["key"] for r in index_rows} | {r["clip_id"] for r in rejected_rows}
    groups: dict[str, list[dict[str, Any]]] = {}
    for clip in clips:
        if clip["clip_id"] not in done:
            groups.setdefault(clip["video_id"], []).append(clip)
    return {vid: sorted(group, key=lambda c: c["clip_index"])
            for vid, group in sorted(groups.items())}


def index_digest(index_rows: Sequence[dict[str, Any]], folder: str | os.PathLike) -> str:
    """A content hash of a shard set: the sorted (key, shard) pairs and each shard's size."""
    digest = hashlib.sha256()
    for key, shard in sorted((r["key"], r["shard"]) for r in index_rows):
        digest.update(f"{key}\0{shard}\n".encode())
    for name in sorted({r["shard"] for r in index_rows}):
        path = Path(folder) / name
        digest.update(f"{name}\0{path.stat().st_size if path.exists() else -1}\n".encode())
    return digest.hexdigest()[:16]
