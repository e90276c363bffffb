"""The resume rule: the Ray run name is a function of what defines the run (flows/train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import write_train_shards

from flows.params import parse_params
from flows.train import run_name


@pytest.fixture
def shards(tmp_path: Path) -> list[str]:
    return write_train_shards(tmp_path / "shards", num_shards=1, clips_per_shard=1, num_frames=4)


def test_run_name_follows_what_defines_the_run(shards: list[str], tmp_path: Path) -> None:
    base = parse_params({"train": {"steps": 6}})
    name = run_name(base, shards, None)
    assert name.startswith("train-s1-") and name == run_name(base, shards, None)
    # Bookkeeping keys keep the name: a rerun with other checkpoint settings still resumes.
    same = parse_params({"train": {"steps": 6, "checkpoint_every": 1, "max_failures": 3,
                                   "log_every": 2, "resume_data": "reseed"}})  # fmt: skip
    assert run_name(same, shards, None) == name
    # What changes the trajectory gives a fresh run.
    for changed in ({"steps": 7}, {"lr": 1e-3}, {"num_workers": 1}, {"stage": 2}):
        assert run_name(parse_params({"train": {"steps": 6, **changed}}), shards, None) != name
    for section in ({"pair": {"num_frames": 2}}, {"model": {"widths": [64, 128]}}):
        assert run_name(parse_params({"train": {"steps": 6}, **section}), shards, None) != name
    bank = tmp_path / "bank.npz"
    bank.write_bytes(b"one")
    with_bank = run_name(base, shards, bank)
    assert with_bank != name
    bank.write_bytes(b"two")  # same size, other content
    assert run_name(base, shards, bank) != with_bank
    # Starting weights at a fixed path (the latest @champion) are fingerprinted by content.
    init = tmp_path / "champion"
    init.mkdir()
    (init / "config.json").write_text("{}")
    finetune = parse_params({"train": {"steps": 6, "init_from": str(init)}})
    first = run_name(finetune, shards, None)
    (init / "config.json").write_text("[]")
    assert run_name(finetune, shards, None) != first
    # resume: false = a fresh run every time.
    fresh = parse_params({"train": {"steps": 6, "resume": False}})
    assert run_name(fresh, shards, None, "0123456789abcdef") == f"{name}-01234567"
