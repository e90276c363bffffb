"""Preprocessing throughput: frames per second per core for each step and for the whole chain.
Prints, never asserts.

    python benchmarks/preprocess.py                  # 256x256 crops, real-photo videos
    python benchmarks/preprocess.py --videos 4 --frames 24 --size 512 --ray
    python benchmarks/preprocess.py --agreement 12   # and the parser's mIoU on synthetic clips

Input: the sample's animated real photographs (astronaut, Grace Hopper; moving heads, so the
detector, landmarker and parser all run — the synthetic videos' exact labels would skip them),
one video per (photo, seed). Steps, one process: decode (PyAV), detect (``FaceAnalyzer.detect``
on every frame: the whole frame, and its tiles where a face could be under the whole frame's
reach), landmarks (the analyzer's whole per-clip pass: keyframe detection + Face Landmarker
tracking the face), parse (the chain's parser, ``load_parser("landmarks")``: landmark parser
incl. selfie segmentation and the derived beard, on the 256x256 crops), encode+write (lossless
H.264 + npz + tar shard). The chain runs ``flows.preprocess.process_video`` per video with 1
and 2 workers: threads (the flow's local runner) and, with ``--ray``, Ray tasks
(``preprocess.runner: ray``). "per core" = frames / wall seconds / workers. "cpu s" is this
process's CPU time (all its threads; not shown for Ray, whose workers are other processes):
on a machine shared with other work, frames / cpu s is the steadier per-core rate.

``--agreement N``: the chain's parser against the exact labels of N synthetic clips (cropped
like the chain does, from their true landmarks): mean per-class IoU over the classes the
parser can output, and over every class of the exact labels.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flows  # noqa: E402,F401  (offline/loopback environment first)
from durian.data.clip_codec import Clip, encode_clip  # noqa: E402
from flows.params import load_params  # noqa: E402
from flows.preprocess import process_video, stage_config  # noqa: E402
from preprocessing.crop import process_clip  # noqa: E402
from preprocessing.faces import (  # noqa: E402
    FaceAnalyzer,
    crop_boxes,
    crop_frames,
    landmarks_to_crop,
    select_track,
)
from preprocessing.ingest import ingest  # noqa: E402
from preprocessing.parsing import (  # noqa: E402
    load_parser,
    parser_agreement,
    summarize_agreement,
)
from preprocessing.shards import ShardWriter  # noqa: E402
from preprocessing.video import read_frames, write_video  # noqa: E402
from synthetic.sample import REAL_PHOTOS, real_clip, synthetic_clip  # noqa: E402

RESOLUTION = 256


def make_videos(out: Path, n: int, frames: int, size: int) -> list[Path]:
    names = list(REAL_PHOTOS)
    videos = []
    for i in range(n):
        name = names[i % len(names)]
        clip = real_clip(name, frames, size, seed=i // len(names))
        videos.append(write_video(out / f"{name}_{i}.mp4", clip, fps=12, crf=12))
    return videos


class Clock:
    """Wall and process CPU seconds of what runs inside ``with``."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter()
        self.cpu += time.process_time()


def chain_parser():
    cfg = chain_config()
    return load_parser(cfg["parser"], cfg["parser_weights"], segment_every=cfg["segment_every"])


def steps(videos: list[Path], out: Path) -> dict[str, tuple[int, float, float]]:
    """{step: (frames, wall seconds, cpu seconds)} in one process."""
    preset = chain_config()["preset"]
    totals = {k: [0, 0.0, 0.0] for k in ("decode", "detect", "landmarks", "parse", "encode+write")}

    def add(step: str, n: int, clock: Clock) -> None:
        totals[step][0] += n
        totals[step][1] += clock.wall
        totals[step][2] += clock.cpu

    with contextlib.ExitStack() as stack:
        parser = chain_parser()
        if hasattr(parser, "__exit__"):
            stack.enter_context(parser)
        analyzer = stack.enter_context(FaceAnalyzer())
        writer = stack.enter_context(ShardWriter(out / "steps", max_count=64))
        for i, video in enumerate(videos):
            with Clock() as c:
                frames, _ = read_frames(video, fps=12)
            n = len(frames)
            add("decode", n, c)
            with Clock() as c:
                for x in frames:
                    analyzer.detect(x)
            add("detect", n, c)
            with Clock() as c:
                per_frame = analyzer.landmarks(frames, 12)
            add("landmarks", n, c)
            track = select_track(per_frame, 32)
            boxes = crop_boxes(track, margin=0.6)
            crops = crop_frames(frames, boxes, RESOLUTION)
            lms = landmarks_to_crop(track, boxes, RESOLUTION)
            with Clock() as c:
                labels = parser.parse(crops, lms)
            add("parse", n, c)
            with Clock() as c:
                sample = encode_clip(f"bench_{i:04d}", Clip(crops, labels, lms, {"num_frames": n}),
                                     preset=preset)
                writer.write(sample)
            add("encode+write", n, c)
    return {k: (int(v[0]), v[1], v[2]) for k, v in totals.items()}


