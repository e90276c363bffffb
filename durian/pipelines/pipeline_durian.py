"""DurianPipeline: portrait + attribute reference(s) + driving keypoint images → video frames.

Usage::

    save_durian_pipeline(model, folder)         # a new model: its first scheduler, one folder
    pipe = DurianPipeline.from_pretrained(folder)                   # model + saved scheduler
    pipe = DurianPipeline.from_pretrained(folder, scheduler=DDIMScheduler(...))  # one swapped
    pipe = DurianPipeline.from_pretrained(folder, vae=AutoencoderKL.from_pretrained(...))  # too
    pipe = DurianPipeline.from_pretrained(old_model_folder)  # a bare DurianModel folder still loads
    pipe.to("cuda", torch.float16)                                  # fp16/bf16 + SDPA on GPU

A pipeline folder is diffusers' layout: ``model_index.json`` naming each component's class
(``durian.models.durian_model.DurianModel``, importable, so diffusers' loader finds it), the
``model/`` (what the model trained), ``scheduler/scheduler_config.json`` and, for a model with
frozen pretrained parts, ``vae/`` and ``image_encoder/`` (never copied into ``model/``; see
:meth:`DurianModel.frozen_components` and :mod:`durian.pipelines.components`). The scheduler
a model is sampled with is the folder's; :func:`durian.models.profiles.noise_scheduler_for` only
makes the first one of a new model. Whatever scheduler is given, the entries the model fixes
(its parameterisation and zero-terminal-SNR schedule, ``profiles.scheduler_settings``) are kept.
    frames = pipe(portrait, portrait_mask, attribute_image, attribute_mask, keypoint_images,
                  num_inference_steps=25, guidance_scale=3.5, generator=g).frames  # F×H×W×3 uint8

Inputs: images as PIL, uint8 arrays/tensors, or float arrays/tensors in [0, 1] (H×W×C or C×H×W);
masks as PIL, bool/uint8 arrays or tensors (non-zero = masked) or floats in [0, 1]; keypoints as a
list of images, a F×H×W×3 uint8 array or a F×3×H×W float tensor in [0, 1]. Everything is resized
to the model's resolution. The complementary masking of method note §2 is applied here
(portrait ⊙ (1 − M_port), attribute ⊙ M_attr; masked-out pixels black), so the portrait may be
given masked or not.

* composition: ``attribute_image`` / ``attribute_mask`` as lists — N attributes in one pass.
* interpolation: ``attribute_image_2`` / ``attribute_mask_2`` and ``alpha`` (a float or one per
  frame, default 0.5): ``(1−α)·SA(F_t, F_port, F_attr1) + α·SA(F_t, F_port, F_attr2)`` in every
  DNet block; DNet's cross-attention context φ_attr is blended with the same α [ours].
* classifier-free guidance: unconditional = zero embedding and no reference tokens;
  ``drop_identity`` / ``drop_attribute`` remove one stream from the conditional branch too.
* long videos: temporal windows of ``window`` frames overlapping by ``overlap``; the noise
  predictions of overlapping windows are averaged at every step. ``window=None``: one pass.
* the reference nets and the keypoint guider run once per call, before the denoising loop.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPVisionModelWithProjection

from durian.models.durian_model import DurianModel
from durian.models.profiles import noise_scheduler_for, scheduler_settings

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


@dataclass
class DurianPipelineOutput(BaseOutput):
    """``frames``: F×H×W×3 uint8 (``output_type="np"``) or F×3×H×W float in [0, 1] ("pt")."""

    frames: np.ndarray | torch.Tensor


def temporal_windows(num_frames: int, window: int | None, overlap: int) -> list[tuple[int, int]]:
    """[start, end) frame windows covering ``num_frames``; the last one is aligned to the end."""
    if window is None or num_frames <= window:
        return [(0, num_frames)]
    if not 0 <= overlap < window:
        raise ValueError(f"need 0 <= overlap < window, got overlap={overlap}, window={window}")
    stride = window - overlap
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return [(s, s + window) for s in starts]


def _to_chw(x: ImageInput) -> torch.Tensor:
    """One image → float (C, H, W) in [0, 1]."""
    if isinstance(x, PIL.Image.Image):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.array(x))  # a copy: PIL arrays are read-only
        t = t.float() / 255 if x.dtype == np.uint8 else t.float()
    else:
        t = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        t = t[0] if t.ndim == 4 else t
    if t.ndim == 2:
        return t[None]
    if t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3):  # H×W×C → C×H×W
        t = t.permute(2, 0, 1)
    return t


def _image(x: ImageInput, size: int) -> torch.Tensor:
    t = _to_chw(x)[:3]
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    t = t[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)
    return t.clamp(0, 1)


def _mask(x: ImageInput, size: int) -> torch.Tensor:
    if isinstance(x, PIL.Image.Image):
        x = np.asarray(x.convert("L"))
    if isinstance(x, np.ndarray) and x.dtype in (np.bool_, np.uint8):
        x = (x > 0).astype(np.float32)
    elif isinstance(x, torch.Tensor) and x.dtype in (torch.bool, torch.uint8):
        x = (x > 0).float()  # 0/1 and 0/255 masks alike
    t = _to_chw(x)[:1][None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="nearest")
    return t.clamp(0, 1)


def _keypoints(x: Sequence[ImageInput] | np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    if isinstance(x, torch.Tensor) and x.ndim == 4:
        frames = list(x.unbind(0))
    elif isinstance(x, np.ndarray) and x.ndim == 4:
        frames = list(x)
    else:
        frames = list(x)
    return torch.cat([_image(f, size) for f in frames])


def _as_list(x: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    return list(x) if isinstance(x, list | tuple) else [x]


def is_model_folder(folder: str | os.PathLike) -> bool:
    """A bare ``DurianModel.save_pretrained`` folder (no pipeline around it)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == DurianModel.__name__
    except (ValueError, AttributeError):
        return False


