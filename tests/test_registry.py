"""The register stage against a real sqlite MLflow store: versions, aliases by rule, and the
pyfunc loaded and run in a fresh process that never imported the training code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from durian.models.profiles import build_model
from durian.pipelines.pipeline_durian import DurianPipeline, save_durian_pipeline


def _prepare(project, metrics: dict[str, float]) -> None:
    model_dir = project / "models" / "durian"
    if not model_dir.exists():
        # a pipeline folder, as training exports it (bare model folders: test_inference_cli)
        save_durian_pipeline(build_model("tiny", resolution=64), model_dir)
    (project / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def registered(project_dir):
    from flows.register import register_flow

    _prepare(project_dir, {"xid_psnr_attr": 10.0, "xid_ssim": 0.5})
    first = register_flow()
    return project_dir, first


def test_first_version_is_candidate_and_champion(registered):
    _, first = registered
    assert first["version"] == "1"
    assert first["aliases"] == ["candidate", "champion"]


def test_champion_moves_only_when_the_rule_says_so(registered):
    from flows.register import register_flow

    project, _ = registered
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")

    _prepare(project, {"xid_psnr_attr": 9.0, "xid_ssim": 0.9})  # worse on one primary metric
    second = register_flow()
    assert second["aliases"] == ["candidate"] and not second["promoted"]
    assert str(client.get_model_version_by_alias("durian", "champion").version) == "1"
    tags = client.get_model_version("durian", "2").tags
    assert tags["promotion.decision"] == "kept" and "xid_psnr_attr" in tags["promotion.reason"]
    assert json.loads(tags["promotion.compared"])["xid_psnr_attr"] == [9.0, 10.0]

    _prepare(project, {"xid_psnr_attr": 11.0, "xid_ssim": 0.6})  # better on both
    third = register_flow()
    assert third["promoted"]
    assert str(client.get_model_version_by_alias("durian", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("durian", "candidate").version) == "3"


def test_pyfunc_animates_in_a_fresh_process(registered):
    project, _ = registered
    code = f"""
import base64, io, json, sys
import mlflow, numpy as np, pandas as pd
from PIL import Image

def png(a):
    buf = io.BytesIO(); Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()

mlflow.set_tracking_uri("sqlite:///{project / 'mlflow.db'}")
model = mlflow.pyfunc.load_model("models:/durian@champion")
face = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
mask = np.zeros((64, 64), np.uint8); mask[:16] = 255
request = pd.DataFrame([dict(portrait=png(face), portrait_mask=png(mask), attribute=png(face),
                             attribute_mask=png(mask), keypoints=json.dumps([png(face)] * 3),
                             steps=2, guidance=1.0, seed=0)])
frames = model.predict(request)
print(json.dumps({{"frames": len(frames[0]),
                  "training_imported": any(m.startswith("durian.training") or m == "ray"
                                           for m in sys.modules)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"frames": 3, "training_imported": False}


def test_versions_share_frozen_components_stored_once(project_dir) -> None:
    """A model with a VAE and a frozen image encoder: each version holds only what the model
    trained; the frozen components are logged once for both versions and put back on load
    (through the resolver and through the pyfunc)."""
    import mlflow
    from sd_helpers import sd_like_model

    from flows.component_store import DIGEST_TAG
    from flows.model_store import resolve_model
    from flows.register import register_flow

    model = sd_like_model(project_dir / "base")
    save_durian_pipeline(model, project_dir / "models" / "durian")
    _prepare(project_dir, {"xid_psnr_attr": 10.0, "xid_ssim": 0.5})
    register_flow()
    _prepare(project_dir, {"xid_psnr_attr": 11.0, "xid_ssim": 0.6})
    register_flow()

    client = MlflowClient(tracking_uri=f"sqlite:///{project_dir / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("durian").experiment_id,
                              filter_string=f"tags.`{DIGEST_TAG}` != ''")  # fmt: skip
    assert sorted(r.data.tags["durian.component"] for r in runs) == ["image_encoder", "vae"]

    def size(folder) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    exported = project_dir / "models" / "durian"
    frozen = size(exported / "vae") + size(exported / "image_encoder")
    folders = [resolve_model(f"models:/durian/{v}") for v in (1, 2)]
    for folder in folders:
        stored = client.get_model_version("durian", folder.parts[-3][1:])
        assert stored.tags["registration"] == "complete"
        shipped = sum(p.stat().st_size for p in folder.rglob("*")
                      if p.is_file() and not p.is_symlink()
                      and not {"vae", "image_encoder"} & set(p.relative_to(folder).parts))
        assert shipped < size(exported) - frozen + 10_000  # + the record and MLflow's files
        assert (folder / "vae").is_symlink()
    assert (folders[0] / "vae").resolve() == (folders[1] / "vae").resolve()
    loaded = DurianPipeline.from_pretrained(folders[1]).model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())

    mlflow.set_tracking_uri(f"sqlite:///{project_dir / 'mlflow.db'}")
    pyfunc = mlflow.pyfunc.load_model("models:/durian/2").unwrap_python_model()
    served = pyfunc.pipe.model.state_dict()
    assert all(torch.equal(v, served[k]) for k, v in model.state_dict().items())
