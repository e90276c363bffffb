"""Listing sources, downloading over loopback HTTP, probing/splitting, manifests."""

from __future__ import annotations

import csv
import os
import pickle
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
    ItemError,
    SourceSpec,
    download,
    ingest,
    ingest_video,
    item_problem,
    known_video_ids,
    list_source,
    local_path,
    printable,
    read_parquet,
    resolve_local,
    resolve_roots,
    split_into_clips,
    url_filename,
    url_scheme,
    write_parquet,
)
from preprocessing.video import VideoError, content_hash, probe_video, read_frames

# ------------------------------------------------------------------------------ sources


def test_list_folder_recursive_sorted_filtered(tmp_path: Path) -> None:
    for name in ["b/z.mp4", "a.MOV", "b/a/y.mkv", "notes.txt", "c/.keep"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = list_source(SourceSpec("folder", str(tmp_path)))
    assert items == [str(tmp_path / n) for n in ["a.MOV", "b/a/y.mkv", "b/z.mp4"]]
    only_mp4 = list_source(SourceSpec("folder", str(tmp_path), extensions=("mp4",)))
    assert only_mp4 == [str(tmp_path / "b/z.mp4")]


def test_folder_lists_what_is_not_a_file_for_ingest_to_record(tmp_path: Path) -> None:
    (tmp_path / "dir.mp4").mkdir()  # a folder named like a video: walked into, not listed
    good = make_video(tmp_path / "dir.mp4" / "v.mp4", level_frames(4), fps=10)
    os.mkfifo(tmp_path / "fifo.mp4")
    os.symlink("/dev/zero", tmp_path / "zero.mp4")
    os.symlink(tmp_path / "gone.mp4", tmp_path / "dangling.mp4")
    items = list_source(SourceSpec("folder", str(tmp_path)))
    assert items == [str(tmp_path / n) for n in
                     ["dangling.mp4", "dir.mp4/v.mp4", "fifo.mp4", "zero.mp4"]]
    assert list_source(SourceSpec("glob", str(tmp_path / "*.mp4"))) == [items[0], *items[2:]]
    videos, _ = ingest(items, fps=10, clip_frames=4, min_clip_frames=2)
    assert [(v["status"], v["reason"], v["path"]) for v in videos] == [
        ("failed", "not_found", str(tmp_path / "gone.mp4")),
        ("ok", None, str(good)),
        ("failed", "not_a_regular_file:fifo", str(tmp_path / "fifo.mp4")),
        ("failed", "not_a_regular_file:device", "/dev/zero"),
    ]


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


def test_manifest_rows_of_bad_text_are_kept_for_ingest_to_record(tmp_path: Path) -> None:
    # A BOM, an empty row, undecodable bytes and a NUL: each stays an item (ingest records its
    # reason); the readable rows are unaffected.
    (tmp_path / "m.csv").write_bytes(
        b'\xef\xbb\xbfpath,url\r\na.mp4,\r\n,\r\n"caf\xe9.mp4",\r\n"x\x00y.mp4",\r\n'
    )
    items = list_source(SourceSpec("manifest", str(tmp_path / "m.csv")))
    assert items[0] == str(tmp_path / "a.mp4") and items[1] == ""
    assert [item_problem(i) for i in items] == [
        None, "empty_row", "bad_path:not_utf8", "bad_path:nul_byte"
    ]
    (tmp_path / "blank.csv").write_text("path\n,\n\n")
    with pytest.raises(ValueError, match="lists no videos"):
        list_source(SourceSpec("manifest", str(tmp_path / "blank.csv")))


def test_files_that_cannot_be_manifests_fail_in_one_line(tmp_path: Path) -> None:
    cases = {
        "huge_field.csv": (b"path\n" + b"z" * 200_000 + b"\n", "not a readable CSV"),
        "garbage.parquet": (np.random.default_rng(0).bytes(5000), "not a Parquet file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=message) as err:
            list_source(SourceSpec("manifest", str(tmp_path / name)))
        assert "\n" not in str(err.value)
    os.mkfifo(tmp_path / "fifo.csv")  # reading it would block forever
    (tmp_path / "folder.csv").mkdir()
    for name, kind in (("fifo.csv", "fifo"), ("folder.csv", "directory")):
        with pytest.raises(ValueError, match=f"not a regular file \\({kind}\\)"):
            list_source(SourceSpec("manifest", str(tmp_path / name)))


# ------------------------------------------------------------------------------ what may be read


def test_items_are_classified_without_io() -> None:
    assert [url_scheme(i) for i in ["HTTP://h/x", "file:///x", "C:\\v\\x.mp4", "take:1.mp4",
                                    "./take:1.mp4", "/a:b.mp4", "data:,x"]] == [
        "http", "file", None, "take", None, None, "data"
    ]
    assert item_problem("  ") == "empty_row" and item_problem("a.mp4") is None
    assert item_problem("a\udce9.mp4") == "bad_path:not_utf8"
    assert item_problem("x" * 8193) == "name_too_long" and item_problem("x" * 8192) is None
    assert printable("a\x00\udce9") == "a\\x00\\udce9"
    assert printable("y" * 1000, limit=5) == "yyyyy...[1000 characters]"
    assert local_path("file:///v/a%20b.mp4") == "/v/a b.mp4"
    assert local_path("file://localhost/v/a b.mp4") == "/v/a b.mp4"
    assert local_path("C:\\v\\x.mp4") == "C:\\v\\x.mp4"  # a (relative) path on Linux
    for item, reason in [
        ("ftp://h/x.mp4", "unsupported_scheme:ftp"),
        ("javascript:alert(1)", "unsupported_scheme:javascript"),
        ("file://elsewhere/x.mp4", "bad_url"),
        ("file:relative.mp4", "bad_url"),
        ("file:///a%00b.mp4", "bad_path:nul_byte"),
    ]:
        with pytest.raises(ItemError) as err:
            local_path(item)
        assert err.value.reason == reason


def test_resolve_local_confines_to_allowed_roots(tmp_path: Path) -> None:
    media, outside = tmp_path / "project" / "media", tmp_path / "outside"
    media.mkdir(parents=True)
    outside.mkdir()
    (media / "v.mp4").write_bytes(b"v")
    (outside / "w.mp4").write_bytes(b"w")
    os.symlink(outside / "w.mp4", media / "escape.mp4")
    os.symlink("v.mp4", media / "link.mp4")
    roots = resolve_roots(["media"], tmp_path / "project")  # relative to the project
    assert roots == [str(media)]
    assert resolve_local(str(media / "link.mp4"), None, roots) == str(media / "v.mp4")
    for path in (media / "escape.mp4", media / ".." / ".." / "outside" / "w.mp4", "/dev/zero"):
        with pytest.raises(ItemError) as err:
            resolve_local(str(path), None, roots)
        assert err.value.reason == "outside_allowed_roots"
    assert resolve_local(str(media / "escape.mp4")) == str(outside / "w.mp4")  # no roots
    with pytest.raises(ItemError) as err:
        resolve_local(str(media / "v.mp4"), max_bytes=0)
    assert (err.value.reason, err.value.path) == ("too_large", str(media / "v.mp4"))


def test_content_hash_reads_only_regular_files_and_is_bounded(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.mp4")  # no writer: reading would block forever
    for path, reason in (
        (tmp_path / "fifo.mp4", "not_a_regular_file:fifo"),
        ("/dev/zero", "not_a_regular_file:device"),
        (tmp_path, "not_a_regular_file:directory"),
    ):
        with pytest.raises(VideoError) as err:
            content_hash(path)
        assert err.value.reason == reason
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 20_000)
    assert content_hash(data, max_bytes=20_000) == content_hash(data)
    with pytest.raises(VideoError, match="too_large"):
        content_hash(data, max_bytes=19_999)
    with pytest.raises(VideoError, match="hash_timeout"):
        content_hash(data, chunk_size=1, timeout_s=1e-4)
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing.mp4")


def test_probe_is_bounded_in_time(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", level_frames(10), fps=10)
    assert probe_video(path, verify=True, timeout_s=30).num_frames == 10
    with pytest.raises(VideoError) as err:
        probe_video(path, verify=True, timeout_s=1e-9)
    assert err.value.reason == "probe_timeout"
    row, clips = ingest_video(path, fps=10, clip_frames=4, min_clip_frames=2, video_id="v",
                              timeout_s=1e-9)
    assert (row["status"], row["reason"], clips) == ("failed", "probe_timeout", [])


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
        elif h.path == "/short.mp4":  # announces more than it sends, then hangs up
            h.send_response(200)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(b"only ten b")
            return
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


def test_download_times_out_once(server: _Server, tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/slow.mp4", tmp_path, timeout_s=0.3)
    assert err.value.reason == "timeout" and err.value.transient
    assert server.hits["/slow.mp4"] == 1  # one attempt: retries are the flow's (Prefect's)
    assert time.monotonic() - t0 < 1.2  # gave up before the server ever answered
    assert list(tmp_path.iterdir()) == []


def test_download_http_errors(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/nope.mp4", tmp_path)
    assert err.value.reason == "http_404" and not err.value.transient
    assert err.value.item_reason == "download_http_404"
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/flaky.mp4", tmp_path)
    assert err.value.reason == "http_503" and err.value.transient
    assert pickle.loads(pickle.dumps(err.value)).reason == "http_503"  # as Prefect stores it
    path = download(f"{server.url}/flaky.mp4", tmp_path)
    assert path.read_bytes() == b"second time lucky" and server.hits["/flaky.mp4"] == 2
    with pytest.raises(DownloadError) as err:
        download("file:///etc/passwd", tmp_path)
    assert err.value.reason == "bad_url"


def test_download_refuses_a_truncated_body(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="body ended at 10 of 1000 bytes") as err:
        download(f"{server.url}/short.mp4", tmp_path, timeout_s=5)
    assert err.value.reason == "error"
    assert list(tmp_path.iterdir()) == []


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
        timeout_s=0.3, max_bytes=20_000,
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
