"""A hostile manifest: good rows mixed with every kind of bad one, through the library and once
through the real Prefect flow. The run must end on its own, record each bad row with its
reason, and ingest the good rows; nothing may hang (a device, a fifo, a stalled or endless
server) or read outside ``allowed_roots``."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from prep_media import level_frames, make_video
from project_helpers import make_project, project_env

from preprocessing.ingest import SourceSpec, ingest, list_source

# Short bounds keep the test fast; the server's misbehaviour outlasts each of them. The flow
# runs its tasks at once (the slow ones overlap), so it affords looser bounds: a loaded
# machine must not push its good download over them.
TIMEOUT_S, TOTAL_TIMEOUT_S = 0.5, 1.0  # per wait for data, per transfer (library run)
FLOW_TIMEOUT_S, FLOW_TOTAL_TIMEOUT_S = 1.0, 3.0
STALL_S = 5.0  # longer than either wait
MAX_DOWNLOAD = 256 << 10
MAX_FILE = 100 << 10
RUN_BOUND_S = 15.0  # the library run; the flow adds Prefect's start-up
CLIP = dict(fps=10, clip_frames=4, min_clip_frames=2)


class _HostileServer:
    """Loopback HTTP server: one good video and routes that stall, answer HTML, never end
    the body or the headers, trickle, loop redirects or redirect to ``file://``."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.stop = threading.Event()
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                try:
                    server.route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up: its bound worked

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _forever(self, h: BaseHTTPRequestHandler, chunk: bytes, pause_s: float) -> None:
        # Until the client hangs up (or the test ends): its limits must cut this off.
        while not self.stop.is_set():
            h.wfile.write(chunk)
            h.wfile.flush()
            if pause_s:
                time.sleep(pause_s)

    def route(self, h: BaseHTTPRequestHandler) -> None:
        if h.path == "/stall.mp4":
            self.stop.wait(STALL_S)
        if h.path == "/busy.mp4" or (h.path == "/flaky.mp4" and self.hits[h.path] == 1):
            h.send_error(503)  # a transient failure: worth retrying
        elif h.path in ("/video.mp4", "/stall.mp4", "/flaky.mp4"):
            h.send_response(200)
            h.send_header("Content-Length", str(len(self.payload)))
            h.end_headers()
            h.wfile.write(self.payload)
        elif h.path == "/page.mp4":
            body = b"<!doctype html><html><body>Video not found</body></html>"
            h.send_response(200)
            h.send_header("Content-Type", "text/html")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif h.path == "/endless.mp4":  # no Content-Length, the body never ends
            h.send_response(200)
            h.end_headers()
            self._forever(h, b"\0" * (64 << 10), 0.0)
        elif h.path == "/drip.mp4":  # announces a small body, sends a byte at a time
            h.send_response(200)
            h.send_header("Content-Length", "50000")
            h.end_headers()
            self._forever(h, b"\0", 0.05)
        elif h.path == "/slow_headers.mp4":  # the headers never end
            h.wfile.write(b"HTTP/1.0 200 OK\r\nX-Padding: ")
            self._forever(h, b"a", 0.05)
        elif h.path == "/loop.mp4":
            h.send_response(302)
            h.send_header("Location", "/loop.mp4")
            h.end_headers()
        elif h.path == "/to_file.mp4":
            h.send_response(302)
            h.send_header("Location", "file:///etc/passwd")
            h.end_headers()
        else:
            h.send_error(404)


@dataclass(frozen=True)
class Row:
    label: str
    cell: str | bytes  # what the manifest says (bytes: not UTF-8)
    status: str
    reason: str | None
    column: str = "path"
    confined: tuple[str, str | None] | None = None  # (status, reason) under allowed_roots


