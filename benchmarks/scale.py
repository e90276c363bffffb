"""Dataset scale: ingest + preprocess + mask bank over N short videos, for growing N. Prints,
never asserts.

    python benchmarks/scale.py                     # N = 100, 400, 1600 on this machine
    python benchmarks/scale.py --sizes 100 400 1600 6400
    python benchmarks/scale.py --cluster           # preprocess on a 2-node Ray cluster

Videos: half synthetic portraits from the generator, half the animated real photographs (one
motion per seed), 8 frames at 96 px (one clip each); every one goes through the detector,
landmarker, parser and identity embedder (exact labels are not trusted here). Each N runs in a
fresh project folder, each stage as its own process (``python -m flows.<stage>``) reporting to
one Prefect server, as a scheduled deployment would. Per N it prints the seconds per stage and
per video, the driver's peak RSS (the stage's own process) and its children's (Ray's workers
with ``--cluster``; the local runner's workers are threads of the driver), the share of the
preprocess stage's wall time spent outside the batches' own work (Prefect's engine and task
runs, the driver, start-up), shards and bytes. Then a least-squares fit of time against N (R²)
and of the driver's peak RSS against N (MiB per 1000 videos: flat is ~0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.local_cluster import two_node_cluster  # noqa: E402
from preprocessing.mp_models import models_dir  # noqa: E402
from preprocessing.video import write_video  # noqa: E402
from synthetic.sample import REAL_PHOTOS, generate_sample, real_clip  # noqa: E402

FRAMES, SIZE, FPS = 8, 96, 12
# Variables naming another project's state: each run gets its own.
STATE_VARS = ("DURIAN_PROJECT_DIR", "DURIAN_PARAMS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL",
              "PREFECT_HOME", "RAY_ADDRESS")


def make_videos(folder: Path, n: int) -> list[Path]:
    """``n`` distinct short videos (cached in ``folder`` across runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_synth = n // 2
    synth = generate_sample(folder / "synth", n_synthetic=n_synth, n_frames=FRAMES, size=SIZE,
                            fps=FPS, seed=7, real_photos=False, keep_existing=True)
    names = list(REAL_PHOTOS)
    real = []
    for i in range(n - n_synth):
        path = folder / "real" / f"{names[i % len(names)]}_{i:05d}.mp4"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            clip = real_clip(names[i % len(names)], FRAMES, SIZE, seed=i // len(names))
            write_video(path, clip, fps=FPS, crf=18)
        real.append(path)
    videos = [v for pair in zip(synth, real, strict=False) for v in pair]
    return videos + synth[len(real):] + real[len(synth):]


def project(dest: Path, videos: list[Path], overrides: dict) -> Path:
    """A project whose source folder holds links to ``videos``."""
    source = dest / "incoming"
    source.mkdir(parents=True)
    for v in videos:
        link = source / v.name
        link.symlink_to(v.resolve())
        sidecar = v.with_suffix(".gt.npz")
        if sidecar.exists():
            (source / sidecar.name).symlink_to(sidecar.resolve())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["source"] = {**params["source"], "kind": "folder", "path": "incoming"}
    for section, values in overrides.items():
        params[section] = {**params.get(section, {}), **values}
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


class PeakRss:
    """Peak RSS of a process and, separately, of its descendants and the processes ``extra()``
    lists (Ray's workers, which are not its children), all together; polled every 0.2 s."""

    def __init__(self, pid: int, extra: Callable[[], list[psutil.Process]]) -> None:
        self.proc = psutil.Process(pid)
        self.extra = extra
        self.driver = self.children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, self.proc.memory_info().rss)
                kids = {p.pid: p for p in self.proc.children(recursive=True) + self.extra()}
                kids = list(kids.values())
                total = 0
                for k in kids:
                    try:
                        total += k.memory_info().rss
                    except psutil.Error:
                        continue
                self.children = max(self.children, total)
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_stage(stage: str, cwd: Path, env: dict[str, str],
              workers: Callable[[], list[psutil.Process]]) -> tuple[float, int, int]:
    """(seconds, driver peak RSS, children's peak RSS) of ``python -m flows.<stage>``."""
    log = open(cwd / f"{stage}.log", "wb")  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"flows.{stage}"], cwd=cwd, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    rss = PeakRss(proc.pid, workers)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    rss.stop()
    log.close()
    if rc != 0:
        tail = (cwd / f"{stage}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{stage} failed ({rc}):\n{tail}")
    return wall, rss.driver, rss.children


