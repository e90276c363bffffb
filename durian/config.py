"""``params.yaml``: every knob of the pipeline, validated on load.

An unknown or misspelt key, a wrong type or an out-of-range value fails fast with a
:class:`ParamsError` whose one-line message names the key (``train.stpes: unknown key``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The pipeline's stages, in order (each a DVC stage and a Prefect flow ``flows.<stage>``).
PIPELINE_STAGES: tuple[str, ...] = (
    "sample",
    "ingest",
    "preprocess",
    "mask_bank",
    "train",
    "evaluate",
    "register",
)


class ParamsError(ValueError):
    """A params file that cannot be used; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleParams(_Section):
    seed: int = 0
    n_synthetic: int = Field(4, ge=0, le=10_000)
    real_photos: bool = True
    n_frames: int = Field(24, ge=2, le=10_000)
    size: int = Field(160, ge=32, le=4096)
    fps: float = Field(12.0, gt=0, le=240)


class SourceParams(_Section):
    kind: Literal["folder", "glob", "manifest"] = "folder"
    path: str = "data/raw"


class IngestParams(_Section):
    fps: float = Field(12.0, gt=0, le=240)
    clip_frames: int = Field(12, ge=1)
    min_clip_frames: int = Field(8, ge=1)
    max_side: int = Field(1024, ge=64)
    download_timeout_s: float = Field(30.0, gt=0)
    download_max_mb: float = Field(500.0, gt=0)
    download_retries: int = Field(3, ge=0, le=20)
    # One attempt's whole transfer (download_timeout_s bounds each wait for data only).
    download_total_timeout_s: float = Field(900.0, gt=0, le=86400)
    # Local files larger than this are failed (too_large) before a byte is read.
    max_mb: float = Field(4096.0, gt=0)
    # Bounds hashing and probing one file, each (probing decodes every frame).
    probe_timeout_s: float = Field(600.0, gt=0, le=86400)
    # Folders manifests may point into (relative: to the project dir); empty: anywhere.
    allowed_roots: list[str] = Field(default_factory=list)
    # true: probe only videos whose content hash is not in the earlier manifest and merge
    # (a change of these params or of the ingest code rebuilds); false: rebuild every run.
    incremental: bool = True

    @model_validator(mode="after")
    def _clip_lengths(self) -> IngestParams:
        if self.min_clip_frames > self.clip_frames:
            raise ValueError("min_clip_frames must be <= clip_frames")
        if any(not r.strip() or "\0" in r for r in self.allowed_roots):
            raise ValueError("allowed_roots: every entry must be a non-empty folder path")
        return self


class PreprocessParams(_Section):
    resolution: int = Field(64, ge=32, le=2048, multiple_of=8)
    margin: float = Field(0.6, ge=0.0, le=3.0)
    min_face_size: int = Field(32, ge=8)
    # A clip is rejected as multiple_faces only for another face >= ratio x the main one in at
    # least fraction of its frames (one face, tracked); fewer are noted as stray_face_frames.
    second_face_min_ratio: float = Field(0.5, gt=0.0, le=1.0)
    second_face_min_fraction: float = Field(0.5, gt=0.0, le=1.0)
    parser: Literal["landmarks", "bisenet"] = "landmarks"
    parser_weights: str | None = None
    trust_ground_truth: bool = True
    # Videos with exact labels (synthetic) also go through the parser, and its per-class IoU
    # against the truth is logged and written to data/shards/summary.json.
    parser_check: bool = True
    runner: Literal["local", "ray"] = "local"
    workers: int = Field(2, ge=1, le=4096)
    retries: int = Field(2, ge=0, le=20)
    # true: append shards for clips not yet in the index, resume after a crash (a change of the
    # sample-shaping params or of the preprocessing code rebuilds); false: rebuild every run.
    incremental: bool = True


class ShardParams(_Section):
    max_samples: int = Field(64, ge=1)
    max_mb: float = Field(256.0, gt=0)
    val_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    seed: int = 0
    crf: int = Field(0, ge=0, le=51)


class ModelParams(_Section):
    profile: Literal["tiny", "sd15"] = "tiny"
    resolution: int = Field(64, ge=32, le=2048, multiple_of=8)
    pretrained: str | None = None  # local SD 1.5 folder (unet/, vae/)
    image_encoder: str | None = None  # local CLIP vision folder
    motion_module: str | None = None  # local motion-module checkpoint


