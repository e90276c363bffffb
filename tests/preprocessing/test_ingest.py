"""Listing sources, downloading over loopback HTTP, probing/splitting, manifests."""

from __future__ import annotations

import csv
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prep_media import damage, level_frames, make_audio_only, make_video, noise_video

from preprocessing.ingest import (
    CLIPS_SCHEMA,
    VIDEOS_SCHEMA,
    DownloadError,
    SourceSpec,
    download,
    ingest,
    ingest_video,
    known_video_ids,
    list_source,
    read_parquet,
    split_into_clips,
    url_filename,
    write_parquet,
)
from preprocessing.video import content_hash, read_frames

# ------------------------------------------------------------------------------ sources


def test_list_folder_recursive_sorted_filtered(tmp_path: Path) -> None:
    for name in ["b/z.mp4", "a.MOV", "b/a/y.mkv", "notes.txt", "c/.keep"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = list_source(SourceSpec("folder", str(tmp_path)))
    assert items == [str(tmp_path / n) for n in ["a.MOV", "b/a/y.mkv", "b/z.mp4"]]
    only_mp4 = list_source(SourceSpec("folder", str(tmp_path), extensions=("mp4",)))
    assert only_mp4 == [str(tmp_path / "b/z.mp4")]


def test_list_folder_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_source(SourceSpec("folder", str(tmp_path / "nope")))
    (tmp_path / "readme.txt").write_text("no videos here")
    with pytest.raises(ValueError, match="lists no videos"):
        list_source(SourceSpec("folder", str(tmp_path)))


def test_list_glob(tmp_path: Path) -> None:
    for name in ["x/1.mp4", "x/2.mp4", "y/3.mp4", "x/4.txt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert list_source(SourceSpec("glob", str(tmp_path / "x" / "*"))) == [
        str(tmp_path / "x/1.mp4"),
        str(tmp_path / "x/2.mp4"),
    ]
    assert len(list_source(SourceSpec("glob", str(tmp_path / "**" / "*.mp4")))) == 3
    with pytest.raises(ValueError):
        list_source(SourceSpec("glob", str(tmp_path / "*.webm")))


def test_list_manifests(tmp_path: Path) -> None:
    sub = tmp_path / "lists"
    sub.mkdir()
    with open(sub / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "url"])
        w.writerow(["clips/a.mp4", ""])
        w.writerow(["/abs/b.mp4", ""])
        w.writerow(["", "http://127.0.0.1:9/c.mp4"])
    assert list_source(SourceSpec("manifest", str(sub / "m.csv"))) == [
        str(sub / "clips/a.mp4"),
        "/abs/b.mp4",
        "http://127.0.0.1:9/c.mp4",
    ]
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/d.mp4"]}), sub / "m.parquet")
    assert list_source(SourceSpec("manifest", str(sub / "m.parquet"))) == [
        "http://127.0.0.1:9/d.mp4"
    ]
    pq.write_table(pa.table({"file": ["a.mp4"]}), sub / "bad.parquet")
    with pytest.raises(ValueError, match="'path' or 'url'"):
        list_source(SourceSpec("manifest", str(sub / "bad.parquet")))
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), sub / "empty.parquet")
    with pytest.raises(ValueError, match="lists no videos"):
        list_source(SourceSpec("manifest", str(sub / "empty.parquet")))
    with pytest.raises(FileNotFoundError):
        list_source(SourceSpec("manifest", str(sub / "missing.csv")))


# ------------------------------------------------------------------------------ downloads