def prefect_server(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    log = open(home / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
         "--port", str(port)], cwd=home, env=env | {"PREFECT_HOME": str(home)}, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return server, api
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the Prefect server did not start")


def fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """(intercept, slope, R²) of a least-squares line."""
    slope, intercept = np.polyfit(x, y, 1)
    pred = intercept + slope * np.asarray(x)
    ss_res = float(((np.asarray(y) - pred) ** 2).sum())
    ss_tot = float(((np.asarray(y) - np.mean(y)) ** 2).sum())
    return float(intercept), float(slope), 1.0 - ss_res / ss_tot if ss_tot else 1.0


def bytes_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 400, 1600])
    ap.add_argument("--cluster", action="store_true", help="preprocess on a 2-node Ray cluster")
    ap.add_argument("--batch-videos", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--videos", type=Path, default=Path(tempfile.gettempdir()) / "durian-scale",
                    help="cache of generated videos (reused across runs)")
    args = ap.parse_args(argv)

    print(f"generating up to {max(args.sizes)} videos in {args.videos} ...", flush=True)
    t0 = time.perf_counter()
    videos = make_videos(args.videos, max(args.sizes))
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="ds", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if k not in STATE_VARS}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Every node reads the mediapipe models from one folder (a cluster's shared disk).
    env["DURIAN_MODELS_DIR"] = str(models_dir())
    (work / "prefect").mkdir()
    server, api = prefect_server(work / "prefect", env)
    env["PREFECT_API_URL"] = api
    rows = []
    try:
        with (two_node_cluster(work / "ray", env, cpus=max(1, args.workers // 2))
              if args.cluster else contextlib.nullcontext()) as address:
            for n in args.sizes:
                rows.append(one_size(n, videos[:n], work, env, address, args))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args)


def one_size(n: int, videos: list[Path], work: Path, env: dict[str, str],
             address: str | None, args: argparse.Namespace) -> dict:
    preprocess = {"resolution": 64, "min_face_size": 24, "trust_ground_truth": False,
                  "parser_check": False, "batch_videos": args.batch_videos,
                  "workers": args.workers, "runner": "ray" if address else "local"}
    root = project(work / f"n{n}", videos, {
        "ingest": {"clip_frames": 8, "min_clip_frames": 6},
        "preprocess": preprocess,
        "shards": {"max_samples": 256},
        "train": {"ray_address": address},
    })
    stage_env = env | {"DURIAN_PROJECT_DIR": str(root)}
    def ray_workers() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["name"]):
            if (proc.info["name"] or "").startswith("ray::"):
                found.append(proc)
        return found

    row: dict = {"videos": n}
    for stage in ("ingest", "preprocess", "mask_bank"):
        wall, driver, children = run_stage(stage, root, stage_env,
                                           ray_workers if address else list)
        row[f"{stage}_s"] = round(wall, 1)
        row[f"{stage}_driver_mib"] = round(driver / 2**20)
        row[f"{stage}_children_mib"] = round(children / 2**20)
    summary = json.loads((root / "data" / "shards" / "summary.json").read_text())
    busy = summary["batch_seconds"] / max(1, min(args.workers, summary["batches"]))
    row.update(
        total_s=round(row["ingest_s"] + row["preprocess_s"] + row["mask_bank_s"], 1),
        samples=summary["samples"], rejected=summary["rejected"], shards=summary["shards"],
        batches=summary["batches"], failed=summary["videos_failed"],
        shard_mib=round(bytes_of(root / "data" / "shards") / 2**20, 1),
        outside_batches=round(max(0.0, 1 - busy / row["preprocess_s"]), 3),
        nodes=len(summary["workers"]),
    )
    row["s_per_video"] = round(row["total_s"] / n, 3)
    shutil.rmtree(root / "data", ignore_errors=True)
    return row


def report(rows: list[dict], args: argparse.Namespace) -> None:
    where = "2-node Ray cluster" if args.cluster else f"local runner, {args.workers} workers"
    print(f"\n{where}; batches of {args.batch_videos} videos; {FRAMES} frames at {SIZE} px\n")
    print("| videos | ingest s | preprocess s | mask bank s | total s | s/video | "
          "driver peak MiB (pre) | workers peak MiB (pre) | outside batches | samples | "
          "rejected | shards | MiB |")
    print("|" + "---|" * 13)
    for r in rows:
        print(f"| {r['videos']} | {r['ingest_s']} | {r['preprocess_s']} | {r['mask_bank_s']} | "
              f"{r['total_s']} | {r['s_per_video']} | {r['preprocess_driver_mib']} | "
              f"{r['preprocess_children_mib']} | {r['outside_batches']:.1%} | {r['samples']} | "
              f"{r['rejected']} | {r['shards']} | {r['shard_mib']} |")
    if len(rows) >= 2:
        n = [r["videos"] for r in rows]
        a, b, r2 = fit(n, [r["total_s"] for r in rows])
        print(f"\ntotal time = {a:.1f} s + {b:.3f} s/video x N   (R² = {r2:.4f})")
        a, b, r2 = fit(n, [r["preprocess_s"] for r in rows])
        print(f"preprocess = {a:.1f} s + {b:.3f} s/video x N   (R² = {r2:.4f})")
        for stage in ("ingest", "preprocess", "mask_bank"):
            _, b, _ = fit(n, [r[f"{stage}_driver_mib"] for r in rows])
            peaks = ", ".join(str(r[f"{stage}_driver_mib"]) for r in rows)
            print(f"{stage} driver peak RSS: {peaks} MiB; slope {b * 1000:+.1f} MiB per 1000 "
                  "videos")


if __name__ == "__main__":
    main()
