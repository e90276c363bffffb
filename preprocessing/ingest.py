"""Ingest: list a source, fetch URLs, probe and split videos into clips, write the manifests.

Outputs (``data/manifest/``): ``videos.parquet`` — one row per listed item, whatever happened to
it — and ``clips.parquet`` — one row per clip of an ``ok`` video. Schemas are explicit
(:data:`VIDEOS_SCHEMA`, :data:`CLIPS_SCHEMA`) so an empty table still has its columns.

Statuses in ``videos``:
  ``ok``             probed, split into clips.
  ``failed``         ``reason`` says why:
                     - the item itself, before any I/O: ``empty_row``, ``bad_path:nul_byte``,
                       ``bad_path:not_utf8`` (a manifest is read as UTF-8), ``name_too_long``
                       (over :data:`MAX_ITEM_BYTES`, or the OS says so),
                       ``unsupported_scheme:<scheme>`` (only http, https and file URLs),
                       ``bad_url`` (a file URL naming another host or a relative path, a URL
                       urllib cannot parse);
                     - the local file, from ``stat`` after resolving symlinks, before any read:
                       ``outside_allowed_roots``, ``not_found``, ``permission_denied``,
                       ``symlink_loop``, ``os_error:<ERRNO>``, ``not_a_regular_file:<kind>``
                       (``directory``, ``device``, ``fifo``, ``socket``, ``other``),
                       ``too_large`` (over ``max_file_bytes``);
                     - reading it: ``hash_timeout``, ``probe_timeout`` or another
                       :class:`~preprocessing.video.VideoError` reason (``empty_file``,
                       ``not_a_video``, ``unreadable``, ``audio_only``, ``no_video_stream``,
                       ``no_frames``, ``truncated``, ``corrupt``), ``too_short`` (fewer than
                       ``min_clip_frames`` at the target fps);
                     - a download (``download_<reason>``): ``timeout`` (no data for
                       ``timeout_s``), ``too_slow`` (over ``total_timeout_s`` in all),
                       ``too_large``, ``http_<code>``, ``redirect_refused`` (to a scheme other
                       than http(s)), ``redirect_loop``, ``bad_url``, ``error``.
  ``duplicate``      same bytes as an earlier item of this run; ``reason`` =
                     ``same_content_as:<path>``; no clips.
  ``skipped_known``  its content hash is in ``known_hashes`` (an earlier manifest): the row is
                     kept so the run's manifest accounts for every listed item, but it is not
                     probed and yields no clips — the earlier manifest already holds them.
``video_id`` is the content hash (null when there was nothing to hash: a missing file or a
failed download); it is unique among ``ok`` rows. ``source`` is the item as listed (bad text
made printable and cut, see :func:`printable`), ``path`` the real file read (symlinks resolved).

Only what can be a video is read, and every read is bounded: nothing a source lists can make a
run hang (a device, a fifo, an endless download) or read outside ``allowed_roots``.
"""

from __future__ import annotations

import csv
import errno
import glob as globlib
import hashlib
import http.client
import os
import re
import socket
import stat
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.video import (
    VideoError,
    content_hash,
    file_kind,
    probe_video,
    resampled_num_frames,
)

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


# The longest item (path or URL) looked at, in UTF-8 bytes: Linux paths stop at 4096 and real
# URLs, signed ones included, stay well below; anything longer is a broken row.
MAX_ITEM_BYTES = 8192
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")


def url_scheme(item: str) -> str | None:
    """The lower-cased scheme of a URL, or None for a plain path.

    A one-letter "scheme" is a Windows drive (``C:\\clip.mp4``), so a path. A local file whose
    name has a colon before any slash (``take:1.mp4``) reads as a URL: write ``./take:1.mp4``.
    """
    m = _SCHEME.match(item)
    if m is None or len(m.group(1)) == 1:
        return None
    return m.group(1).lower()


def is_url(item: str) -> bool:
    """An http(s) URL: fetched before it is probed."""
    return url_scheme(item) in ("http", "https")


def item_problem(item: str) -> str | None:
    """Why ``item`` cannot be looked at, whatever it names, or None: ``empty_row``,
    ``bad_path:nul_byte``, ``bad_path:not_utf8``, ``name_too_long``. Pure: no I/O."""
    if not item.strip():
        return "empty_row"
    if "\0" in item:
        return "bad_path:nul_byte"
    try:
        size = len(item.encode("utf-8"))
    except UnicodeEncodeError:  # undecodable manifest bytes (kept as lone surrogates)
        return "bad_path:not_utf8"
    return "name_too_long" if size > MAX_ITEM_BYTES else None


