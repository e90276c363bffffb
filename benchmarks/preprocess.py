"""Preprocessing throughput: frames per second per core for each step and for the whole chain.
Prints, never asserts.

    python benchmarks/preprocess.py                  # 256x256 crops, real-photo videos
    python benchmarks/preprocess.py --videos 4 --frames 24 --size 512 --ray

Input: the sample's animated real photographs (astronaut, Grace Hopper; moving heads, so the
detector, landmarker and parser all run — the synthetic videos' exact labels would skip them),
one video per (photo, seed). Steps, one process: decode (PyAV), detect (BlazeFace on every
frame, tiles included), landmarks (the analyzer's whole per-clip pass: keyframe detection +
Face Landmarker over the face region), parse (landmark parser incl. selfie segmentation, on
the 256x256 crops), encode+write (lossless H.264 + npz + tar shard). The chain runs
``flows.preprocess.process_video`` per video with 1 and 2 workers: threads (the flow's local
runner) and, with ``--ray``, Ray tasks (``preprocess.runner: ray``). "per core" = frames / wall
seconds / workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flows  # noqa: E402,F401  (offline/loopback environment first)
from durian.data.clip_codec import Clip, encode_clip  # noqa: E402
from flows.params import PreprocessParams  # noqa: E402
from flows.preprocess import process_video  # noqa: E402
from preprocessing.faces import (  # noqa: E402
    FaceAnalyzer,
    crop_boxes,
    crop_frames,
    landmarks_to_crop,
    select_track,
)
from preprocessing.ingest import ingest  # noqa: E402
from preprocessing.parsing import LandmarkParser  # noqa: E402
from preprocessing.shards import ShardWriter  # noqa: E402
from preprocessing.video import read_frames, write_video  # noqa: E402
from synthetic.sample import REAL_PHOTOS, real_clip  # noqa: E402

RESOLUTION = 256


def make_videos(out: Path, n: int, frames: int, size: int) -> list[Path]:
    names = list(REAL_PHOTOS)
    videos = []
    for i in range(n):
        name = names[i % len(names)]
        clip = real_clip(name, frames, size, seed=i // len(names))
        videos.append(write_video(out / f"{name}_{i}.mp4", clip, fps=12, crf=12))
    return videos


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - t0


def steps(videos: list[Path], out: Path) -> dict[str, tuple[int, float]]:
    """{step: (frames, seconds)} in one process."""
    totals: dict[str, list[float]] = {k: [0, 0.0] for k in
                                      ("decode", "detect", "landmarks", "parse", "encode+write")}
    parser = LandmarkParser()
    with FaceAnalyzer() as analyzer, parser, ShardWriter(out / "steps", max_count=64) as writer:
        for i, video in enumerate(videos):
            (frames, _), dt = timed(read_frames, video, fps=12)
            n = len(frames)
            totals["decode"][0] += n
            totals["decode"][1] += dt
            _, dt = timed(lambda f=frames: [analyzer.detect(x) for x in f])
            totals["detect"][0] += n
            totals["detect"][1] += dt
            per_frame, dt = timed(analyzer.landmarks, frames, 12)
            totals["landmarks"][0] += n
            totals["landmarks"][1] += dt
            track = select_track(per_frame, 32)
            boxes = crop_boxes(track, margin=0.6)
            crops = crop_frames(frames, boxes, RESOLUTION)
            lms = landmarks_to_crop(track, boxes, RESOLUTION)
            labels, dt = timed(parser.parse, crops, lms)
            totals["parse"][0] += n
            totals["parse"][1] += dt
            t0 = time.perf_counter()
            sample = encode_clip(f"bench_{i:04d}", Clip(crops, labels, lms, {"num_frames": n}))
            writer.write(sample)
            totals["encode+write"][0] += n
            totals["encode+write"][1] += time.perf_counter() - t0
    return {k: (int(v[0]), v[1]) for k, v in totals.items()}


DEFAULTS = PreprocessParams()


def chain_config() -> dict:
    return {"parser": "landmarks", "parser_weights": None, "max_side": 1024,
            "trust_ground_truth": False, "resolution": RESOLUTION, "margin": 0.6,
            "min_face_size": 32, "val_fraction": 0.0, "seed": 0, "crf": 0, "retries": 0,
            "second_face_min_ratio": DEFAULTS.second_face_min_ratio,
            "second_face_min_fraction": DEFAULTS.second_face_min_fraction}


def chain_threads(groups: list[list[dict]], workers: int) -> float:
    cfg = chain_config()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda g: process_video(g, cfg), groups))
    wall = time.perf_counter() - t0
    assert all(r["samples"] for r in results), [r["rejected"] for r in results]
    return wall


def chain_ray(groups: list[list[dict]], workers: int) -> float:
    import ray

    from flows.ray_adapter import init_ray

    init_ray(None, num_cpus=workers)
    remote = ray.remote(num_cpus=1)(process_video)
    cfg = chain_config()
    # Worker start-up and model load, not timed: one warm-up task per worker, held together.
    ray.get([remote.options(scheduling_strategy="SPREAD").remote(groups[0][:1], cfg)
             for _ in range(workers)])
    t0 = time.perf_counter()
    ray.get([remote.remote(g, cfg) for g in groups])
    wall = time.perf_counter() - t0
    ray.shutdown()
    return wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=512, help="source video height")
    ap.add_argument("--ray", action="store_true", help="also time the chain on Ray")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="durian-bench-") as tmp:
        out = Path(tmp)
        videos = make_videos(out / "videos", args.videos, args.frames, args.size)
        print(f"{len(videos)} videos x {args.frames} frames, source {args.size}px high, "
              f"crops {RESOLUTION}x{RESOLUTION}, {os.cpu_count()} CPUs")
        print(f"\n{'step':<16}{'frames':>8}{'seconds':>10}{'fps/core':>10}")
        for name, (n, s) in steps(videos, out).items():
            print(f"{name:<16}{n:>8}{s:>10.2f}{n / s:>10.1f}")

        rows, clips = ingest([str(v) for v in videos], fps=12, clip_frames=args.frames,
                             min_clip_frames=1)
        groups: dict[str, list] = {}
        for c in clips:
            groups.setdefault(c["video_id"], []).append(c)
        frames = sum(c["num_frames"] for c in clips)
        print(f"\n{'chain':<16}{'workers':>8}{'seconds':>10}{'fps':>10}{'fps/core':>10}")
        runners = [("local threads", chain_threads)] + ([("ray", chain_ray)] if args.ray else [])
        for label, fn in runners:
            for workers in (1, 2):
                wall = fn(list(groups.values()), workers)
                print(f"{label:<16}{workers:>8}{wall:>10.2f}{frames / wall:>10.1f}"
                      f"{frames / wall / workers:>10.1f}")


if __name__ == "__main__":
    main()
