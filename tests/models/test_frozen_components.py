"""The frozen components (VAE, a frozen image encoder) are pipeline components of their own:
``model/`` of a saved pipeline holds only what the model trained, each component loads and can
be swapped on its own, and a folder whose components are stored elsewhere is completed from a
checked download."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from sd_helpers import sd_like_model

from durian.models.durian_model import FROZEN_PREFIXES, DurianModel
from durian.models.profiles import build_model
from durian.pipelines.components import FROZEN_RECORD, complete_pipeline_folder, folder_digest
from durian.pipelines.pipeline_durian import DurianPipeline, load_model, save_durian_pipeline


def _saved_keys(folder) -> set[str]:
    keys: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def _frames(pipe: DurianPipeline) -> np.ndarray:
    rng = np.random.default_rng(0)
    face = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[:20] = True
    pipe.set_progress_bar_config(disable=True)
    return pipe(face, mask, face[::-1].copy(), mask, rng.integers(0, 256, (2, 64, 64, 3),
                dtype=np.uint8), num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").frames.numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    model = sd_like_model(root)
    save_durian_pipeline(model, root / "pipe")
    return model, root


def test_model_folder_holds_no_frozen_weights_and_the_pipeline_loads_whole(saved) -> None:
    model, root = saved
    folder = root / "pipe"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    keys = _saved_keys(folder / "model")
    assert keys and not any(k.startswith(tuple(FROZEN_PREFIXES.values())) for k in keys)
    assert any(k.startswith("dnet.") for k in keys)
    pipe = DurianPipeline.from_pretrained(folder)
    assert pipe.model.vae is pipe.vae and pipe.model.image_encoder.clip is pipe.image_encoder
    loaded = pipe.model.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    # what training starts from (init_from) is the same whole model
    again = load_model(folder).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


def test_one_frozen_component_swapped(saved) -> None:
    _, root = saved
    folder = root / "pipe"
    before = _frames(DurianPipeline.from_pretrained(folder))
    other = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.5)  # a different decoder, same latent space
    pipe = DurianPipeline.from_pretrained(folder, vae=other)
    assert pipe.vae is other and pipe.model.vae is other
    assert not np.allclose(_frames(pipe), before, atol=1e-3)
    wrong = AutoencoderKL(latent_channels=8, block_out_channels=(8,), norm_num_groups=4)
    with pytest.raises(ValueError, match="latent space"):
        DurianPipeline.from_pretrained(folder, vae=wrong)


def test_model_component_alone_says_what_is_missing(saved, tmp_path) -> None:
    model, root = saved
    alone = DurianModel.from_pretrained(root / "pipe" / "model")
    with pytest.raises(RuntimeError, match="without its vae"):
        alone.encode_images(torch.zeros(1, 3, 64, 64))
    attached = DurianModel.from_pretrained(
        root / "pipe" / "model", vae=model.vae, image_encoder=model.image_encoder.clip
    )
    assert torch.equal(attached.encode_images(torch.zeros(1, 3, 64, 64)),
                       model.encode_images(torch.zeros(1, 3, 64, 64)))  # fmt: skip
    # a trained weight missing is an error naming the folder, not a silent re-initialisation
    broken = tmp_path / "broken"
    shutil.copytree(root / "pipe" / "model", broken)
    from safetensors.torch import load_file, save_file

    weights = next(broken.glob("*.safetensors"))
    state = load_file(str(weights))
    state.pop(next(k for k in state if k.startswith("dnet.")))
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=f"{broken}: 1 weights missing"):
        DurianModel.from_pretrained(broken)


def test_trained_image_encoder_stays_in_the_model(tmp_path) -> None:
    """The tiny profile trains its image encoder and has no VAE: nothing is frozen."""
    model = build_model("tiny", resolution=64)
    assert model.frozen_components() == {}
    save_durian_pipeline(model, tmp_path / "pipe")
    assert not (tmp_path / "pipe" / "vae").exists()
    keys = _saved_keys(tmp_path / "pipe" / "model")
    assert any(k.startswith("image_encoder.clip.") for k in keys)
    loaded = DurianPipeline.from_pretrained(tmp_path / "pipe").model.state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())


def test_folder_completed_from_a_checked_store(saved, tmp_path) -> None:
    _, root = saved
    shipped = tmp_path / "shipped"
    shutil.copytree(root / "pipe", shipped, ignore=shutil.ignore_patterns("vae", "image_encoder"))
    record = {name: {"uri": f"store://{name}", "sha256": folder_digest(root / "pipe" / name)}
              for name in ("vae", "image_encoder")}  # fmt: skip
    (shipped / FROZEN_RECORD).write_text(json.dumps(record))
    fetched = []

    def fetch(uri: str, dst):
        fetched.append(uri)
        name = uri.removeprefix("store://")
        return shutil.copytree(root / "pipe" / name, dst / name)

    store = tmp_path / "components"
    complete_pipeline_folder(shipped, fetch, store)
    second = tmp_path / "second"
    shutil.copytree(shipped, second, symlinks=True)
    for name in ("vae", "image_encoder"):
        (second / name).unlink()
    complete_pipeline_folder(second, fetch, store)
    assert sorted(fetched) == ["store://image_encoder", "store://vae"]  # once for both
    assert (second / "vae").resolve() == (shipped / "vae").resolve()
    assert np.array_equal(_frames(DurianPipeline.from_pretrained(second)),
                          _frames(DurianPipeline.from_pretrained(root / "pipe")))  # fmt: skip

    tampered = tmp_path / "tampered"
    shutil.copytree(shipped, tampered, symlinks=True)
    for name in ("vae", "image_encoder"):
        (tampered / name).unlink()
    record["vae"]["sha256"] = "0" * 64
    (tampered / FROZEN_RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="does not hold the component"):
        complete_pipeline_folder(tampered, fetch, tmp_path / "other-store")
    assert not (tampered / "vae").exists()
    assert not (tmp_path / "other-store" / ("0" * 64) / "vae").exists()