@dataclass(frozen=True)
class Hostile:
    root: Path
    media: Path
    manifest: Path
    rows: list[Row]
    good: dict[str, Path]  # label → the real file an ok row must record


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_HostileServer]:
    video = make_video(tmp_path_factory.mktemp("srv") / "d.mp4", level_frames(10, 48, 32))
    s = _HostileServer(video.read_bytes())
    thread = threading.Thread(target=s.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield s
    s.stop.set()
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, server: _HostileServer) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    media, videos, lists = root / "media", root / "media" / "videos", root / "media" / "lists"
    for d in (videos, lists, root / "outside"):
        d.mkdir(parents=True)
    a = make_video(videos / "a.mp4", level_frames(10))
    b = make_video(videos / "b.mp4", level_frames(10)[::-1].copy())
    c = make_video(videos / "c d.mp4", level_frames(10, 32, 64))  # a space: a %20 in its URL
    e = make_video(root / "outside" / "e.mp4", level_frames(10, 64, 32))
    shutil.copy(a, videos / "copy_of_a.mp4")
    os.symlink("a.mp4", videos / "link_to_a.mp4")
    os.symlink(e, videos / "escape.mp4")  # inside media, pointing outside it
    os.symlink("loop.mp4", media / "loop.mp4")
    os.mkfifo(media / "fifo.mp4")  # nobody ever writes: a read would block forever
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(media / "sock.mp4"))
    (media / "folder.mp4").mkdir()
    (media / "empty.mp4").write_bytes(b"")
    rng = np.random.default_rng(0)
    (media / "random.mp4").write_bytes(rng.integers(0, 256, 4096, np.uint8).tobytes())
    (media / "big.mp4").write_bytes(b"\0" * (MAX_FILE + 1))

    fifo = ("failed", "not_a_regular_file:fifo")
    outside = ("failed", "outside_allowed_roots")
    dup_a = ("duplicate", f"same_content_as:{a}")
    rows = [
        Row("local video", str(a), "ok", None),
        Row("relative ../ path", "../videos/b.mp4", "ok", None),
        Row("file:// URL", c.as_uri(), "ok", None),
        Row("http video", f"{server.url}/video.mp4", "ok", None, "url"),
        Row("outside video", str(e), "ok", None, confined=outside),
        Row("symlink to a video", str(videos / "link_to_a.mp4"), *dup_a),
        Row("same bytes, other name", str(videos / "copy_of_a.mp4"), *dup_a),
        Row("symlink out of the roots", str(videos / "escape.mp4"), "duplicate",
            f"same_content_as:{e}", confined=outside),
        Row("/dev/zero", "/dev/zero", "failed", "not_a_regular_file:device", confined=outside),
        Row("/dev/null", "/dev/null", "failed", "not_a_regular_file:device", confined=outside),
        Row("fifo", str(media / "fifo.mp4"), *fifo),
        Row("fifo as file:// URL", (media / "fifo.mp4").as_uri(), *fifo),
        Row("socket", str(media / "sock.mp4"), "failed", "not_a_regular_file:socket"),
        Row("folder", str(media / "folder.mp4"), "failed", "not_a_regular_file:directory"),
        Row("symlink loop", str(media / "loop.mp4"), "failed", "symlink_loop"),
        Row("missing file", str(media / "missing.mp4"), "failed", "not_found"),
        Row("empty file", str(media / "empty.mp4"), "failed", "empty_file"),
        Row("binary file", str(media / "random.mp4"), "failed", "not_a_video"),
        Row("file over max_mb", str(media / "big.mp4"), "failed", "too_large"),
        Row("empty row", "", "failed", "empty_row"),
        Row("NUL byte", "a\0b.mp4", "failed", "bad_path:nul_byte"),
        Row("not UTF-8", b"caf\xe9.mp4", "failed", "bad_path:not_utf8"),
        Row("binary text", b"\x89\xfe\x01\x02garbage\xff", "failed", "bad_path:not_utf8"),
        Row("name of 300 chars", str(media / ("x" * 300 + ".mp4")), "failed", "name_too_long"),
        Row("value of 100k chars", "y" * 100_000, "failed", "name_too_long"),
        Row("Windows path", "C:\\videos\\clip.mp4", "failed", "not_found"),
        Row("ftp URL", "ftp://127.0.0.1/x.mp4", "failed", "unsupported_scheme:ftp", "url"),
        Row("data URL", "data:video/mp4;base64,AAAA", "failed", "unsupported_scheme:data"),
        Row("javascript URL", "javascript:alert(1)", "failed", "unsupported_scheme:javascript"),
        Row("s3 URL", "s3://bucket/x.mp4", "failed", "unsupported_scheme:s3", "url"),
        Row("file URL, other host", "file://elsewhere/x.mp4", "failed", "bad_url"),
        Row("broken URL", "http://[::1/x.mp4", "failed", "download_bad_url", "url"),
        Row("stalling server", f"{server.url}/stall.mp4", "failed", "download_timeout", "url"),
        Row("HTML page", f"{server.url}/page.mp4", "failed", "not_a_video", "url"),
        Row("endless body", f"{server.url}/endless.mp4", "failed", "download_too_large", "url"),
        Row("trickled body", f"{server.url}/drip.mp4", "failed", "download_too_slow", "url"),
        Row("endless headers", f"{server.url}/slow_headers.mp4", "failed", "download_too_slow",
            "url"),
        Row("redirect loop", f"{server.url}/loop.mp4", "failed", "download_redirect_loop", "url"),
        Row("redirect to file://", f"{server.url}/to_file.mp4", "failed",
            "download_redirect_refused", "url"),
    ]
    manifest = lists / "m.csv"
    manifest.write_bytes(b"".join([b"path,url\r\n", *(_csv_line(r) for r in rows)]))
    good = {"local video": a, "relative ../ path": b, "file:// URL": c, "outside video": e,
            "symlink to a video": a, "symlink out of the roots": e}
    yield Hostile(root, media, manifest, rows, good)
    sock.close()