def printable(item: str, limit: int = 300) -> str:
    """``item`` as valid, short text for the manifest and the log: NULs and undecodable bytes
    escaped, a value longer than ``limit`` cut with its length noted."""
    text = item.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\x00")
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text)} characters]"


def source_text(item: str) -> str:
    """The ``source`` column for ``item``: itself, or :func:`printable` when it is bad text."""
    return item if item_problem(item) is None else printable(item)


def list_source(spec: SourceSpec) -> list[str]:
    """Items (local paths or URLs) of a source, sorted for folder and glob, in order for manifests.

    folder: files under ``path`` (recursive) whose extension is in ``extensions``.
    glob: files matching the pattern (``**`` recursive), filtered by ``extensions``.
    Both list what is not a folder (a fifo, a link to a device or a missing file) too, so that
    :func:`ingest` records why it is not read rather than the file vanishing without a word.
    manifest: a ``.csv`` (UTF-8) or ``.parquet`` with a ``path`` or ``url`` column (``path`` wins
    where both are set); relative paths are resolved against the manifest's folder. Every row is
    an item, bad ones too (an empty row, bytes that are not UTF-8): :func:`ingest` records each
    with its reason. A file that cannot be a manifest (not a regular file, not CSV or Parquet, a
    CSV value over ``csv.field_size_limit()`` characters) raises ValueError.
    Raises FileNotFoundError for a missing folder/manifest, ValueError for an empty source.
    """
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in spec.extensions)
    if spec.kind == "folder":
        root = Path(spec.path)
        if not root.is_dir():
            raise FileNotFoundError(f"source folder does not exist: {root}")
        items = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in exts and _listed(p))
    elif spec.kind == "glob":
        items = sorted(
            p
            for p in globlib.glob(spec.path, recursive=True)
            if Path(p).suffix.lower() in exts and _listed(p)
        )
    elif spec.kind == "manifest":
        items = _read_source_manifest(Path(spec.path))
    else:
        raise ValueError(f"unknown source kind {spec.kind!r}: use folder, glob or manifest")
    if not any(item.strip() for item in items):
        raise ValueError(f"source {spec.kind} {spec.path!r} lists no videos (extensions {exts})")
    return items


def _listed(path: str | os.PathLike) -> bool:
    # A real folder named like a video is walked into, not listed; a symlink is listed whatever
    # it points at (ingest resolves and checks it).
    return os.path.islink(path) or not os.path.isdir(path)


def _read_source_manifest(path: Path) -> list[str]:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"source manifest does not exist: {path}") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"source manifest is not a regular file ({file_kind(mode)}): {path}")
    if path.suffix.lower() == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"source manifest {path} is not a Parquet file: {first}") from None
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        n = table.num_rows
    elif path.suffix.lower() == ".csv":
        rows = _read_csv_rows(path)
        names = rows[0].keys() if rows else []
        columns = {name: [r.get(name) for r in rows] for name in names}
        n = len(rows)
    else:
        raise ValueError(f"source manifest must be .csv or .parquet: {path}")
    if "path" not in columns and "url" not in columns:
        if n == 0:
            raise ValueError(f"source manifest is empty: {path}")
        raise ValueError(f"source manifest {path} needs a 'path' or 'url' column")
    base = os.path.abspath(path.parent)
    items: list[str] = []
    for i in range(n):
        value = ""
        for name in ("path", "url"):
            v = _cell_text(columns.get(name, [None] * n)[i])
            if v:
                value = v
                break
        # Joined, not resolved: ``source`` keeps the manifest's words (``../x.mp4`` included);
        # ingest resolves symlinks and records the real file in ``path``.
        if value and url_scheme(value) is None and not os.path.isabs(value):
            value = os.path.join(base, value)
        items.append(value)  # an empty row too: ingest records it
    return items


def _read_csv_rows(path: Path) -> list[dict[str, Any]]:
    # Undecodable bytes survive as lone surrogates, so one bad row is recorded
    # (``bad_path:not_utf8``) instead of failing the whole manifest; a BOM is tolerated.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        try:
            return list(reader)
        except csv.Error as e:
            raise ValueError(
                f"source manifest {path} is not a readable CSV (line {reader.line_num}: {e})"
            ) from None


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):  # a Parquet binary column
        value = value.decode("utf-8", "surrogateescape")
    return str(value).strip()


# ---------------------------------------------------------------------------------------------
# Local files: what may be read


