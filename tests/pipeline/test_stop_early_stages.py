"""Ctrl-C and SIGTERM at a random point of ``sample``, ``ingest``, ``preprocess`` and
``mask_bank`` (issue 23): each stage ends within the bound with its whole process group, leaves
only whole outputs, says what it finished, and a rerun continues from there. Preprocess is
also SIGKILLed once (a crash: the rerun cleans up and still loses and duplicates nothing).

Every run talks to the test session's Prefect server (no temporary server per subprocess).
The random point is seeded: ``DURIAN_STOP_SEED`` picks another one. Run with ``-rP`` for the
table of stop times (stage | signal | exit s).
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from pipeline_helpers import (
    hidden_files,
    library_manifest,
    python,
    read_rows,
    run,
    shard_keys,
    synthetic_videos,
    tiny_project,
)
from project_helpers import project_env, write_clip_shards
from stop_helpers import Stopped, interrupt

from durian.data.clip_codec import Clip
from durian.data.masks import MaskBank
from preprocessing.incremental import STATE_FILE
from preprocessing.shard_index import read_index
from synthetic.sample import sample_videos, sidecar_path, synthetic_clip

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("DURIAN_STOP_SEED", "0"))


@pytest.fixture
def api_url(prefect_api_url: str) -> str:
    return prefect_api_url


def stop(stage: str, project: Path, sig: int, trigger, max_delay_s: float, api_url: str,
         seed: int) -> Stopped:
    """Run ``python -m flows.<stage>``, signal it at a random point, check it stopped."""
    env = project_env(project, prefect_api=api_url)
    stopped = interrupt(["-m", f"flows.{stage}"], project, sig, trigger, max_delay_s,
                        seed + SEED, env)
    stopped.assert_stopped(sig)
    print(f"{stage} | {signal.Signals(sig).name} | exit {stopped.exit_s:.2f} s "
          f"(signal {stopped.delay_s:.2f} s after the trigger) | {finished(stopped)}")
    return stopped


def rerun(stage: str, project: Path, api_url: str) -> str:
    env = project_env(project, prefect_api=api_url)
    done = run([python(), "-m", f"flows.{stage}"], project, env=env, timeout=300)
    return done.stdout + done.stderr  # Prefect's log lines are on stderr


def finished(stopped: Stopped) -> str:
    """What the stage said it had finished (its last line)."""
    m = re.search(r"finished: (.*)\. Rerun to continue from there\.", stopped.output)
    assert m, stopped.output[-2000:]
    return m[1]


def first_int(text: str) -> int:
    """The count a progress line starts with (0 for "nothing finished yet")."""
    m = re.match(r"\D*(\d+)", text)
    return int(m[1]) if m else 0


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """name → (inode, mtime): a file rewritten since shows up as changed."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_sample_stop_keeps_whole_videos_and_rerun_continues(tmp_path, api_url):
    n_synthetic = 16  # ~0.25 s a video: the signals land mid-run
    project = tiny_project(tmp_path / "project", sample={
        "n_synthetic": n_synthetic, "n_frames": 24, "size": 96, "real_photos": True})
    raw = project / "data" / "raw"
    expected = sorted(sample_videos(n_synthetic, True))

    def videos() -> list[str]:
        return sorted(p.name for p in raw.glob("*.mp4"))

    def whole(done: list[str]) -> dict[str, tuple[int, int]]:
        """The finished videos' files: a sidecar written just before the stop, whose video
        was not, is not finished and may be written again."""
        names = {STATE_FILE, *done,
                 *(sidecar_path(v).name for v in done if v.startswith("synth_"))}
        return {n: st for n, st in files(raw).items() if n in names}

    def check_whole(stopped: Stopped) -> list[str]:
        done = videos()
        assert hidden_files(raw) == []  # no temporary of the video being written
        assert all(sidecar_path(raw / v).is_file() for v in done if v.startswith("synth_"))
        # The count said can lag the files by the one video written as the signal came.
        said = first_int(finished(stopped))
        assert said <= len(done) <= said + 1, (said, done)
        assert len(done) < len(expected)
        return done

    first = stop("sample", project, signal.SIGINT, lambda _: len(videos()) >= 1, 1.5,
                 api_url, seed=1)
    at_first = check_whole(first)
    kept = whole(at_first)
    second = stop("sample", project, signal.SIGTERM, lambda _: len(videos()) > len(at_first),
                  0.8, api_url, seed=2)
    at_second = check_whole(second)
    assert set(at_first) <= set(at_second)
    assert {n: files(raw)[n] for n in kept} == kept  # continued: nothing rewritten
    kept = whole(at_second)

    out = rerun("sample", project, api_url)
    assert f"{len(at_second)} kept from an earlier run" in out, out
    assert videos() == expected
    assert hidden_files(raw) == []
    assert {n: files(raw)[n] for n in kept} == kept


