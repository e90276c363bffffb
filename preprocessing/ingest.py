"""Ingest: list a source, fetch URLs, probe and split videos into clips, write the manifests.

Outputs (``data/manifest/``): ``videos.parquet`` — one row per listed item, whatever happened to
it — and ``clips.parquet`` — one row per clip of an ``ok`` video. Schemas are explicit
(:data:`VIDEOS_SCHEMA`, :data:`CLIPS_SCHEMA`) so an empty table still has its columns.

Statuses in ``videos``:
  ``ok``             probed, split into clips.
  ``failed``         ``reason`` says why: a :class:`~preprocessing.video.VideoError` reason
                     (``not_found``, ``empty_file``, ``not_a_video``, ``unreadable``,
                     ``audio_only``, ``no_video_stream``, ``no_frames``, ``truncated``,
                     ``corrupt``), ``too_short`` (fewer than ``min_clip_frames`` at the target
                     fps) or a download reason (``download_timeout``, ``download_too_large``,
                     ``download_http_<code>``, ``download_error``).
  ``duplicate``      same bytes as an earlier item of this run; ``reason`` =
                     ``same_content_as:<path>``; no clips.
  ``skipped_known``  its content hash is in ``known_hashes`` (an earlier manifest): the row is
                     kept so the run's manifest accounts for every listed item, but it is not
                     probed and yields no clips — the earlier manifest already holds them.
``video_id`` is the content hash (null when there was nothing to hash: a missing file or a
failed download); it is unique among ``ok`` rows.
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.video import VideoError, content_hash, probe_video, resampled_num_frames

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts")

VIDEOS_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("source", pa.string()),  # what the source listed: a local path or a URL
        ("path", pa.string()),  # the local file that was probed (the download for a URL)
        ("status", pa.string()),
        ("reason", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),  # the source's average frame rate
        ("num_frames", pa.int64()),  # source frames
        ("duration", pa.float64()),
        ("rotation", pa.int32()),
        ("codec", pa.string()),
        ("variable_frame_rate", pa.bool_()),
    ]
)
CLIPS_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),  # <video_id>_<clip_index:04d>, no dots (WebDataset keys)
        ("video_id", pa.string()),
        ("path", pa.string()),
        ("clip_index", pa.int32()),
        ("start", pa.int64()),  # first frame, counted at the target fps
        ("num_frames", pa.int32()),  # at the target fps
        ("fps", pa.float64()),  # the target fps
    ]
)
_SCHEMAS = {"videos": VIDEOS_SCHEMA, "clips": CLIPS_SCHEMA}


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class SourceSpec:
    kind: Literal["folder", "glob", "manifest"]
    path: str
    extensions: tuple[str, ...] = field(default=VIDEO_EXTENSIONS)


def is_url(item: str) -> bool:
    return urllib.parse.urlsplit(item).scheme in ("http", "https")


def list_source(spec: SourceSpec) -> list[str]:
    """Items (local paths or URLs) of a source, sorted for folder and glob, in order for manifests.

    folder: files under ``path`` (recursive) whose extension is in ``extensions``.
    glob: files matching the pattern (``**`` recursive), filtered by ``extensions``.
    manifest: a ``.csv`` or ``.parquet`` with a ``path`` or ``url`` column (``path`` wins where
    both are set); relative paths are resolved against the manifest's folder.
    Raises FileNotFoundError for a missing folder/manifest, ValueError for an empty source.
    """
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in spec.extensions)
    if spec.kind == "folder":
        root = Path(spec.path)
        if not root.is_dir():
            raise FileNotFoundError(f"source folder does not exist: {root}")
        items = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    elif spec.kind == "glob":
        items = sorted(
            p
            for p in globlib.glob(spec.path, recursive=True)
            if os.path.isfile(p) and Path(p).suffix.lower() in exts
        )
    elif spec.kind == "manifest":
        items = _read_source_manifest(Path(spec.path))
    else:
        raise ValueError(f"unknown source kind {spec.kind!r}: use folder, glob or manifest")
    if not items:
        raise ValueError(f"source {spec.kind} {spec.path!r} lists no videos (extensions {exts})")
    return items


def _read_source_manifest(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"source manifest does not exist: {path}")
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(path)
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        n = table.num_rows
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # tolerate a BOM
            rows = list(csv.DictReader(f))
        names = rows[0].keys() if rows else []
        columns = {name: [r.get(name) for r in rows] for name in names}
        n = len(rows)
    else:
        raise ValueError(f"source manifest must be .csv or .parquet: {path}")
    if "path" not in columns and "url" not in columns:
        if n == 0:
            raise ValueError(f"source manifest is empty: {path}")
        raise ValueError(f"source manifest {path} needs a 'path' or 'url' column")
    items: list[str] = []
    for i in range(n):
        value = None
        for name in ("path", "url"):
            v = columns.get(name, [None] * n)[i]
            if v is not None and str(v).strip():
                value = str(v).strip()
                break
        if value is None:
            continue
        if not is_url(value) and not os.path.isabs(value):
            value = str((path.parent / value).resolve())
        items.append(value)
    return items


# ---------------------------------------------------------------------------------------------
# Downloads


class DownloadError(Exception):
    """A URL that could not be fetched; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