class ItemError(Exception):
    """An item refused before its bytes are read; ``reason`` is a short machine-readable word
    and ``path`` the real file it named, when known."""

    def __init__(self, reason: str, path: str | None = None) -> None:
        super().__init__(f"{reason}: {path}" if path else reason)
        self.reason = reason
        self.path = path


def local_path(item: str) -> str:
    """The local path an item names: the item itself, or the path of a ``file://`` URL.

    Raises :class:`ItemError` ``unsupported_scheme:<scheme>`` for any scheme but file (http(s)
    URLs are downloaded, not passed here) and ``bad_url`` for a file URL on another host or
    with a relative path.
    """
    scheme = url_scheme(item)
    if scheme is None:
        return item
    if scheme != "file":
        raise ItemError(f"unsupported_scheme:{scheme[:32]}")
    try:
        parts = urllib.parse.urlsplit(item)
    except ValueError:
        raise ItemError("bad_url") from None
    if parts.netloc not in ("", "localhost"):
        raise ItemError("bad_url")
    path = urllib.request.url2pathname(parts.path)
    if not os.path.isabs(path):
        raise ItemError("bad_url")
    if "\0" in path:  # %00 in the URL
        raise ItemError("bad_path:nul_byte")
    return path


def resolve_roots(roots: Iterable[str], base: str | os.PathLike) -> list[str]:
    """``allowed_roots`` as real absolute folders; relative ones are relative to ``base``."""
    return [os.path.realpath(os.path.join(base, r)) for r in roots]


def within_roots(real: str, roots: Sequence[str]) -> bool:
    """``real`` (a resolved path) is one of ``roots`` (resolved folders) or under one."""
    return any(os.path.commonpath([real, root]) == root for root in roots)


def resolve_local(
    path: str, max_bytes: int | None = None, allowed_roots: Sequence[str] = ()
) -> str:
    """The real path of a file that may be read, checked without opening it.

    Symlinks are resolved first; then, each an :class:`ItemError`: ``outside_allowed_roots``
    (when ``allowed_roots``, resolved folders, are given), ``not_found`` and other ``stat``
    failures (:func:`os_error_reason`), ``not_a_regular_file:<kind>`` (a directory, device,
    fifo or socket is never opened: opening some devices has effects, reading others never
    ends), ``too_large`` (over ``max_bytes``).
    """
    real = os.path.realpath(path)
    if allowed_roots and not within_roots(real, allowed_roots):
        raise ItemError("outside_allowed_roots", real)
    try:
        st = os.stat(real)
    except OSError as e:
        raise ItemError(os_error_reason(e), real) from None
    kind = file_kind(st.st_mode)
    if kind != "regular":
        raise ItemError(f"not_a_regular_file:{kind}", real)
    if max_bytes is not None and st.st_size > max_bytes:
        raise ItemError("too_large", real)
    return real


def os_error_reason(e: OSError) -> str:
    """``not_found``, ``name_too_long``, ``permission_denied``, ``symlink_loop`` or
    ``os_error:<ERRNO>`` for an OS error on a path."""
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return "not_found"
    if e.errno == errno.ENAMETOOLONG:
        return "name_too_long"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission_denied"
    if e.errno == errno.ELOOP:
        return "symlink_loop"
    return f"os_error:{errno.errorcode.get(e.errno or 0, e.errno)}"


# ---------------------------------------------------------------------------------------------
# Downloads