def _with_copies(videos: list[Path], folder: Path, copies: int) -> int:
    """Hard links of ``videos`` in ``copies`` sub-folders (items the run probes and finds
    duplicate: ~100 tasks give the signal a window); returns the number of items."""
    for k in range(copies):
        (folder / f"copy{k:02d}").mkdir(parents=True)
        for v in videos:
            os.link(v, folder / f"copy{k:02d}" / v.name)
    return len(videos) * (copies + 1)


def test_ingest_stop_writes_no_manifest_and_rerun_uses_the_cache(tmp_path, api_url):
    project = tiny_project(tmp_path / "project")
    raw = project / "data" / "raw"
    items = _with_copies(synthetic_videos(raw, 8, seed=21, n_frames=16, size=64), raw, 13)
    manifest = project / "data" / "manifest"
    task_done = re.compile(r"Task run 'ingest .*Finished in state Completed")

    def manifests() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(manifest.glob("*"))}

    def check_whole(stopped: Stopped, before: dict[str, bytes]) -> int:
        """The manifests are the earlier ones, or (a stop after the writes) whole new ones."""
        said = finished(stopped)
        if said.startswith("the manifests"):
            assert manifests() != before and hidden_files(manifest) == []
            return 0  # all done: the rerun has nothing left to take from the cache
        assert manifests() == before  # written at the end only: nothing half made
        return first_int(said)

    first = stop("ingest", project, signal.SIGINT, lambda out: task_done.search(out) is not None,
                 0.8, api_url, seed=5)
    probed = check_whole(first, {})
    out = rerun("ingest", project, api_url)
    # Every item finished before the stop comes from the task cache, not a second probe.
    assert out.count("Finished in state Cached") >= probed, out
    videos = read_rows(manifest / "videos.parquet")
    assert len(videos) == items and sum(r["status"] == "ok" for r in videos) == 8
    clips = [r["clip_id"] for r in read_rows(manifest / "clips.parquet")]
    assert len(clips) == 16 and len(set(clips)) == 16

    # Stopped while extending: the earlier manifests stay as they were.
    synthetic_videos(raw / "more", 4, seed=22, n_frames=16, size=64)
    items += 4
    before = manifests()
    second = stop("ingest", project, signal.SIGTERM,
                  lambda out: task_done.search(out) is not None, 0.8, api_url, seed=9)
    probed = check_whole(second, before)
    out = rerun("ingest", project, api_url)
    assert out.count("Finished in state Cached") >= probed, out
    videos = read_rows(manifest / "videos.parquet")
    assert sum(r["status"] == "ok" for r in videos) == 12
    clips = [r["clip_id"] for r in read_rows(manifest / "clips.parquet")]
    assert len(clips) == 24 and len(set(clips)) == 24
    assert hidden_files(manifest) == []


