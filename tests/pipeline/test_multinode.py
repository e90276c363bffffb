"""Preprocessing on a real multi-node Ray cluster: two nodes on 127.0.0.1 (two ``ray start``s,
each its own raylet and temp dir). ``preprocess.runner: ray`` spreads its batches over both
nodes, whose workers write their own shards and index parts into the shared folder. (Training
on the same kind of cluster, one worker per node: tests/training/test_training_ray.py.)"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import webdataset as wds
from pipeline_helpers import TINY, library_manifest, set_params, synthetic_videos
from project_helpers import project_env

from durian.data.clip_codec import decode_clip
from flows.local_cluster import two_node_cluster
from preprocessing.mp_models import models_dir
from preprocessing.shard_index import committed_parts, committed_shards, read_index

pytestmark = pytest.mark.e2e


def test_preprocess_batches_run_on_both_nodes_and_write_their_own_shards(
    project_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from flows.preprocess import preprocess_flow

    # Every node reads the mediapipe models from one folder (as a cluster's shared disk); the
    # driver forwards DURIAN_* to the workers.
    monkeypatch.setenv("DURIAN_MODELS_DIR", str(models_dir()))
    # Short: Ray's unix socket paths under its temp dirs must stay below 108 bytes.
    state = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    try:
        with two_node_cluster(state, project_env(project_dir)) as address:
            set_params(project_dir, {
                **TINY,
                "preprocess": {"runner": "ray", "workers": 2, "batch_videos": 1},
                "train": {"ray_address": address},
            })
            clip_ids = library_manifest(
                project_dir, synthetic_videos(project_dir / "data" / "raw", 2, seed=41))
            summary = preprocess_flow()
            nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            assert len(nodes) == 2

            shards = project_dir / "data" / "shards"
            index = read_index(shards)
            assert sorted(r["key"] for r in index) == clip_ids
            assert {r["worker"] for r in index} == nodes == set(summary["workers"])
            # Two batches of one video at once, 1 CPU a node: one batch on each node.
            assert len(committed_parts(shards)) == summary["batches"] == 2
            read_back = [decode_clip(s) for s in wds.WebDataset(
                committed_shards(shards), shardshuffle=False, empty_check=False)]
            assert sorted(c.meta["video_id"] + f"_{c.meta['clip_index']:04d}"
                          for c in read_back) == clip_ids
            assert all(c.frames.shape[1:3] == (64, 64) for c in read_back)
    finally:
        ray.shutdown()
        shutil.rmtree(state, ignore_errors=True)