def url_filename(url: str) -> str:
    """``<sha256(url)[:16]><ext>``: stable, collision-free, no dots apart from the extension."""
    ext = Path(urllib.parse.urlsplit(url).path).suffix.lower()
    if not re.fullmatch(r"\.[a-z0-9]{1,5}", ext):
        ext = ""
    return hashlib.sha256(url.encode()).hexdigest()[:16] + ext


def download(
    url: str,
    dest_dir: str | os.PathLike,
    timeout_s: float = 30.0,
    max_bytes: int = 2 << 30,
    retries: int = 2,
    backoff_s: float = 0.5,
) -> Path:
    """Fetch ``url`` into ``dest_dir/<url_filename(url)>`` atomically; return that path.

    ``timeout_s`` bounds each connect/read wait (a stalled server), not the whole transfer.
    Bodies over ``max_bytes`` are refused from Content-Length, and cut off while streaming when
    the header is missing or lies. Timeouts, connection errors and 5xx are retried ``retries``
    times with exponential backoff; 4xx and oversize are not. An existing file is reused.
    Raises :class:`DownloadError` with reason ``timeout``, ``too_large``, ``http_<code>``,
    ``bad_url`` or ``error``.
    """
    if not is_url(url):
        raise DownloadError("bad_url", f"only http(s) URLs are fetched: {url!r}")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / url_filename(url)
    if dest.is_file():
        return dest
    last: DownloadError | None = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            _fetch(url, dest, timeout_s, max_bytes)
            return dest
        except DownloadError as e:
            last = e
            if not _retryable(e.reason):
                break
    assert last is not None
    raise last


def _retryable(reason: str) -> bool:
    return reason in ("timeout", "error") or reason.startswith("http_5")