def test_preprocess_stop_or_kill_leaves_listed_whole_shards_and_rerun_continues(tmp_path,
                                                                             api_url):
    # One batch of 2 videos at a time, four clips each: ~1 s a batch, so the signals land
    # mid-run.
    project = tiny_project(tmp_path / "project", preprocess={"workers": 1, "batch_videos": 2})
    videos = synthetic_videos(project / "data" / "raw", 10, seed=11, n_frames=32, size=96)
    expected = library_manifest(project, videos)  # the ingest flow is tested above
    assert len(expected) == 40
    shards = project / "data" / "shards"

    def listed() -> list[str]:
        return [r["key"] for r in read_index(shards)]

    def check_consistent(stopped: Stopped) -> list[str]:
        keys = listed()
        assert hidden_files(shards) == []  # no .partial shard, no index temporary
        # Every visible shard is listed (none half-written, none unlisted) and holds the keys
        # the index says; the stage said exactly what the index holds.
        assert {r["shard"] for r in read_index(shards)} == {p.name for p in shards.glob("*.tar")}
        assert sorted(shard_keys(shards)) == sorted(keys)
        assert len(set(keys)) == len(keys)
        assert first_int(finished(stopped)) == len(keys)
        assert len(keys) < len(expected)
        return keys

    first = stop("preprocess", project, signal.SIGINT, lambda _: len(listed()) >= 1, 1.5,
                 api_url, seed=10)
    at_first = check_consistent(first)
    kept = files(shards)
    second = stop("preprocess", project, signal.SIGTERM,
                  lambda _: len(listed()) > len(at_first), 1.0, api_url, seed=6)
    at_second = check_consistent(second)
    assert set(at_first) <= set(at_second)
    tars = {n: v for n, v in kept.items() if n.endswith(".tar")}
    assert {n: files(shards)[n] for n in tars} == tars  # earlier shards untouched

    # A crash (SIGKILL: no clean-up at all) may leave a partial or an unlisted shard; the
    # rerun removes them and still loses and duplicates nothing.
    killed = interrupt(["-m", "flows.preprocess"], project, signal.SIGKILL,
                       lambda _: len(listed()) > len(at_second), 1.0, seed=SEED + 12,
                       env=project_env(project, prefect_api=api_url))
    assert not killed.children_left
    at_kill = listed()
    assert len(at_second) < len(at_kill) < len(expected), "ended before it could be killed"

    out = rerun("preprocess", project, api_url)
    assert "skipped (done)" in out
    keys = listed()
    assert sorted(keys) == expected  # nothing lost, nothing twice
    assert sorted(shard_keys(shards)) == expected
    assert {r["shard"] for r in read_index(shards)} == {p.name for p in shards.glob("*.tar")}
    assert hidden_files(shards) == []
    assert set(at_second) <= set(at_kill) <= set(keys)


def _bank_shards(shards: Path) -> None:
    """Training shards of a few synthetic portraits (masks of real attribute kinds), repeated
    so that reading them takes a moment."""
    clips = []
    for i in range(4):
        frames, labels, landmarks, _ = synthetic_clip(i, 6, 64, seed=31)
        clips.append(Clip(frames, labels, landmarks, {"identity": f"id{i}"}))
    write_clip_shards(shards, 40, 2, lambda s, c: clips[(s + c) % len(clips)])


def test_mask_bank_stop_keeps_the_earlier_bank_and_rerun_writes_it(tmp_path, api_url):
    project = tiny_project(tmp_path / "project", mask_bank={"frames_per_clip": 6})
    _bank_shards(project / "data" / "shards")
    data = project / "data"
    bank, summary = data / "mask_bank.npz", data / "mask_bank.json"
    reading = "mask bank: reading"

    def check_whole() -> None:
        assert hidden_files(data) == [] and not list(data.glob("*.tmp"))
        if bank.exists():
            counts = {k: v for k, v in MaskBank.load(bank).counts().items() if v}
            assert counts == json.loads(summary.read_text())["counts"]

    first = stop("mask_bank", project, signal.SIGINT, lambda out: reading in out, 0.5,
                 api_url, seed=7)
    assert not bank.exists() and not summary.exists()
    check_whole()
    assert finished(first).startswith("nothing yet")
    rerun("mask_bank", project, api_url)
    check_whole()
    before = bank.read_bytes()
    second = stop("mask_bank", project, signal.SIGTERM, lambda out: reading in out, 0.5,
                  api_url, seed=11)
    check_whole()
    assert bank.read_bytes() == before  # the earlier bank (or the same one again), whole
    assert finished(second).startswith(("nothing yet", "the bank"))
    rerun("mask_bank", project, api_url)
    check_whole()
    assert bank.read_bytes() == before