def load_model(folder: str | os.PathLike, **kwargs: Any) -> DurianModel:
    """The ``DurianModel`` of a pipeline folder, its frozen components attached, or of a bare
    model folder: what training starts from (``init_from``). ``kwargs`` go to the loader."""
    if (Path(folder) / "model_index.json").is_file():
        return DurianPipeline.from_pretrained(folder, **kwargs).model
    return DurianModel.from_pretrained(folder, **kwargs)


class DurianPipeline(DiffusionPipeline):
    """Portrait animation with attribute transfer (see the module docstring)."""

    model_cpu_offload_seq = "model"
    _optional_components = ["vae", "image_encoder"]

    def __init__(
        self,
        model: DurianModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
    ) -> None:
        super().__init__()
        wanted = scheduler_settings(model.config)
        if any(scheduler.config.get(k) != v for k, v in wanted.items()):
            # The model fixes what it predicts and the schedule it was trained on; a scheduler
            # built for another would turn its outputs into noise.
            scheduler = scheduler.__class__.from_config(scheduler.config, **wanted)
        model.attach_frozen(vae=vae, image_encoder=image_encoder)
        frozen = model.frozen_components()
        self.register_modules(
            model=model,
            vae=frozen.get("vae"),
            image_encoder=frozen.get("image_encoder"),
            scheduler=scheduler,
        )
        self._offload_to: torch.device | None = None  # see enable_model_cpu_offload

    def enable_model_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        """diffusers' model CPU offload, by inference phase: the weights stay on the CPU and
        each phase moves only its own parts to ``device`` (default ``cuda:<gpu_id>``), the
        others back (:meth:`DurianModel.offload_groups`). diffusers' version hooks each
        component's ``forward``, which this pipeline never calls (it calls the model's phases),
        and would leave the model on the CPU. The denoising loop then holds DNet, the keypoint
        guider and the temporal module, not the reference nets, the VAE or the image encoder
        (``python benchmarks/memory.py`` prints the bytes). ``pipe.to(device)`` ends it."""
        if device is None:
            if not torch.cuda.is_available():
                raise RuntimeError("model CPU offload needs an accelerator, and none is here")
            device = "cuda"
        target = torch.device(device)
        if gpu_id is not None or (target.type == "cuda" and target.index is None):
            target = torch.device(target.type, gpu_id or 0)
        self.remove_all_hooks()  # accelerate's, had diffusers' offload been enabled
        self.to("cpu")
        self._offload_to = target

    def to(self, *args: Any, **kwargs: Any) -> DurianPipeline:
        self._offload_to = None  # placed by hand: no offload from here on
        return super().to(*args, **kwargs)

    @property
    def _execution_device(self) -> torch.device:
        return self._offload_to if self._offload_to is not None else super()._execution_device

    def _onload(self, phase: str | None) -> None:
        """With offload on: ``phase``'s parts on the accelerator and every other part on the
        CPU (``None``: all on the CPU). Off first, then on, so the peak is one phase's."""
        if self._offload_to is None:
            return
        groups = self.model.offload_groups()
        parts = {id(m): m for modules in groups.values() for m in modules}
        wanted = {id(m) for m in groups.get(phase, [])} if phase else set()
        for key, module in parts.items():
            if key not in wanted:
                module.to("cpu")
        for key in wanted:
            parts[key].to(self._offload_to)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' layout, the frozen components in their own folders and not in ``model/``
        (which then holds only what the model trained)."""
        with self.model.frozen_left_out():
            super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> DurianPipeline:
        """diffusers' loader for a pipeline folder (components given as keyword arguments
        replace the saved ones); a bare ``DurianModel`` folder (``config.json`` and weights, as
        models were saved before pipeline folders) gets the first scheduler of its model."""
        folder = Path(pretrained_model_name_or_path)
        if (folder / "model_index.json").is_file() or not is_model_folder(folder):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        model = kwargs.pop("model", None)
        if model is None:
            model = DurianModel.from_pretrained(folder, torch_dtype=kwargs.get("torch_dtype"))
        scheduler = kwargs.pop("scheduler", None) or noise_scheduler_for(model, "ddim")
        return cls(model=model, scheduler=scheduler, vae=kwargs.pop("vae", None),
                   image_encoder=kwargs.pop("image_encoder", None))

    def _reference_tensors(
        self,
        images: list[ImageInput],
        masks: list[ImageInput],
        size: int,
        keep_inside: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, N, 3, H, W) masked images in [-1, 1] and (1, N, 1, H, W) masks."""
        if len(images) != len(masks):
            raise ValueError(f"{len(images)} images but {len(masks)} masks")
        imgs = torch.cat([_image(i, size) for i in images]) * 2 - 1
        ms = torch.cat([_mask(m, size) for m in masks])
        keep = ms if keep_inside else 1 - ms
        imgs = imgs * keep - (1 - keep)  # masked-out pixels = -1 (black)
        return imgs[None].to(device, dtype), ms[None].to(device, dtype)

    def _step_kwargs(self, generator: torch.Generator | None, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs: dict = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def __call__(
        self,
        portrait: ImageInput,
        portrait_mask: ImageInput,
        attribute_image: ImageInput | Sequence[ImageInput],
        attribute_mask: ImageInput | Sequence[ImageInput],
        keypoint_images: Sequence[ImageInput] | np.ndarray | torch.Tensor,
        *,
        attribute_image_2: ImageInput | Sequence[ImageInput] | None = None,
        attribute_mask_2: ImageInput | Sequence[ImageInput] | None = None,
        alpha: float | Sequence[float] | None = None,
        identity_embedding: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.5,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        window: int | None = 24,
        overlap: int = 4,
        drop_identity: bool = False,
        drop_attribute: bool = False,
        decode_chunk_size: int = 8,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> DurianPipelineOutput | tuple:
        model: DurianModel = self.model
        device, dtype = self._execution_device, model.dtype
        size = model.config.resolution

        # References: masked once, encoded once (one PRNet and one ARNet call).
        id_img, id_mask = self._reference_tensors(
            [portrait], [portrait_mask], size, False, device, dtype
        )
        attr_imgs, attr_masks = self._reference_tensors(
            _as_list(attribute_image), _as_list(attribute_mask), size, True, device, dtype
        )
        branches_i, branches_m = [attr_imgs], [attr_masks]
        if attribute_image_2 is not None:
            if attribute_mask_2 is None:
                raise ValueError("attribute_image_2 needs attribute_mask_2")
            i2, m2 = self._reference_tensors(
                _as_list(attribute_image_2), _as_list(attribute_mask_2), size, True, device, dtype
            )
            branches_i.append(i2)
            branches_m.append(m2)
        if identity_embedding is not None:
            identity_embedding = identity_embedding.reshape(1, -1).to(device, dtype)
        self._onload("references")
        refs = model.encode_references(
            id_img[:, 0], id_mask[:, 0], branches_i, branches_m, identity_embedding
        )

        kp = _keypoints(keypoint_images, size)  # on the CPU: one window at a time moves
        num_frames = kp.shape[0]

        alpha_t = None
        if len(branches_i) == 2:
            a = 0.5 if alpha is None else alpha
            alpha_t = torch.as_tensor(a, dtype=dtype, device=device).flatten()
            alpha_t = alpha_t.expand(num_frames) if alpha_t.numel() == 1 else alpha_t
            if alpha_t.shape != (num_frames,):
                raise ValueError(f"alpha needs 1 or {num_frames} values, got {alpha_t.numel()}")
        elif alpha is not None:
            raise ValueError("alpha given without attribute_image_2")

        windows = temporal_windows(num_frames, window, overlap)
        longest = max(e - s for s, e in windows)
        if model.temporal_enabled:
            max_len = model.temporal.config.motion_max_seq_length
            if longest > max_len:
                raise ValueError(f"window of {longest} frames > temporal module's {max_len}")

        cfg = guidance_scale > 1.0
        drops_id = torch.tensor([True, drop_identity] if cfg else [drop_identity], device=device)
        drops_attr = torch.tensor(
            [True, drop_attribute] if cfg else [drop_attribute], device=device
        )
        n_copies = 2 if cfg else 1
        refs_in = refs.repeat(n_copies) if cfg else refs

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (num_frames, model.latent_channels) + (size // model.latent_downscale,) * 2
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)

        kept: dict[tuple[int, int], torch.Tensor] = {}
        self._onload("denoise")
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress:
            for t in self.scheduler.timesteps:
                eps_sum = torch.zeros_like(latents)
                counts = torch.zeros(num_frames, 1, 1, 1, device=device, dtype=dtype)
                for s, e in windows:
                    # Keypoint features per window, recomputed each step when there are
                    # several (the guider is small next to DNet): memory stays flat in the
                    # number of frames; one window keeps its features for every step.
                    kp_features = kept.get((s, e))
                    if kp_features is None:
                        kp_features = model.encode_keypoints(kp[s:e].to(device, dtype))
                        if len(windows) == 1:
                            kept[(s, e)] = kp_features
                    x = self.scheduler.scale_model_input(latents[s:e], t)
                    a_w = None if alpha_t is None else torch.cat([alpha_t[s:e]] * n_copies)
                    eps = model.denoise(
                        torch.cat([x] * n_copies),
                        t,
                        refs_in,
                        torch.cat([kp_features] * n_copies),
                        num_frames=e - s,
                        drop_identity=drops_id,
                        drop_attribute=drops_attr,
                        alpha=a_w,
                    )
                    if cfg:
                        uncond, cond = eps.chunk(2)
                        eps = uncond + guidance_scale * (cond - uncond)
                    eps_sum[s:e] += eps
                    counts[s:e] += 1
                latents = self.scheduler.step(
                    eps_sum / counts, t, latents, **step_kwargs
                ).prev_sample
                progress.update()

        if output_type == "latent":
            frames = latents
        else:
            self._onload("decode")
            chunks = [
                model.decode_latents(latents[i : i + decode_chunk_size])  # VAE slicing
                for i in range(0, num_frames, decode_chunk_size)
            ]
            frames = ((torch.cat(chunks).float() + 1) / 2).clamp(0, 1)
            if output_type == "np":
                frames = (frames.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
            elif output_type != "pt":
                raise ValueError(f"output_type must be np, pt or latent, got {output_type!r}")
        self._onload(None)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return DurianPipelineOutput(frames=frames)


def save_durian_pipeline(
    model: DurianModel, folder: str | os.PathLike, scheduler: SchedulerMixin | None = None
) -> Path:
    """Write ``model`` as a pipeline folder (``model_index.json``, ``model/``,
    ``scheduler/scheduler_config.json``) that :meth:`DurianPipeline.from_pretrained` loads.
    ``scheduler``: the one to save; default the model's first (SD 1.5's DDIM schedule with the
    settings the model fixes). Returns ``folder``."""
    pipe = DurianPipeline(model=model, scheduler=scheduler or noise_scheduler_for(model, "ddim"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def pick_device(name: str = "auto", cpu_offload: bool = False) -> str:
    """``auto``: CUDA when there is a GPU, else the CPU; ``cuda`` without one, or CPU offload
    without a GPU to offload from, is a user error."""
    from durian.inference.errors import DurianInputError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise DurianInputError("--device cuda asked for, but CUDA is not available here")
    if cpu_offload and name != "cuda":
        raise DurianInputError(
            "--cpu-offload keeps the weights on the CPU for a GPU: it needs CUDA, and the "
            "device here is the CPU"
        )
    return name


def load_durian_pipeline(
    folder: str | os.PathLike, device: str = "auto", cpu_offload: bool = False
) -> DurianPipeline:
    """The one loader of a trained model for inference (``durian animate``, the app,
    evaluation, the registered MLflow model): the folder's pipeline on ``device`` (``auto``: the
    GPU when there is one) in eval mode, loaded in half precision on CUDA (fp32 on the CPU).
    ``cpu_offload``: the weights stay on the CPU and each phase moves its parts to the GPU
    (:meth:`DurianPipeline.enable_model_cpu_offload`)."""
    device = pick_device(device, cpu_offload)
    dtype = torch.float16 if device == "cuda" else None
    pipe = DurianPipeline.from_pretrained(folder, torch_dtype=dtype)
    pipe.model.eval()
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return pipe
    return pipe.to(device)