def _fetch(url: str, dest: Path, timeout_s: float, max_bytes: int) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    request = urllib.request.Request(url, headers={"User-Agent": "durian-ingest"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise DownloadError("too_large", f"{url}: Content-Length {length} > {max_bytes}")
            size = 0
            with open(tmp, "wb") as f:
                while chunk := response.read(1 << 16):
                    size += len(chunk)
                    if size > max_bytes:
                        raise DownloadError("too_large", f"{url}: body exceeds {max_bytes} bytes")
                    f.write(chunk)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"http_{e.code}", f"{url}: {e.reason}") from e
    except TimeoutError as e:
        raise DownloadError("timeout", f"{url}: no data for {timeout_s}s") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise DownloadError("timeout", f"{url}: no data for {timeout_s}s") from e
        raise DownloadError("error", f"{url}: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError("error", f"{url}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Probing and splitting


def _video_row(source: str, path: str | None, video_id: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {name: None for name in VIDEOS_SCHEMA.names}
    row.update(source=source, path=path, video_id=video_id, status="ok", reason=None)
    return row


def clip_id(video_id: str, clip_index: int) -> str:
    return f"{video_id}_{clip_index:04d}"


def split_into_clips(total: int, clip_frames: int, min_clip_frames: int) -> list[tuple[int, int]]:
    """(start, length) of consecutive clips; a shorter last clip stays if ≥ min_clip_frames."""
    if clip_frames <= 0 or min_clip_frames <= 0:
        raise ValueError("clip_frames and min_clip_frames must be positive")
    spans = []
    for start in range(0, total, clip_frames):
        length = min(clip_frames, total - start)
        if length >= min(min_clip_frames, clip_frames):
            spans.append((start, length))
    return spans


def ingest_video(
    path: str | os.PathLike,
    fps: float,
    clip_frames: int,
    min_clip_frames: int,
    video_id: str | None = None,
    source: str | None = None,
    verify: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Probe one video and split it into clips of ``clip_frames`` frames at ``fps``.

    Never raises for a bad video: it returns a ``failed`` row with a ``reason`` and no clips.
    ``verify`` decodes every frame so corruption mid-file fails here, not in preprocessing.
    ``video_id`` defaults to the content hash.
    """
    path = str(path)
    if video_id is None:
        try:
            video_id = content_hash(path)
        except OSError:
            video_id = None
    row = _video_row(source if source is not None else path, path, video_id)
    try:
        info = probe_video(path, verify=verify)
    except VideoError as e:
        row.update(status="failed", reason=e.reason)
        return row, []
    row.update(
        width=info.width,
        height=info.height,
        fps=info.fps,
        num_frames=info.num_frames,
        duration=info.duration,
        rotation=info.rotation,
        codec=info.codec,
        variable_frame_rate=info.variable_frame_rate,
    )
    total = resampled_num_frames(info.duration, fps)
    spans = split_into_clips(total, clip_frames, min_clip_frames)
    if not spans:
        row.update(status="failed", reason="too_short")
        return row, []
    clips = [
        {
            "clip_id": clip_id(video_id, i),
            "video_id": video_id,
            "path": path,
            "clip_index": i,
            "start": start,
            "num_frames": length,
            "fps": float(fps),
        }
        for i, (start, length) in enumerate(spans)
    ]
    return row, clips


def ingest(
    paths: Iterable[str],
    fps: float,
    clip_frames: int,
    min_clip_frames: int,
    known_hashes: Iterable[str] = (),
    download_dir: str | os.PathLike | None = None,
    timeout_s: float = 30.0,
    max_bytes: int = 2 << 30,
    retries: int = 2,
    verify: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ingest every item (local path or http(s) URL); returns (video rows, clip rows).

    One row per item, in order, whatever happens (see the module note for statuses); the run
    never stops on a bad item. URLs are fetched into ``download_dir`` first.
    """
    known = set(known_hashes)
    seen: dict[str, str] = {}  # content hash → first item with it
    videos: list[dict[str, Any]] = []
    clips: list[dict[str, Any]] = []
    for item in paths:
        item = str(item)
        local = item
        if is_url(item):
            if download_dir is None:
                raise ValueError(f"a download_dir is needed to ingest URLs ({item})")
            try:
                local = str(download(item, download_dir, timeout_s, max_bytes, retries))
            except DownloadError as e:
                row = _video_row(item, None, None)
                row.update(status="failed", reason=f"download_{e.reason}")
                videos.append(row)
                continue
        try:
            digest = content_hash(local)
        except OSError:
            row = _video_row(item, local, None)
            row.update(status="failed", reason="not_found")
            videos.append(row)
            continue
        if digest in known:
            row = _video_row(item, local, digest)
            row.update(status="skipped_known", reason="in_earlier_manifest")
            videos.append(row)
            continue
        if digest in seen:
            row = _video_row(item, local, digest)
            row.update(status="duplicate", reason=f"same_content_as:{seen[digest]}")
            videos.append(row)
            continue
        seen[digest] = item
        row, video_clips = ingest_video(
            local, fps, clip_frames, min_clip_frames, video_id=digest, source=item, verify=verify
        )
        videos.append(row)
        clips.extend(video_clips)
    return videos, clips


def known_video_ids(video_rows: Iterable[dict[str, Any]]) -> set[str]:
    """Content hashes of the ``ok`` videos of an earlier manifest (for ``known_hashes``)."""
    return {r["video_id"] for r in video_rows if r.get("status") == "ok" and r.get("video_id")}


# ---------------------------------------------------------------------------------------------
# Manifests


def write_parquet(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    schema: pa.Schema | Literal["videos", "clips"],
) -> Path:
    """Write rows with an explicit schema (``"videos"``, ``"clips"`` or a pyarrow schema),
    atomically (hidden temporary file in the same folder, then rename). Unknown keys raise."""
    schema = _SCHEMAS[schema] if isinstance(schema, str) else schema
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise ValueError(f"columns not in the schema: {sorted(extra)}")
    table = pa.Table.from_pylist(list(rows), schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_parquet(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a manifest written by :func:`write_parquet`."""
    return pq.read_table(path).to_pylist()
