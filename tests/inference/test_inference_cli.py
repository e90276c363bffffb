"""``durian animate`` end to end: a playable MP4 from a tiny model on disk or in the registry,
and every bad input ending with exit code 1 and one ``error:`` line (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from inference_helpers import (
    astronaut,
    grace_hopper,
    moving_face_video,
    read_mp4,
    save_png,
    synthetic_portrait,
    tiny_model,
)

from flows.animate import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli")
    a = astronaut()
    g = grace_hopper()
    h = 256
    two = np.concatenate(
        [cv2.resize(a, (h, h)), cv2.resize(g, (int(g.shape[1] * h / g.shape[0]), h))], axis=1
    )
    (d / "text.png").write_text("not an image\n")
    (d / "text.mp4").write_text("not a video\n")
    tiny_model().save_pretrained(d / "model")
    paths = {
        "astronaut": save_png(d / "astronaut.png", a),
        "grace": save_png(d / "grace.png", g),
        "glasses": synthetic_portrait(d / "glasses.png", seed=3, categories=("hair", "glasses")),
        "bald": synthetic_portrait(d / "bald.png", seed=4, categories=()),
        "grey": save_png(d / "grey.png", np.full((160, 160, 3), 128, np.uint8)),
        "two": save_png(d / "two.png", two),
        "small": save_png(d / "small.png", cv2.resize(a, (128, 128), interpolation=cv2.INTER_AREA)),
        "video": moving_face_video(d / "drive.mp4", g, num_frames=4),
        "model": d / "model",
        "text_png": d / "text.png",
        "text_mp4": d / "text.mp4",
        "dir": d,
    }
    return {k: str(v) for k, v in paths.items()}


def argv(media: dict[str, str], **over: str | list[str] | None) -> list[str]:
    """A valid command line with ``over`` replacing (or, with None, dropping) options."""
    opts: dict[str, str | list[str] | None] = {
        "--portrait": media["astronaut"],
        "--attribute": [media["grace"]],
        "--driving": "nod",
        "--out": str(Path(media["dir"]) / "out.mp4"),
        "--model": media["model"],
        "--frames": "2",
        "--steps": "1",
        "--guidance": "1.0",
    }
    opts.update({f"--{k.replace('_', '-')}": v for k, v in over.items()})
    out: list[str] = []
    for k, v in opts.items():
        if v is None:
            continue
        for item in v if isinstance(v, list) else [v]:
            out += [k] if item == "" else [k, item]
    return out


ERROR_CASES = {
    "no face": ({"portrait": "grey"}, "no face found in the portrait 'grey.png'"),
    "several faces": ({"portrait": "two"}, "several faces in the portrait 'two.png'"),
    "face too small": ({"portrait": "small"}, "the face in the portrait 'small.png' is too small"),
    "unreadable image": (
        {"portrait": "text_png"},
        "cannot read portrait 'text.png': not a readable",
    ),
    "missing image": ({"portrait": "/no/such.png"}, "cannot read portrait 'such.png': file not"),
    "unreadable video": ({"driving": "text_mp4"}, "cannot read driving video 'text.mp4'"),
    "missing video": ({"driving": "/no/such.mp4"}, "cannot read driving video 'such.mp4'"),
    "unknown preset": ({"driving": "dance"}, "'dance' is neither a video file nor a preset"),
    "no face in video": ({"driving": "grey_video"}, "no face found in the driving video"),
    "unknown category": ({"attribute": ["grace:wings"]}, "unknown attribute category 'wings'"),
    "attribute not found": (
        {"attribute": ["astronaut:glasses"]},
        "attribute 'glasses' not found in its image",
    ),
    "no face in attribute": ({"attribute": ["grey"]}, "no face found in the attribute 1"),
    "no attribute in image": ({"attribute": ["bald"]}, "no attribute found in its image"),
    "alpha out of range": (
        {"attribute": ["grace", "glasses:glasses"], "alpha": "1.5"},
        "alpha must be between 0 and 1, got 1.5",
    ),
    "alpha with one attribute": ({"alpha": "0.5"}, "exactly 2 attributes, got 1"),
    "ramp with three attributes": (
        {"attribute": ["grace", "glasses", "astronaut"], "alpha-ramp": ""},
        "exactly 2 attributes, got 3",
    ),
    "model not on disk": (
        {"model": "/no/such/model"},
        "model cannot be found in the registry or on disk: /no/such/model",
    ),
    "model folder without a model": (
        {"model": "dir"},
        "model cannot be found in the registry or on disk",
    ),
    "out not mp4": ({"out": "out.avi"}, "--out must name an .mp4 file"),
    "offload without a GPU": (
        {"cpu-offload": "", "device": "cpu"},
        "--cpu-offload keeps the weights on the CPU for a GPU: it needs CUDA",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_error_line(case, media, capsys, tmp_path) -> None:
    over, message = ERROR_CASES[case]
    if case == "no face in video":
        from preprocessing.video import write_video

        write_video(tmp_path / "grey.mp4", np.full((3, 96, 96, 3), 128, np.uint8), 12)
        media = {**media, "grey_video": str(tmp_path / "grey.mp4")}

    def resolve(v: str) -> str:
        name, sep, cat = v.partition(":")
        return media.get(name, name) + sep + cat if name in media else v

    over = {
        k: [resolve(x) for x in v] if isinstance(v, list) else resolve(v) if v else v
        for k, v in over.items()
    }
    out = tmp_path / "never.mp4"
    if "out" not in over:
        over["out"] = str(out)
    code = main(argv(media, **over))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert len(lines) == 1, err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_registry_model_not_found(media, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main(argv(media, model="models:/durian@champion", out=str(tmp_path / "o.mp4")))
    err = capsys.readouterr().err
    assert code == 1
    assert "error: model cannot be found in the registry or on disk: models:/durian@champion" in err
    assert not (tmp_path / "mlflow.db").exists()  # no empty store left behind


def test_registry_model_is_downloaded_and_used(media, tmp_path, monkeypatch) -> None:
    """A pyfunc registered like ``flows/register.py`` does, resolved through its alias."""
    import mlflow

    from flows.animate import load_pipeline
    from flows.model_store import finetune_start, resolve_model
    from flows.register import PYFUNC

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DURIAN_PROJECT_DIR", str(tmp_path))  # the download cache's project
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC),
            artifacts={"model": media["model"]},
            pip_requirements=["torch"],
            registered_model_name="durian",
        )
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("durian", "champion", str(info.registered_model_version))
    folder = resolve_model("models:/durian@champion")
    assert folder == tmp_path / ".durian" / "models" / "durian" / "v1" / "artifacts" / "model"
    assert (folder / "config.json").read_bytes() == (
        Path(media["model"]) / "config.json"
    ).read_bytes()
    assert resolve_model("models:/durian/1") == folder  # one version, downloaded once
    start = finetune_start("durian", tmp_path / "champion")  # retrain: finetune's start
    assert start == tmp_path / "champion" / "v1" / "artifacts" / "model"
    assert finetune_start("other", tmp_path / "champion") is None  # no champion: from scratch
    pipe = load_pipeline("models:/durian@champion", "cpu")
    assert pipe.model.config.resolution == 64
    with pytest.raises(LookupError, match="models:/durian@nosuchalias"):
        load_pipeline("models:/durian@nosuchalias", "cpu")


def test_cli_end_to_end_writes_a_playable_mp4(media, tmp_path) -> None:
    """A real process: astronaut wearing Grace Hopper's hair and synthetic glasses, driven by
    a video, side by side; 6 frames of H.264 that PyAV decodes."""
    out = tmp_path / "sub" / "result.mp4"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "flows.animate"] + argv(
        media,
        attribute=[media["grace"] + ":hair", media["glasses"] + ":glasses"],
        driving=media["video"],
        out=str(out),
        frames="6",
        steps="2",
        guidance="2.0",
        seed="3",
        side_by_side="",
    )
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error:" not in proc.stderr
    frames = read_mp4(out)
    assert frames.shape == (6, 64, 256, 3)
    assert frames[:, :, 192:].std() > 5  # the result panel is an image, not a flat colour
    assert not list(out.parent.glob(".*tmp*"))  # written atomically, nothing left over
    # Native library chatter stays out of the user's terminal.
    assert "W0000" not in proc.stderr and "INFO: [" not in proc.stderr