class DownloadError(Exception):
    """A URL that could not be fetched; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message

    def __reduce__(self):  # pickled (Prefect results, Ray) with its reason intact
        return (DownloadError, (self.reason, self.message))

    @property
    def transient(self) -> bool:
        """Worth another try later: a timeout, a dropped connection or a 5xx. A 4xx, an
        oversize body or a refused redirect will fail the same way again."""
        return self.reason in ("timeout", "error") or self.reason.startswith("http_5")

    @property
    def item_reason(self) -> str:
        """The ``reason`` of the item's failed ``videos`` row."""
        return f"download_{self.reason}"


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
    total_timeout_s: float | None = None,
) -> Path:
    """Fetch ``url`` into ``dest_dir/<url_filename(url)>`` atomically; return that path.

    ``timeout_s`` bounds each connect/read wait (a stalled server); ``total_timeout_s`` one
    attempt in all (a server that trickles its body or its headers: a watchdog shuts the
    connection).
    Bodies over ``max_bytes`` are refused from Content-Length, and cut off while streaming when
    the header is missing or lies (an endless body). Redirects are followed to http(s) only.
    One attempt: retrying is the caller's (the ingest flow's Prefect task retries what
    :attr:`DownloadError.transient` says may pass). An existing file is reused.
    Raises :class:`DownloadError` with reason ``timeout``, ``too_slow``, ``too_large``,
    ``http_<code>``, ``redirect_refused``, ``redirect_loop``, ``bad_url`` or ``error``.
    """
    if not is_url(url):
        raise DownloadError("bad_url", f"only http(s) URLs are fetched: {url!r}")
    try:
        name = url_filename(url)
    except ValueError as e:  # urlsplit: e.g. an unclosed IPv6 bracket
        raise DownloadError("bad_url", f"{printable(url)}: {e}") from e
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / name
    if not dest.is_file():
        _fetch(url, dest, timeout_s, max_bytes, total_timeout_s)
    return dest


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only. urllib's own handler would follow ftp, and reports a
    refused ``file:`` target as an HTTP error; here both are ``redirect_refused``."""

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001, ANN201 (urllib's)
        target = headers.get("location") or headers.get("uri")
        if target is not None:
            new = urllib.parse.urljoin(req.full_url, target)
            if url_scheme(new) not in ("http", "https"):
                fp.close()
                raise DownloadError("redirect_refused", f"{req.full_url} -> {printable(new)}")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class _Watchdog:
    """Shuts the transfer's sockets down at the deadline. A server that trickles its status
    line or headers holds urllib inside one call, where no loop of ours can look at a clock;
    a shut socket ends that call at once."""

    def __init__(self, seconds: float | None) -> None:
        self.sockets: list[socket.socket] = []
        self.fired = False
        self._timer = None if seconds is None else threading.Timer(seconds, self._fire)

    def _fire(self) -> None:
        self.fired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already

    def __enter__(self) -> _Watchdog:
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def connection(self, base: type[http.client.HTTPConnection]) -> type:
        """``base`` that hands each socket it connects to this watchdog."""
        sockets = self.sockets

        class Watched(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                sockets.append(self.sock)

        return Watched

    def opener(self) -> urllib.request.OpenerDirector:
        watchdog = self

        class Http(urllib.request.HTTPHandler):
            def http_open(self, req):  # noqa: ANN001, ANN201 (urllib's)
                return self.do_open(watchdog.connection(http.client.HTTPConnection), req)

        class Https(urllib.request.HTTPSHandler):
            def https_open(self, req):  # noqa: ANN001, ANN201 (urllib's)
                conn = watchdog.connection(http.client.HTTPSConnection)
                return self.do_open(conn, req, context=self._context)

        return urllib.request.build_opener(Http, Https, _HttpOnlyRedirects)


def _fetch(
    url: str, dest: Path, timeout_s: float, max_bytes: int, total_timeout_s: float | None = None
) -> None:
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    request = urllib.request.Request(url, headers={"User-Agent": "durian-ingest"})
    watchdog = _Watchdog(total_timeout_s)
    try:
        with watchdog, watchdog.opener().open(request, timeout=timeout_s) as response:
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
            complete = length is not None and length.isdigit() and size >= int(length)
            if watchdog.fired and not complete:  # the shut socket read as the end of the body
                raise DownloadError("too_slow", f"{url}: over {total_timeout_s}s in all")
            if length is not None and length.isdigit() and not complete:
                raise DownloadError("error", f"{url}: body ended at {size} of {length} bytes")
        os.replace(tmp, dest)
    except DownloadError:
        raise
    except (OSError, ValueError, http.client.HTTPException) as e:
        overran = total_timeout_s if watchdog.fired else None
        raise _download_error(e, url, timeout_s, overran) from e
    finally:
        tmp.unlink(missing_ok=True)


def _download_error(
    e: Exception, url: str, timeout_s: float, overran_s: float | None
) -> DownloadError:
    """The :class:`DownloadError` for what urllib or http.client raised; ``overran_s`` is the
    total time bound when the watchdog fired (then the shut socket is the cause, whatever it
    raised)."""
    if overran_s is not None:
        return DownloadError("too_slow", f"{url}: over {overran_s}s in all")
    if isinstance(e, urllib.error.HTTPError):
        if str(e.msg).startswith(urllib.request.HTTPRedirectHandler.inf_msg):
            return DownloadError("redirect_loop", f"{url}: {e.reason}")
        return DownloadError(f"http_{e.code}", f"{url}: {e.reason}")
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError):
        return DownloadError("timeout", f"{url}: no data for {timeout_s}s")
    if isinstance(reason, (ValueError, http.client.InvalidURL)):  # port, IPv6, non-ASCII
        return DownloadError("bad_url", f"{printable(url)}: {reason}")
    return DownloadError("error", f"{url}: {reason}")


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
    timeout_s: float | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Probe one video and split it into clips of ``clip_frames`` frames at ``fps``.

    Never raises for a bad video: it returns a ``failed`` row with a ``reason`` and no clips.
    ``verify`` decodes every frame so corruption mid-file fails here, not in preprocessing.
    ``video_id`` defaults to the content hash. ``timeout_s`` bounds hashing and probing, each.
    """
    path = str(path)
    row = _video_row(source if source is not None else path, path, video_id)
    if video_id is None:
        try:
            row["video_id"] = video_id = content_hash(path, timeout_s=timeout_s)
        except VideoError as e:
            row.update(status="failed", reason=e.reason)
            return row, []
        except OSError as e:
            row.update(status="failed", reason=os_error_reason(e))
            return row, []
    try:
        info = probe_video(path, verify=verify, timeout_s=timeout_s)
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