def _csv_line(row: Row) -> bytes:
    raw = row.cell if isinstance(row.cell, bytes) else row.cell.encode()
    cell = b'"' + raw.replace(b'"', b'""') + b'"'
    return (cell + b"," if row.column == "path" else b"," + cell) + b"\r\n"


def _table(hostile: Hostile, videos: list[dict]) -> str:
    """The run's outcome per row, as markdown (printed: ``pytest -rP`` shows it)."""
    lines = ["| bad input | status | reason |", "|---|---|---|"]
    for r, v in zip(hostile.rows, videos, strict=False):
        reason = (v["reason"] or "").replace(str(hostile.root), "…")
        lines.append(f"| {r.label} | {v['status']} | {reason or '–'} |")
    return "\n".join(lines)


def _check(videos: list[dict], clips: list[dict], hostile: Hostile, confined: bool) -> None:
    """Every row in manifest order with its expected status and reason; ok rows have clips."""
    expected = [(r.label, *(r.confined if confined and r.confined else (r.status, r.reason)))
                for r in hostile.rows]
    assert len(videos) == len(hostile.rows)
    got = [(r.label, v["status"], v["reason"]) for r, v in zip(hostile.rows, videos, strict=True)]
    print(_table(hostile, videos))
    wrong = [f"{g} != {e}" for g, e in zip(got, expected, strict=True) if g != e]
    assert not wrong, "\n".join(wrong)
    by_label = {r.label: v for r, v in zip(hostile.rows, videos, strict=True)}
    for label, real in hostile.good.items():  # symlinks resolved: the real file is recorded
        if by_label[label]["status"] != "failed":
            assert by_label[label]["path"] == os.path.realpath(real)
    assert by_label["relative ../ path"]["source"].endswith("lists/../videos/b.mp4")
    long_source = by_label["value of 100k chars"]["source"]  # cut, its length noted
    assert len(long_source) < 400 and re.search(r"y\.\.\.\[1000\d\d characters\]$", long_source)
    ok_ids = {v["video_id"] for v in videos if v["status"] == "ok"}
    assert len(ok_ids) == sum(s == "ok" for _, s, _ in expected)
    assert {c["video_id"] for c in clips} == ok_ids
    assert len(clips) == 3 * len(ok_ids)  # 10 frames at 10 fps in clips of 4: 4, 4, 2