class TrainParams(_Section):
    stage: Literal[1, 2] = 1
    steps: int = Field(30, ge=1)
    lr: float = Field(1e-4, gt=0, le=1.0)
    # diffusers.optimization schedules of the learning rate over ``steps``.
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    batch_size: int = Field(2, ge=1)
    frames: int = Field(1, ge=1, le=64)
    grad_accum: int = Field(1, ge=1)
    seed: int = 0
    log_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    ray_address: str | None = None
    max_failures: int = Field(1, ge=0)
    # Stage 2 windows and the reference/target gap (durian-method.md §3).
    frame_stride: int = Field(1, ge=1)
    min_gap: int = Field(4, ge=0)
    # Speed/memory: autocast on GPU (fp16 adds a GradScaler; bf16 also works on CPU).
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    loader_workers: int = Field(0, ge=0, le=64)  # DataLoader processes per Ray worker
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    noise_offset: float = Field(0.0, ge=0, le=1)
    # diffusers' timestep bias: "later" trains the noisiest timesteps (where few-step sampling
    # starts) ``multiplier`` times as often over the last ``portion`` of the schedule.
    timestep_bias: Literal["none", "later", "earlier"] = "none"
    timestep_bias_multiplier: float = Field(1.0, gt=0)
    timestep_bias_portion: float = Field(0.25, gt=0, le=1)
    ema: bool = False  # EMA of the trainable weights; exported instead of the raw weights
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    preview_every: int = Field(10, ge=0)  # steps between MLflow preview grids; 0 = none
    init_from: str | None = None  # a save_pretrained folder to start from (stage 2: stage 1's)
    # Resume: true = a deterministic Ray run name (hash of what defines the run), so rerunning
    # after a crash continues from the latest checkpoint; false = a fresh run every time.
    resume: bool = True
    resume_data: Literal["skip", "reseed"] = "skip"  # data position on resume (see loop.py)
    # Scheduled retraining: scratch = from init_from (or random); finetune = from the model
    # registered as @champion when there is one (flows/versioning.champion_model_dir).
    retrain: Literal["scratch", "finetune"] = "scratch"


class MaskBankParams(_Section):
    """Stage ``mask_bank``: attribute masks of other identities for mask expansion."""

    per_category_limit: int = Field(256, ge=1)
    size: int = Field(128, ge=16, le=2048)
    frames_per_clip: int = Field(2, ge=1)
    seed: int = 0


class EvaluateParams(_Section):
    num_cases: int = Field(4, ge=1)  # self-attribute transfer cases from the val split
    cross_identity_cases: int = Field(4, ge=0)  # synthetic cases with exact targets
    steps: int = Field(10, ge=1, le=1000)
    guidance: float = Field(1.0, ge=1.0, le=30.0)
    seed: int = 0
    frames: int = Field(4, ge=1, le=1024)  # target frames per self-transfer case
    # Local folder with LPIPS / FID / FVD weights (file names: durian/evaluation/perceptual.py);
    # a metric whose files are missing is skipped with the reason logged, never faked.
    metric_weights: str | None = None
    lpips_net: Literal["alex", "vgg"] = "alex"
    # Identity similarity to the portrait: dlib (ships with face-recognition-models), arcface
    # (a local ONNX in arcface_model, needs onnxruntime) or none.
    identity: Literal["dlib", "arcface", "none"] = "dlib"
    arcface_model: str | None = None
    identity_frames: int = Field(4, ge=0)  # output frames per case embedded (dlib ~0.1 s); 0 = all
    clip_model: str | None = None  # local CLIP vision folder: adds attr_clip_sim
    videos: bool = True  # side-by-side MP4 per case as MLflow artifacts


class RegisterParams(_Section):
    model_name: str = Field("durian", pattern=r"^[A-Za-z0-9_.-]+$")
    # Cross-identity metrics by default: self-transfer alone rewards copy-paste (method §5).
    primary_metrics: list[str] = Field(
        default_factory=lambda: ["xid_psnr_attr", "xid_ssim"], min_length=1
    )
    higher_is_better: bool = True


class ScheduleParams(_Section):
    """``durian serve``: the pipeline as a Prefect deployment on a schedule (flows/serve.py)."""

    cron: str | None = None  # e.g. "0 2 * * *" (needs a Prefect server: `durian server`)
    interval_s: float | None = Field(None, gt=0)  # used when cron is null
    stages: list[str] = Field(default_factory=lambda: [s for s in PIPELINE_STAGES if s != "sample"])
    version_data: bool = True  # dvc commit (+ push when a remote is set) after preprocess
    lock_timeout_s: float = Field(0.0, ge=0)  # wait for a running pipeline; 0 = skip this run

    @model_validator(mode="after")
    def _known_stages(self) -> ScheduleParams:
        unknown = [s for s in self.stages if s not in PIPELINE_STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(PIPELINE_STAGES)}")
        return self


# ``register`` is a section name, not ABCMeta.register: silence pydantic's shadowing warning.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Params(_Section):
    sample: SampleParams = SampleParams()
    source: SourceParams = SourceParams()
    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams = PreprocessParams()
    shards: ShardParams = ShardParams()
    mask_bank: MaskBankParams = MaskBankParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register: RegisterParams = RegisterParams()
    schedule: ScheduleParams = ScheduleParams()


def _one_line(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = first["msg"]
        if "input" in first and first["type"] not in ("missing",):
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    suffix = f" (+{more} more)" if more else ""
    return f"{origin}: {key}: {msg}{suffix}"


def parse_params(data: dict[str, Any] | None, origin: str = "params") -> Params:
    """Validate a params mapping; raise :class:`ParamsError` with one line naming the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{origin}: top level must be a mapping, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_one_line(err, origin)) from None


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(data, origin=str(path))