def failed_row(item: str, reason: str, path: str | None = None) -> dict[str, Any]:
    """The ``videos`` row of an item that failed before probing."""
    row = _video_row(source_text(item), path, None)
    row.update(status="failed", reason=reason)
    return row


def ingest(
    paths: Iterable[str],
    fps: float,
    clip_frames: int,
    min_clip_frames: int,
    known_hashes: Iterable[str] = (),
    download_dir: str | os.PathLike | None = None,
    timeout_s: float = 30.0,
    max_bytes: int = 2 << 30,
    verify: bool = True,
    max_file_bytes: int | None = None,
    probe_timeout_s: float | None = None,
    total_timeout_s: float | None = None,
    allowed_roots: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Ingest every item (local path, ``file://`` or http(s) URL); returns (video rows, clip rows).

    One row per item, in order, whatever happens (see the module note for statuses); the run
    never stops on a bad item. URLs are fetched into ``download_dir`` first (``timeout_s``,
    ``total_timeout_s``, ``max_bytes``: see :func:`download`; one attempt each). A local file is
    checked before it is opened (:func:`resolve_local`: ``max_file_bytes``, ``allowed_roots``,
    resolved folders; ``None``/empty: no limit); hashing and probing each take at most
    ``probe_timeout_s``.
    """
    known = set(known_hashes)
    seen: dict[str, str] = {}  # content hash → first item with it
    videos: list[dict[str, Any]] = []
    clips: list[dict[str, Any]] = []
    for item in paths:
        item = str(item)
        if is_url(item) and download_dir is None:
            raise ValueError(f"a download_dir is needed to ingest URLs ({item})")
        try:
            local = _local_file(
                item, download_dir, max_file_bytes, allowed_roots,
                dict(timeout_s=timeout_s, max_bytes=max_bytes, total_timeout_s=total_timeout_s),
            )  # fmt: skip
        except ItemError as e:
            videos.append(failed_row(item, e.reason, e.path))
            continue
        cap = max_bytes if is_url(item) else max_file_bytes
        try:
            digest = content_hash(local, max_bytes=cap, timeout_s=probe_timeout_s)
        except VideoError as e:
            videos.append(failed_row(item, e.reason, local))
            continue
        except OSError as e:  # gone or changed since the check
            videos.append(failed_row(item, os_error_reason(e), local))
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
            local, fps, clip_frames, min_clip_frames, video_id=digest, source=item,
            verify=verify, timeout_s=probe_timeout_s,
        )  # fmt: skip
        videos.append(row)
        clips.extend(video_clips)
    return videos, clips


def _local_file(
    item: str,
    download_dir: str | os.PathLike | None,
    max_file_bytes: int | None,
    allowed_roots: Sequence[str],
    download_args: dict[str, Any],
) -> str:
    """The real path of the checked local file for ``item`` (downloaded first for a URL);
    raises :class:`ItemError` with the reason it cannot be read."""
    problem = item_problem(item)
    if problem is not None:
        raise ItemError(problem)
    if is_url(item):
        assert download_dir is not None
        try:
            fetched = download(item, download_dir, **download_args)
        except DownloadError as e:
            raise ItemError(e.item_reason) from None
        # Our own download folder: the roots do not apply, the download cap does.
        return resolve_local(str(fetched), download_args["max_bytes"])
    return resolve_local(local_path(item), max_file_bytes, allowed_roots)


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
