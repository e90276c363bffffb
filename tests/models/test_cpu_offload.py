"""Model CPU offload by inference phase (``DurianPipeline.enable_model_cpu_offload``): each
phase has its parts on the accelerator and nothing else, every weight belongs to a phase, and
an offloaded call samples what a placed one does. No GPU here: the placement is checked with
``meta`` as the accelerator (a one-way move, so one fresh copy of the model per phase)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from sd_helpers import sd_like_model

from durian.inference.errors import DurianInputError
from durian.models.durian_model import DurianModel
from durian.models.profiles import make_noise_scheduler
from durian.pipelines.pipeline_durian import DurianPipeline, pick_device


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory: pytest.TempPathFactory) -> DurianModel:
    """The sd15 profile at test size, with a VAE, a frozen CLIP and a temporal module."""
    model = sd_like_model(tmp_path_factory.mktemp("sd"))
    model.add_temporal_module()
    return model


def _tensors(modules: list[torch.nn.Module]) -> set[int]:
    return {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}


@pytest.mark.parametrize("kind", ["tiny", "sd"])
def test_every_weight_belongs_to_a_phase(kind: str, sd_model: DurianModel) -> None:
    model = tiny_model(temporal=True) if kind == "tiny" else sd_model
    groups = model.offload_groups()
    assert set(groups) == {"references", "denoise", "decode"}
    everything = _tensors([model])
    assert set().union(*(_tensors(g) for g in groups.values())) == everything
    # The denoising loop holds neither reference net nor the encoders.
    denoise = _tensors(groups["denoise"])
    for part in (*model.reference_nets, model.image_encoder, model.vae):
        if part is not None:
            assert not _tensors([part]) & denoise, type(part).__name__
    assert _tensors([model.dnet]) <= denoise
    assert (groups["decode"] == [model.vae]) == (kind == "sd")


@pytest.mark.parametrize("phase", ["references", "denoise", "decode"])
def test_a_phase_moves_its_parts_and_only_them(phase: str, sd_model: DurianModel) -> None:
    pipe = DurianPipeline(model=copy.deepcopy(sd_model), scheduler=make_noise_scheduler("ddim"))
    pipe.enable_model_cpu_offload(device="meta")
    assert pipe._execution_device == torch.device("meta")
    assert {p.device.type for p in pipe.model.parameters()} == {"cpu"}
    pipe._onload(phase)
    on = _tensors(pipe.model.offload_groups()[phase])
    for name, t in (*pipe.model.named_parameters(), *pipe.model.named_buffers()):
        assert t.device.type == ("meta" if id(t) in on else "cpu"), name
    # The pipeline's own handles on the frozen parts are the same modules.
    assert pipe.vae is pipe.model.vae and pipe.image_encoder is pipe.model.image_encoder.clip


def test_an_offloaded_call_samples_what_a_placed_one_does(video_inputs: dict) -> None:
    pipe = DurianPipeline(model=tiny_model(seed=1, temporal=True),
                          scheduler=make_noise_scheduler("ddim"))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def frames() -> torch.Tensor:
        return pipe(**video_inputs, num_inference_steps=2, guidance_scale=2.0, window=3,
                    overlap=1, output_type="pt", generator=torch.Generator().manual_seed(0)
                    ).frames  # fmt: skip

    placed = frames()
    pipe.enable_model_cpu_offload(device="cpu")
    phases: list[str | None] = []
    onload = pipe._onload
    pipe._onload = lambda phase: (phases.append(phase), onload(phase))[1]
    assert torch.equal(frames(), placed)
    assert phases == ["references", "denoise", "decode", None]  # all back off at the end
    pipe.to("cpu")  # placing by hand ends the offload
    assert pipe._offload_to is None


def test_offload_without_a_gpu_is_the_users_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for device in ("auto", "cpu"):
        with pytest.raises(DurianInputError, match="needs CUDA"):
            pick_device(device, cpu_offload=True)
    pipe = DurianPipeline(model=tiny_model(), scheduler=make_noise_scheduler("ddim"))
    with pytest.raises(RuntimeError, match="needs an accelerator"):
        pipe.enable_model_cpu_offload()