class _Server:
    """A loopback HTTP server with a few misbehaving routes; counts requests per path."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.hits: Counter[str] = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                server.hits[self.path] += 1
                try:
                    server.route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up on purpose (size cap, timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def route(self, h: BaseHTTPRequestHandler) -> None:
        if h.path == "/slow.mp4":
            time.sleep(1.5)
        if h.path in ("/video.mp4", "/slow.mp4"):
            body, length = self.payload, True
        elif h.path == "/big.mp4":
            body, length = b"\0" * 50_000, True
        elif h.path == "/big_unannounced.mp4":
            body, length = b"\0" * 50_000, False
        elif h.path == "/flaky.mp4" and self.hits[h.path] == 1:
            h.send_error(503)
            return
        elif h.path == "/flaky.mp4":
            body, length = b"second time lucky", True
        else:
            h.send_error(404)
            return
        h.send_response(200)
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Server]:
    video = make_video(tmp_path_factory.mktemp("srv") / "v.mp4", level_frames(6)[::-1].copy())
    s = _Server(video.read_bytes())
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_download_ok_atomic_and_cached(server: _Server, tmp_path: Path) -> None:
    url = f"{server.url}/video.mp4"
    path = download(url, tmp_path, timeout_s=5)
    assert path.name == url_filename(url) and path.suffix == ".mp4" and "." not in path.stem
    assert path.read_bytes() == server.payload
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    hits = server.hits["/video.mp4"]
    assert download(url, tmp_path) == path and server.hits["/video.mp4"] == hits


def test_download_refuses_large_bodies(server: _Server, tmp_path: Path) -> None:
    for route in ("/big.mp4", "/big_unannounced.mp4"):
        with pytest.raises(DownloadError) as err:
            download(f"{server.url}{route}", tmp_path, timeout_s=5, max_bytes=10_000)
        assert err.value.reason == "too_large"
        assert server.hits[route] == 1  # not retried
    assert list(tmp_path.iterdir()) == []


def test_download_times_out_and_retries(server: _Server, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/slow.mp4", tmp_path, timeout_s=0.3, retries=1, backoff_s=0.05)
    assert err.value.reason == "timeout"
    assert server.hits["/slow.mp4"] == 2
    assert time.monotonic() - t0 < 1.4  # gave up before the server ever answered
    assert list(tmp_path.iterdir()) == []


def test_download_http_errors(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/nope.mp4", tmp_path, retries=3, backoff_s=0.01)
    assert err.value.reason == "http_404" and server.hits["/nope.mp4"] == 1
    path = download(f"{server.url}/flaky.mp4", tmp_path, retries=1, backoff_s=0.01)
    assert path.read_bytes() == b"second time lucky" and server.hits["/flaky.mp4"] == 2
    with pytest.raises(DownloadError) as err:
        download("file:///etc/passwd", tmp_path)
    assert err.value.reason == "bad_url"


# ------------------------------------------------------------------------------ ingest


def test_split_into_clips() -> None:
    assert split_into_clips(11, 4, 3) == [(0, 4), (4, 4), (8, 3)]
    assert split_into_clips(11, 4, 4) == [(0, 4), (4, 4)]
    assert split_into_clips(2, 4, 3) == []


def test_ingest_video_clips_match_decoding(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", level_frames(23), fps=10)  # 2.3 s
    row, clips = ingest_video(path, fps=5, clip_frames=4, min_clip_frames=3)
    assert row["status"] == "ok" and row["video_id"] == content_hash(path)
    assert (row["width"], row["height"], row["num_frames"]) == (64, 48, 23)
    assert row["fps"] == pytest.approx(10) and row["duration"] == pytest.approx(2.3)
    assert [(c["start"], c["num_frames"]) for c in clips] == [(0, 4), (4, 4), (8, 3)]
    assert [c["clip_id"] for c in clips] == [f"{row['video_id']}_{i:04d}" for i in range(3)]
    for c in clips:
        assert "." not in c["clip_id"] and c["fps"] == 5.0
        frames, idx = read_frames(c["path"], fps=c["fps"], start=c["start"], count=c["num_frames"])
        assert len(frames) == c["num_frames"]
        np.testing.assert_array_equal(idx, 2 * np.arange(c["start"], c["start"] + len(idx)))
    row, clips = ingest_video(path, fps=5, clip_frames=16, min_clip_frames=16)
    assert (row["status"], row["reason"], clips) == ("failed", "too_short", [])


def test_ingest_bad_inputs_recorded_and_run_goes_on(server: _Server, tmp_path: Path) -> None:
    d = tmp_path / "src"
    d.mkdir()
    good = make_video(d / "a_good.mp4", level_frames(10), fps=10)
    shutil.copy(good, d / "b_copy.mp4")
    known = make_video(d / "c_known.mp4", level_frames(8), fps=10)
    make_video(d / "d_vfr.mp4", level_frames(5), fps=30, pts_ms=[0, 40, 300, 340, 700])
    make_video(d / "e_rot.mp4", level_frames(10, 32, 64), fps=10, rotation=-90)
    damage(noise_video(tmp_path / "noise.mp4"), d / "f_corrupt.mp4")
    (d / "g_empty.mp4").write_bytes(b"")
    (d / "h_text.mp4").write_text("not a video")
    make_audio_only(d / "i_audio.mp4")
    items = sorted(str(p) for p in d.iterdir()) + [
        str(d / "j_missing.mp4"),
        f"{server.url}/video.mp4",
        f"{server.url}/slow.mp4",
        f"{server.url}/big.mp4",
    ]
    videos, clips = ingest(
        items, fps=10, clip_frames=4, min_clip_frames=2,
        known_hashes={content_hash(known)}, download_dir=tmp_path / "dl",
        timeout_s=0.3, max_bytes=20_000, retries=0,
    )  # fmt: skip
    got = {Path(v["source"]).name: (v["status"], v["reason"]) for v in videos}
    assert got == {
        "a_good.mp4": ("ok", None),
        "b_copy.mp4": ("duplicate", f"same_content_as:{good}"),
        "c_known.mp4": ("skipped_known", "in_earlier_manifest"),
        "d_vfr.mp4": ("ok", None),
        "e_rot.mp4": ("ok", None),
        "f_corrupt.mp4": ("failed", "corrupt"),
        "g_empty.mp4": ("failed", "empty_file"),
        "h_text.mp4": ("failed", "not_a_video"),
        "i_audio.mp4": ("failed", "audio_only"),
        "j_missing.mp4": ("failed", "not_found"),
        "video.mp4": ("ok", None),
        "slow.mp4": ("failed", "download_timeout"),
        "big.mp4": ("failed", "download_too_large"),
    }
    by_name = {Path(v["source"]).name: v for v in videos}
    assert by_name["d_vfr.mp4"]["variable_frame_rate"] is True
    assert (by_name["e_rot.mp4"]["rotation"], by_name["e_rot.mp4"]["width"]) == (90, 32)
    assert Path(by_name["video.mp4"]["path"]).parent == tmp_path / "dl"
    ok_ids = {v["video_id"] for v in videos if v["status"] == "ok"}
    assert len(ok_ids) == 4 and {c["video_id"] for c in clips} == ok_ids
    assert len({c["clip_id"] for c in clips}) == len(clips)
    # 10 frames at 10 fps → clips of 4, 4, 2; VFR 0.74 s → 7 frames → 4, 3.
    vfr_clips = [c for c in clips if c["video_id"] == by_name["d_vfr.mp4"]["video_id"]]
    assert [c["num_frames"] for c in vfr_clips] == [4, 3]
    assert known_video_ids(videos) == ok_ids

    # Manifests round-trip with their schemas.
    write_parquet(videos, tmp_path / "m" / "videos.parquet", "videos")
    write_parquet(clips, tmp_path / "m" / "clips.parquet", "clips")
    assert read_parquet(tmp_path / "m" / "videos.parquet") == videos
    assert read_parquet(tmp_path / "m" / "clips.parquet") == clips
    assert pq.read_schema(tmp_path / "m" / "videos.parquet").names == VIDEOS_SCHEMA.names


def test_empty_manifests_keep_columns_and_writes_are_atomic(tmp_path: Path) -> None:
    for kind, schema in (("videos", VIDEOS_SCHEMA), ("clips", CLIPS_SCHEMA)):
        path = write_parquet([], tmp_path / f"{kind}.parquet", kind)
        table = pq.read_table(path)
        assert table.num_rows == 0 and table.schema.equals(schema)
    with pytest.raises(ValueError, match="not in the schema"):
        write_parquet([{"clip_id": "x", "typo": 1}], tmp_path / "bad.parquet", "clips")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips.parquet", "videos.parquet"]