def test_hostile_manifest_library_run(hostile: Hostile, tmp_path: Path) -> None:
    t0 = time.monotonic()
    items = list_source(SourceSpec("manifest", str(hostile.manifest)))
    videos, clips = ingest(
        items, **CLIP, download_dir=tmp_path / "dl", timeout_s=TIMEOUT_S,
        total_timeout_s=TOTAL_TIMEOUT_S, max_bytes=MAX_DOWNLOAD, max_file_bytes=MAX_FILE,
        probe_timeout_s=10,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    _check(videos, clips, hostile, confined=False)
    assert elapsed < RUN_BOUND_S, f"took {elapsed:.1f}s"
    assert not list((tmp_path / "dl").glob(".*.part"))  # no half download left behind


def test_hostile_manifest_prefect_flow(hostile: Hostile, prefect_api_url: str) -> None:
    """``python -m flows.ingest`` on the same manifest, confined to the media folder by a
    relative ``allowed_roots``; it talks to the session's Prefect server (no second one)."""
    project = make_project(hostile.root / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["source"] = {"kind": "manifest", "path": "../media/lists/m.csv"}
    params["ingest"].update(
        **CLIP, download_timeout_s=FLOW_TIMEOUT_S, download_total_timeout_s=FLOW_TOTAL_TIMEOUT_S,
        download_max_mb=MAX_DOWNLOAD / 2**20, download_retries=0, max_mb=MAX_FILE / 2**20,
        probe_timeout_s=10, allowed_roots=["../media"],
    )  # fmt: skip
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env(project, prefect_api=prefect_api_url)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.ingest"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = project / "data" / "manifest"
    videos = pq.read_table(manifest / "videos.parquet").to_pylist()
    clips = pq.read_table(manifest / "clips.parquet").to_pylist()
    _check(videos, clips, hostile, confined=True)
    assert elapsed < RUN_BOUND_S + 45, f"took {elapsed:.1f}s"


def test_flow_retries_transient_download_failures_only(server: _HostileServer, project_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``ingest.download_retries`` through the flow's Prefect task, the one retry layer: a URL
    is tried at most ``download_retries + 1`` times, a 4xx once, and a retry can succeed."""
    from flows import retries
    from flows.ingest import ingest_flow

    monkeypatch.setattr(retries, "RETRY_DELAY_S", 0.05)  # the backoff's first wait
    routes = ["/busy.mp4", "/flaky.mp4", "/gone.mp4"]
    (project_dir / "m.csv").write_text("url\n" + "".join(f"{server.url}{r}\n" for r in routes))
    params = yaml.safe_load((project_dir / "params.yaml").read_text())
    params["source"] = {"kind": "manifest", "path": "m.csv"}
    params["ingest"].update(**CLIP, download_retries=2)
    (project_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = {r: server.hits[r] for r in routes}
    ingest_flow()
    videos = pq.read_table(project_dir / "data" / "manifest" / "videos.parquet").to_pylist()
    got = {v["source"].rsplit("/", 1)[-1]: (v["status"], v["reason"]) for v in videos}
    assert got == {"busy.mp4": ("failed", "download_http_503"), "flaky.mp4": ("ok", None),
                   "gone.mp4": ("failed", "download_http_404")}
    assert {r: server.hits[r] - before[r] for r in routes} == {
        "/busy.mp4": 3, "/flaky.mp4": 2, "/gone.mp4": 1}
