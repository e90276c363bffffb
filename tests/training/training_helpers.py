"""Real shards for the trainer tests, and clean-up of the Ray processes a test started.

The clips are drawn faces (as in tests/data/data_synth.py, copied because that folder is only on
sys.path for its own tests): labels, landmarks and pixels move together, and every clip carries
hair and glasses so each example has an attribute. Shards are written with ``encode_clip`` into
real WebDataset tar files named like the preprocess stage names them.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
from project_helpers import write_clip_shards

from durian.data.clip_codec import Clip
from durian.data.pair_config import PairConfig
from durian.models.config import ModelConfig
from durian.training.config import Recipe, TrainConfig
from preprocessing.labels import CLASS

SIZE = 64


def drawn_clip(num_frames: int = 8, size: int = SIZE, identity: str = "id0", seed: int = 0) -> Clip:
    rng = np.random.default_rng(seed)
    frames = np.zeros((num_frames, size, size, 3), np.uint8)
    parsing = np.zeros((num_frames, size, size), np.uint8)
    base = np.empty((478, 3), np.float32)
    base[:, 0] = rng.uniform(0.3, 0.7, 478) * size
    base[:, 1] = rng.uniform(0.35, 0.8, 478) * size
    base[:, 2] = rng.uniform(-0.05, 0.05, 478)
    landmarks = np.repeat(base[None], num_frames, axis=0)
    palette = np.zeros((256, 3), np.uint8)
    palette[CLASS["skin"]], palette[CLASS["hair"]], palette[CLASS["eye_g"]] = rng.integers(
        40, 255, size=(3, 3)
    )
    for t in range(num_frames):
        dx = t // 2
        labels = np.zeros((size, size), np.uint8)
        cx, cy, r = size // 2 + dx, size // 2 + size // 10, size // 4
        cv2.circle(labels, (cx, cy), r, CLASS["skin"], -1)
        cv2.ellipse(labels, (cx, cy - r // 2), (r + 2, r), 0, 180, 360, CLASS["hair"], -1)
        cv2.rectangle(labels, (cx - r, cy - 2), (cx + r, cy + 1), CLASS["eye_g"], -1)
        parsing[t] = labels
        frames[t] = palette[labels]
        frames[t][labels == 0] = 20
        landmarks[t, :, 0] += dx
    return Clip(frames, parsing, landmarks, {"identity": identity, "fps": 12.0, "clip_index": 0})


def write_train_shards(
    directory: Path, num_shards: int = 2, clips_per_shard: int = 3, num_frames: int = 8
) -> list[str]:
    """``train-00000N.tar`` shards of drawn clips, one identity per clip."""
    return write_clip_shards(
        directory, num_shards, clips_per_shard,
        lambda s, c: drawn_clip(num_frames, identity=f"id{s}_{c}", seed=100 * s + c),
    )


def tiny_recipe(resolution: int = SIZE, pair: dict | None = None, **train: object) -> Recipe:
    """A small run of the tiny model: 4 steps of batch 2, pairs 2 frames apart; ``train``
    replaces fields of the training config, ``pair`` of the pair config."""
    settings: dict[str, object] = {"steps": 4, "lr": 2e-4, "batch_size": 2, **train}
    return Recipe(
        model=ModelConfig(resolution=resolution),
        pair=PairConfig(min_gap=2, **(pair or {})),
        train=TrainConfig(**settings),
    )


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_processes(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL the given processes (each by its pid) and wait for them to go."""
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def ray_node_processes() -> list[psutil.Process]:
    """The processes of the Ray node this process started (head services and workers)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001 - no public API
    if node is None:
        return []
    procs = []
    for infos in node.all_processes.values():
        for info in infos:
            pid = info.process.pid
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
            procs.extend(descendants(pid))
    return procs


def shutdown_ray() -> None:
    """ray.shutdown(), then SIGKILL whatever of the node it leaves behind."""
    import ray

    leftovers = ray_node_processes() if ray.is_initialized() else []
    ray.shutdown()
    time.sleep(0.5)
    kill_processes([p for p in leftovers if p.is_running() and p.pid != os.getpid()])


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
