"""``params.yaml``: every knob of the pipeline, validated on load (the application's settings).

An unknown or misspelt key, a wrong type or an out-of-range value fails fast with a
:class:`ParamsError` whose one-line message names the key (``train.stpes: unknown key``).

The sections the library reads are the library's own configs: ``model`` is
:class:`durian.models.config.ModelConfig`, ``pair`` is :class:`durian.data.pairs.PairConfig`,
``train`` extends :class:`durian.training.config.TrainConfig` with what only the orchestration
reads (Ray, checkpoint cadence, logging) and ``preprocess`` extends
:class:`preprocessing.config.CropConfig`; they travel to the Ray workers as they are.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from durian.data.pair_config import PairConfig
from durian.models.config import ModelConfig
from durian.training.config import Recipe, TrainConfig
from preprocessing.config import CropConfig

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


class PreprocessParams(CropConfig):
    """The crop rule (margin, face sizes; :class:`CropConfig`) and how the stage runs."""

    resolution: int = Field(64, ge=32, le=2048, multiple_of=8)
    # The face parser (preprocessing.parsing.load_parser), also what `durian animate` / `app`
    # parse with: landmarks (offline; no glasses/hat/earrings), bisenet (face-parsing.PyTorch's
    # 79999_iter.pth, or a TorchScript/.pt2 export) or segformer (a local Hugging Face folder,
    # e.g. jonathandinu/face-parsing); parser_weights is that file or folder.
    parser: Literal["landmarks", "bisenet", "segformer"] = "landmarks"
    parser_weights: str | None = None
    trust_ground_truth: bool = True
    # Videos with exact labels (synthetic) also go through the parser, and its per-class IoU
    # against the truth is logged and written to data/shards/summary.json.
    parser_check: bool = True
    runner: Literal["local", "ray"] = "local"
    workers: int = Field(2, ge=1, le=4096)
    # Videos per batch: one task run (local) or Ray task per batch, which writes the batch's
    # shards and index part itself. Larger batches: fewer, bigger shards and parts; a kill
    # loses at most the batches in flight.
    batch_videos: int = Field(8, ge=1, le=100_000)
    # The offline parser's person segmentation on every n-th frame of a clip, blended between
    # (the segmenter is ~1/5 of the chain's time; 2: mIoU 0.5434 vs 0.5446 on 36 synthetic clips).
    segment_every: int = Field(2, ge=1, le=16)
    retries: int = Field(2, ge=0, le=20)
    # true: append shards for clips not yet in the index, resume after a crash (a change of the
    # sample-shaping params or of the preprocessing code rebuilds); false: rebuild every run.
    incremental: bool = True
    # The clip's identity embedding stored in the shards (identity.npy) for models with
    # model.identity_embedding dlib / arcface: dlib (offline), arcface:<local .onnx, relative to
    # the project> (needs onnxruntime) or none.
    identity_embedder: str = Field("dlib", pattern=r"^(dlib|none|arcface:.+)$")

    @model_validator(mode="after")
    def _parser_has_weights(self) -> PreprocessParams:
        if self.parser != "landmarks" and not self.parser_weights:
            raise ValueError(
                f"parser_weights: parser {self.parser!r} needs its local checkpoint "
                "(bisenet: 79999_iter.pth; segformer: a SegFormer folder)"
            )
        return self


class ShardParams(_Section):
    max_samples: int = Field(64, ge=1)
    max_mb: float = Field(256.0, gt=0)
    val_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    seed: int = 0
    crf: int = Field(0, ge=0, le=51)
    # x264's preset for the frames: ultrafast writes (and decodes) fastest, ~35 % more bytes
    # than veryfast at crf 0 (both lossless).
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium",
                    "slow", "slower", "veryslow"] = "ultrafast"


class TrainParams(TrainConfig):
    """The training run (:class:`TrainConfig`) and how Ray runs, checkpoints and logs it."""

    log_every: int = Field(5, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    ray_address: str | None = None
    max_failures: int = Field(1, ge=0)
    preview_every: int = Field(10, ge=0)  # steps between MLflow preview grids; 0 = none
    # Resume: true = a deterministic Ray run name (hash of what defines the run), so rerunning
    # after a crash continues from the latest checkpoint; false = a fresh run every time.
    resume: bool = True
    # Scheduled retraining: scratch = from init_from (or random); finetune = from the model
    # registered as @champion when there is one (flows/model_store.finetune_start).
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
    # (a local ONNX in arcface_model, needs onnxruntime) or none. arcface_model is also the
    # ONNX file a model with model.identity_embedding arcface is evaluated with.
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


# The model section's local weight folders (made absolute for the Ray workers).
MODEL_WEIGHT_FIELDS: tuple[str, ...] = ("pretrained", "image_encoder", "motion_module")


class Params(_Section):
    sample: SampleParams = SampleParams()
    source: SourceParams = SourceParams()
    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams = PreprocessParams()
    shards: ShardParams = ShardParams()
    mask_bank: MaskBankParams = MaskBankParams()
    model: ModelConfig = ModelConfig()
    pair: PairConfig = PairConfig()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    register: RegisterParams = RegisterParams()
    schedule: ScheduleParams = ScheduleParams()

    @model_validator(mode="after")
    def _pair_at_model_resolution(self) -> Params:
        if self.pair.resolution is not None:
            raise ValueError("pair.resolution: the pairs are made at model.resolution; set that")
        return self

    def recipe(self, **paths: str | None) -> Recipe:
        """The library's recipe of this run: the ``model``, ``pair`` and ``train`` sections as
        they are, with ``paths`` (resolved weight folders: ``pretrained``, ``image_encoder``,
        ``motion_module``, ``init_from``) replacing the ones written in the file."""
        model = self.model.model_copy(
            update={k: v for k, v in paths.items() if k in MODEL_WEIGHT_FIELDS}
        )
        train = self.train.model_copy(update={k: v for k, v in paths.items() if k == "init_from"})
        return Recipe(model=model, pair=self.pair, train=train)


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


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.steps=20", "model.widths=[32, 64]"]`` -> ``{"train": {"steps": 20}, ...}``
    (values read as YAML); raise :class:`ParamsError` naming a malformed item."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not (sep and dot and section and field):
            raise ParamsError(f"{item!r}: expected section.key=value")
        try:
            out.setdefault(section, {})[field] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"{item!r}: the value is not valid YAML") from None
    return out


def load_params(
    path: str | os.PathLike = "params.yaml", overrides: dict[str, dict[str, Any]] | None = None
) -> Params:
    """The params file, with ``overrides`` (section -> keys) laid over it, validated."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    origin = str(path)
    if overrides and isinstance(data, dict | None):
        data = with_overrides(data, overrides)
        origin += " with overrides"
    return parse_params(data, origin=origin)


def with_overrides(
    data: dict[str, Any] | None, overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A params mapping with ``overrides`` (section -> keys) laid over it (a new mapping)."""
    out = dict(data or {})
    for section, values in overrides.items():
        current = out.get(section)
        out[section] = {**(current if isinstance(current, dict) else {}), **values}
    return out
