from pathlib import Path

import pytest
import yaml

from durian.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.train.num_workers >= 1
    assert params.model.profile in ("tiny", "sd15")


def test_paper_params_are_valid():
    params = load_params(ROOT / "params" / "paper.yaml")
    assert params.model.profile == "sd15"
    assert params.train.use_gpu


@pytest.mark.parametrize(
    "data, key",
    [
        ({"train": {"stpes": 3}}, "train.stpes: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"train": {"steps": "many"}}, "train.steps:"),
        ({"train": {"steps": 0}}, "train.steps:"),
        ({"shards": {"val_fraction": 1.5}}, "shards.val_fraction:"),
        ({"preprocess": {"runner": "spark"}}, "preprocess.runner:"),
        ({"ingest": {"clip_frames": 4, "min_clip_frames": 8}}, "ingest:"),
    ],
)
def test_bad_params_fail_with_the_key_named_on_one_line(data, key):
    with pytest.raises(ParamsError) as err:
        parse_params(data, origin="params.yaml")
    message = str(err.value)
    assert key in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_partial_file_gets_defaults(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"train": {"steps": 7}}))
    params = load_params(f)
    assert params.train.steps == 7
    assert params.sample.seed == 0
