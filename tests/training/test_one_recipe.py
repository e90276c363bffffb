"""One recipe, one trainer: ``durian run``'s training path and the learns-transfer benchmark,
both from params/learns_transfer.yaml, train the same model (issue 25's first "done when")."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import write_train_shards

from durian.training.config import read_recipe_hash
from durian.training.loop import Trainer, export_checkpoint
from flows.params import load_params
from flows.train import worker_config

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "params" / "learns_transfer.yaml"
# A tiny budget: the same overrides reach both paths, as ``--set`` would.
BUDGET = {"train": {"steps": 1, "batch_size": 1, "loader_workers": 0}}


def _benchmark():  # noqa: ANN202 - a module loaded from a file (benchmarks/ is no package)
    spec = importlib.util.spec_from_file_location(
        "learns_transfer", ROOT / "benchmarks" / "learns_transfer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path, pattern: str) -> dict[str, Path]:
    return {str(f.relative_to(folder)): f for f in sorted(folder.rglob(pattern))}


def test_durian_run_and_the_benchmark_train_the_same_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = write_train_shards(tmp_path / "shards", num_shards=1, clips_per_shard=2)
    params = load_params(RECIPE, BUDGET)
    # durian run: what flows/train.py hands every Ray worker, what a worker builds from it, and
    # the export the flow makes of the last checkpoint.
    monkeypatch.setenv("DURIAN_PROJECT_DIR", str(tmp_path))
    config = worker_config(params, shards, run_id=None)
    trainer = Trainer.from_config(config["recipe"], config["shards"], config["mask_bank"])
    list(trainer.steps())
    trainer.save(tmp_path / "checkpoint")
    export_checkpoint(tmp_path / "checkpoint", config["recipe"], tmp_path / "run")
    # The benchmark's variant "durian" from the same file.
    benchmark = _benchmark()
    threads = torch.get_num_threads()  # the same kernels: bit-equal weights need them
    info = benchmark.train_variant("durian", params.recipe(), shards, None, tmp_path / "bench",
                                   threads=threads)  # fmt: skip
    bench = tmp_path / "bench" / "models" / "durian"

    assert info["config_hash"] == trainer.config_hash == config["recipe"].config_hash()
    assert read_recipe_hash(tmp_path / "run") == read_recipe_hash(bench) == info["config_hash"]
    configs = _files(tmp_path / "run", "*.json")
    assert configs.keys() == _files(bench, "*.json").keys() and configs
    for name, path in configs.items():
        assert json.loads(path.read_text()) == json.loads((bench / name).read_text()), name
    # Same recipe, same data, same seed: the same weights (the EMA of one step), bit for bit.
    weights = _files(tmp_path / "run", "*.safetensors")
    assert weights.keys() == _files(bench, "*.safetensors").keys() and weights
    for name, path in weights.items():
        ours, theirs = load_file(str(path)), load_file(str(bench / name))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    # The recipe file is the benchmark's: its widths, schedule and bias reach the model.
    model_config = json.loads((bench / "model" / "config.json").read_text())
    assert model_config["unet_config"]["block_out_channels"] == [64, 128]
    assert model_config["zero_terminal_snr"] is True
    # An ablation is another recipe, hence another hash.
    unmasked = benchmark.variant_recipe(params.recipe(), "unmasked")
    assert unmasked.config_hash() != info["config_hash"]
