from pathlib import Path

import pytest
import yaml

from flows.params import ParamsError, load_params, parse_overrides, parse_params

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
        # The library's own configs, validated as sections of the file.
        ({"model": {"profile": "sd15", "widths": [64, 128]}}, "model:"),
        ({"model": {"pixel_downscale": 3}}, "model.pixel_downscale:"),
        ({"pair": {"drop_all_prob": 0.9, "drop_identity_prob": 0.2}}, "pair:"),
        ({"pair": {"categories": ["tiara"]}}, "pair.categories:"),
        ({"pair": {"resolution": 32}}, "pair.resolution: the pairs are made at model.resolution"),
        ({"train": {"timestep_bias": "middle"}}, "train.timestep_bias:"),
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


def test_params_yaml_lists_every_knob_of_the_library_sections():
    """params.yaml documents every field of model, pair and train (with its comment there)."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    for section in ("model", "pair", "train"):
        fields = set(type(getattr(params, section)).model_fields)
        if section == "pair":
            fields.discard("resolution")  # the model's (see Params)
        assert set(data[section]) == fields, section


def test_overrides_are_laid_over_the_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump({"train": {"steps": 7, "lr": 0.01}}))
    params = load_params(f, parse_overrides(["train.steps=3", "model.widths=[64, 128]"]))
    assert (params.train.steps, params.train.lr, params.model.widths) == (3, 0.01, (64, 128))
    with pytest.raises(ParamsError, match="section.key=value"):
        parse_overrides(["steps=3"])