def agreement(n_clips: int) -> tuple[float, float]:
    """The chain's parser on ``n_clips`` synthetic clips (24 frames, 384 px high) against their
    exact labels: (mIoU over the classes it can output, mIoU over all classes shown)."""
    rows = []
    with contextlib.ExitStack() as stack:
        parser = chain_parser()
        if hasattr(parser, "__exit__"):
            stack.enter_context(parser)
        for i in range(n_clips):
            frames, labels, landmarks, _ = synthetic_clip(i, 24, 384, seed=0)
            exact = process_clip(
                frames, fps=12, size=RESOLUTION, margin=0.6, min_face_size=32, parser=None,
                analyzer=None, ground_truth={"landmarks": landmarks, "parsing": labels},
            )  # fmt: skip
            rows.append(parser_agreement(parser.parse(exact.frames, exact.landmarks),
                                         exact.parsing))
    detects = getattr(parser, "detects", None)
    seen = summarize_agreement(
        [{c: v for c, v in row.items() if detects is None or c in detects} for row in rows]
    )
    return seen["miou"], summarize_agreement(rows)["miou"]


def chain_config() -> dict:
    """The stage's own config from the repository's params.yaml, at the benchmark's size."""
    return {**stage_config(load_params(ROOT / "params.yaml")), "trust_ground_truth": False,
            "resolution": RESOLUTION, "min_face_size": 32, "val_fraction": 0.0, "retries": 0,
            # The chain measured is decode -> ... -> encode+write; the identity embedding
            # (issue 21) is a step of its own, kept out so the rates stay comparable.
            "identity_embedder": "none"}


def chain_threads(groups: list[list[dict]], workers: int) -> tuple[float, float | None]:
    cfg = chain_config()
    with Clock() as c, ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda g: process_video(g, cfg), groups))
    assert all(r["samples"] for r in results), [r["rejected"] for r in results]
    return c.wall, c.cpu


def chain_ray(groups: list[list[dict]], workers: int) -> tuple[float, float | None]:
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
    return wall, None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=512, help="source video height")
    ap.add_argument("--ray", action="store_true", help="also time the chain on Ray")
    ap.add_argument("--agreement", type=int, default=0, metavar="N",
                    help="also score the parser on N synthetic clips against exact labels")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="durian-bench-") as tmp:
        out = Path(tmp)
        videos = make_videos(out / "videos", args.videos, args.frames, args.size)
        print(f"{len(videos)} videos x {args.frames} frames, source {args.size}px high, "
              f"crops {RESOLUTION}x{RESOLUTION}, {os.cpu_count()} CPUs")
        print(f"\n{'step':<16}{'frames':>8}{'seconds':>10}{'fps/core':>10}{'cpu s':>8}"
              f"{'fps/cpu s':>11}")
        for name, (n, s, cpu) in steps(videos, out).items():
            print(f"{name:<16}{n:>8}{s:>10.2f}{n / s:>10.1f}{cpu:>8.2f}{n / cpu:>11.1f}")

        rows, clips = ingest([str(v) for v in videos], fps=12, clip_frames=args.frames,
                             min_clip_frames=1)
        groups: dict[str, list] = {}
        for c in clips:
            groups.setdefault(c["video_id"], []).append(c)
        frames = sum(c["num_frames"] for c in clips)
        print(f"\n{'chain':<16}{'workers':>8}{'seconds':>10}{'fps':>10}{'fps/core':>10}"
              f"{'cpu s':>8}{'fps/cpu s':>11}")
        runners = [("local threads", chain_threads)] + ([("ray", chain_ray)] if args.ray else [])
        for label, fn in runners:
            for workers in (1, 2):
                wall, cpu = fn(list(groups.values()), workers)
                cpu_cols = f"{cpu:>8.2f}{frames / cpu:>11.1f}" if cpu else ""
                print(f"{label:<16}{workers:>8}{wall:>10.2f}{frames / wall:>10.1f}"
                      f"{frames / wall / workers:>10.1f}{cpu_cols}")
    if args.agreement:
        seen, every = agreement(args.agreement)
        print(f"\nparser mIoU vs exact labels, {args.agreement} synthetic clips: {seen:.4f} "
              f"over the classes it can output, {every:.4f} over every class shown")


if __name__ == "__main__":
    main()
