"""Per-GPU training memory of both stages, counted from the real parameter sets and a measured
forward: which strategy the trainer offers fits which card. Prints; asserts nothing.

    python benchmarks/memory.py                      # sd15 at 512²: stage 1 batch 4, stage 2 4 × 24
    python benchmarks/memory.py --gpus 8 --json memory.json
    python benchmarks/memory.py --tiny               # the tiny profile at 64² (a test, seconds)

Per GPU (GiB = 2³⁰ bytes):

* weights: the trained parameters in fp32, the frozen ones in the mixed-precision dtype (the
  trainer's ``half_frozen``), buffers as they are;
* gradients: fp32, one per trained parameter; DDP bucket: DDP's own fp32 copy of them (none with
  ``gradient_as_bucket_view``, where the gradients are views of the buckets);
* optimizer: AdamW's two fp32 moments per trained parameter; with ``shard_optimizer``
  (ZeroRedundancyOptimizer over N GPUs) the most loaded rank's share, using torch's own greedy
  partition (largest tensors first, each to the least loaded rank);
* EMA: an fp32 copy of the trained parameters (0 with ``ema_device: cpu``);
* activations: **measured**, not guessed: one training forward (``training_loss``, the loader's
  batch keys) of the model built on fake tensors (``FakeTensorMode``: shapes and dtypes, no
  memory, no arithmetic) under CPU autocast in the mixed-precision dtype, summing the bytes of
  every storage autograd saves for backward (each storage once, parameters excluded; autocast's
  half-precision copies of trained weights are counted, they are real), plus the batch itself.
  With gradient checkpointing, backward recomputes one checkpointed segment at a time: the
  largest segment's saved bytes are added (measured the same way inside each segment). The
  gradients of activations during backward are not counted; the weight gradients are counted
  whole from the start of backward (an upper bound). CPU autocast on fake tensors stands in for
  CUDA autocast (no CUDA here; meta tensors do not autocast): both run convolutions and matmuls
  in half precision, and CUDA's fp32 policy for group/layer norm and softmax is applied on top
  (:class:`_CudaFp32Ops`); attention goes through the fused SDPA kernel (no L² matrix saved), as
  on a GPU;
* step: AdamW's ``foreach`` step (torch's default on CUDA) allocates one fp32 temporary per
  trained parameter (``sqrt`` of the second moment) after the activations are freed; the
  trainer uses the fused kernel on CUDA (``AdamW(fused=True)``: in place, no such temporaries);
* total = weights + gradients + DDP bucket + optimizer + EMA + max(activations, step).

Each table row adds one lever the trainer offers (``gradient_as_bucket_view`` is always set by
``flows/train.py``, fused AdamW always on CUDA; the others are ``train`` params). The last row
is ``train.fsdp`` instead: FSDP2 over the GPUs (:mod:`durian.training.sharding`), weights,
gradients, AdamW state and EMA sharded; the units' gathered weights are counted (the reference
nets' from forward to backward, two other units at a time).

Both ``drop_*`` flags are off (every sample keeps both references: the largest forward).
A card "fits" when the total is at most ``FIT_FRACTION`` of it (CUDA context, allocator slack).
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import durian.models.temporal as temporal_module  # noqa: E402
from durian.models.attention import grid_positions, locality_bias  # noqa: E402
from durian.models.durian_model import DurianModel  # noqa: E402
from durian.models.profiles import make_noise_scheduler, sd15_config, tiny_config  # noqa: E402
from durian.training.loop import half_frozen  # noqa: E402
from durian.training.sharding import owned_parameters, shard_units  # noqa: E402
from durian.training.step import training_loss  # noqa: E402

GiB = 2**30
CARDS_GB = (24, 48, 80, 141)
# A card holds a run when the total is at most this share of it: the CUDA context (~0.5 GiB)
# and the caching allocator's fragmentation take the rest.
FIT_FRACTION = 0.9
FP32 = 4
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParameterSet:
    """What a stage trains and keeps, in bytes per GPU."""

    trainable: int  # parameters trained (requires_grad after set_stage)
    frozen: int  # parameters kept frozen
    weight_bytes: int  # trained in fp32 + frozen in the mixed-precision dtype + buffers
    trainable_sizes: tuple[int, ...]  # per trained tensor (ZeRO partitions tensors, not bytes)
    # train.fsdp: trained bytes its units keep gathered from forward to backward (the reference
    # nets), and the largest unit gathered for its forward or backward alone
    fsdp_held: int = 0
    fsdp_largest_unit: int = 0


def model_config(tiny: bool, resolution: int) -> dict[str, Any]:
    return tiny_config(resolution) if tiny else sd15_config(resolution)


def stage_config(config: dict[str, Any], stage: int) -> dict[str, Any]:
    """``config`` with the temporal module stage 2 inserts (``set_stage(2)`` on a meta model):
    a model built from it needs no module moved after construction (fake tensors cannot be)."""
    if stage == 1:
        return config
    with torch.device("meta"):
        model = DurianModel(**config)
        model.set_stage(2)
    return {**config, "temporal_config": dict(model.config.temporal_config)}


def parameter_set(model: torch.nn.Module, amp_dtype: torch.dtype) -> ParameterSet:
    """Counts of ``model`` after ``set_stage``: trained parameters in fp32, frozen floating
    parameters in ``amp_dtype`` (as ``half_frozen`` keeps them)."""
    half = torch.finfo(amp_dtype).bits // 8
    trainable, frozen, weight_bytes, sizes = 0, 0, 0, []
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
            sizes.append(p.numel())
            weight_bytes += p.numel() * FP32
        else:
            frozen += p.numel()
            weight_bytes += p.numel() * (half if p.is_floating_point() else p.element_size())
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    return ParameterSet(trainable, frozen, weight_bytes, tuple(sizes))


def build_parameter_set(config: dict[str, Any], stage: int, amp_dtype: torch.dtype) -> ParameterSet:
    """The stage's :class:`ParameterSet` of the model ``config`` describes, built on meta, with
    the gathered bytes of the FSDP units the trainer would shard it into."""
    with torch.device("meta"):
        model = DurianModel(**stage_config(config, stage))
        model.set_stage(stage)
    units = [(keep, sum(p.numel() for p in own) * FP32)
             for _, keep, own in owned_parameters(shard_units(model, stage))]  # fmt: skip
    return replace(
        parameter_set(model, amp_dtype),
        fsdp_held=sum(b for keep, b in units if keep),
        fsdp_largest_unit=max((b for keep, b in units if not keep), default=0),
    )


def zero_partition_max(sizes: tuple[int, ...], ranks: int) -> int:
    """Elements of the most loaded rank under ZeroRedundancyOptimizer's partition (tensors
    sorted by size, largest first, each to the rank with the fewest elements so far)."""
    loads = [(0, r) for r in range(ranks)]
    for size in sorted(sizes, reverse=True):
        load, rank = heapq.heappop(loads)
        heapq.heappush(loads, (load + size, rank))
    return max(load for load, _ in loads)


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activations:
    saved: int  # storages autograd keeps for backward after the forward (+ the batch)
    recompute: int  # the largest checkpointed segment, recomputed in backward (0 without)
    segment: str = ""  # that segment's module class

    @property
    def total(self) -> int:
        return self.saved + self.recompute


class _SavedBytes:
    """Tensors packed for backward; :meth:`storages` counts those still alive, each storage
    once, parameters excluded. Only live ones: a graph no output leads to any more (e.g. the
    reference nets past their last recorded layer) is freed with its saved tensors, and a freed
    storage's id may be reused by the next one."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.saved: list[weakref.ref[torch.Tensor]] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.saved.append(weakref.ref(t))
        return t  # autograd keeps it (fake tensors: no memory) as long as its node lives

    def storages(self) -> dict[int, int]:
        out = {}
        for ref in self.saved:
            t = ref()
            if t is not None:
                storage = t.untyped_storage()
                key = storage._cdata  # one id per live storage: views of one tensor count once
                if key not in self.exclude:
                    out[key] = storage.nbytes()
        return out

    @property
    def total(self) -> int:
        return sum(self.storages().values())


@contextmanager
def _segments_measured(outer: _SavedBytes, largest: dict[str, Any]) -> Iterator[None]:
    """Gradient checkpointing as the model calls it (diffusers' blocks through
    ``torch.utils.checkpoint.checkpoint``, the motion modules through the name
    ``durian.models.temporal`` imports), given a forward context that counts what each segment
    saves (its recomputation in backward saves the same); ``largest`` keeps the maximum
    (``bytes``) and the segment's module class (``segment``)."""
    original = torch.utils.checkpoint.checkpoint

    def measured(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        segment = _SavedBytes(outer.exclude | set(outer.storages()))

        @contextmanager
        def counting() -> Iterator[None]:
            with torch.autograd.graph.saved_tensors_hooks(segment.pack, lambda t: t):
                yield
            if segment.total > largest["bytes"]:
                module = getattr(function, "__self__", function)  # a module or its __call__
                largest.update(bytes=segment.total, segment=type(module).__name__)

        return original(function, *args, context_fn=lambda: (counting(), nullcontext()), **kwargs)

    before = temporal_module.checkpoint
    torch.utils.checkpoint.checkpoint = measured
    temporal_module.checkpoint = measured
    try:
        yield
    finally:
        torch.utils.checkpoint.checkpoint = original
        temporal_module.checkpoint = before


class _CudaFp32Ops(TorchFunctionMode):
    """CUDA autocast's float32 policy for the normalisations and softmax: CUDA runs them in
    fp32 (inputs cast up, the fp32 copies saved for backward), CPU autocast leaves them in half
    precision. Without this the measure would miss the fp32 norm inputs of every block."""

    OPS = frozenset({F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax})

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in self.OPS:
            up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            args, kwargs = tree_map(up, (args, kwargs))
        return func(*args, **kwargs)


def synthetic_batch(batch: int, frames: int, size: int) -> dict[str, Any]:
    """Zero tensors in the loader's keys and shapes (``durian.training.step``); no drops."""
    b, f = batch, frames
    return {
        "target": torch.zeros(b, f, 3, size, size),
        "identity_ref": torch.zeros(b, 3, size, size),
        "identity_mask": torch.zeros(b, 1, size, size),
        "attribute_ref": torch.zeros(b, 3, size, size),
        "attribute_mask": torch.zeros(b, 1, size, size),
        "keypoints": torch.zeros(b, f, 3, size, size),
        "drop_identity": None,  # None: keep both references for every sample
        "drop_attribute": None,
    }


@contextmanager
def _no_cached_fakes() -> Iterator[None]:
    """The attention module caches its position codes and locality biases per shape: fake
    tensors cached during the measurement must not reach a later real forward in this
    process."""
    try:
        yield
    finally:
        grid_positions.cache_clear()
        locality_bias.cache_clear()


def measure_activations(
    config: dict[str, Any],
    stage: int,
    batch: int,
    frames: int,
    checkpointing: bool,
    amp_dtype: torch.dtype,
    fake: bool = True,
) -> Activations:
    """One training forward on fake tensors under autocast (see the module docstring);
    ``fake=False``: on real CPU tensors (the same count, for a model small enough to run)."""
    config = stage_config(config, stage)  # before the fake mode: it builds on meta
    # Non-fake inputs: the noise scheduler's tables, real CPU tensors, enter the forward.
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    with mode:
        model = DurianModel(**config)
        model.set_stage(stage)
        half_frozen(model, amp_dtype)
        if checkpointing:
            model.enable_gradient_checkpointing()
        data = synthetic_batch(batch, frames, int(config["resolution"]))
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = _SavedBytes(params)
    for value in data.values():
        if isinstance(value, torch.Tensor):
            saved.pack(value)  # the batch sits on the GPU for the whole step
    largest: dict[str, Any] = {"bytes": 0, "segment": ""}
    scheduler = make_noise_scheduler("ddpm", prediction_type=model.config.prediction_type)
    with (
        _no_cached_fakes(),
        mode,
        _segments_measured(saved, largest),
        torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t),
        torch.autocast("cpu", dtype=amp_dtype),
        _CudaFp32Ops(),
    ):
        loss = training_loss(model, scheduler, data, None)
    total = saved.total  # while the loss holds the graph
    del loss
    return Activations(total, largest["bytes"], largest["segment"])


# ----------------------------------------------------------------------------- strategies
@dataclass(frozen=True)
class Row:
    strategy: str
    weights: int
    gradients: int
    ddp_bucket: int
    optimizer: int
    ema: int
    activations: int
    step: int  # the optimizer step's temporaries (after the activations are freed)

    @property
    def total(self) -> int:
        persistent = self.weights + self.gradients + self.ddp_bucket + self.optimizer + self.ema
        return persistent + max(self.activations, self.step)


def strategy_rows(
    params: ParameterSet, full: Activations, checkpointed: Activations, gpus: int
) -> list[Row]:
    """The trainer's levers, one more per row (each row keeps the previous ones)."""
    grads = params.trainable * FP32
    row = Row("ddp", params.weight_bytes, grads, grads, 2 * grads, grads, full.total, grads)
    rows = [row]
    row = Row(**{**asdict(row), "strategy": "+ gradient_checkpointing",
                 "activations": checkpointed.total})  # fmt: skip
    rows.append(row)
    row = Row(**{**asdict(row), "strategy": "+ gradient_as_bucket_view", "ddp_bucket": 0})
    rows.append(row)
    row = Row(**{**asdict(row), "strategy": "+ fused AdamW", "step": 0})
    rows.append(row)
    row = Row(**{**asdict(row), "strategy": "+ ema_device: cpu", "ema": 0})
    rows.append(row)
    share = zero_partition_max(params.trainable_sizes, gpus) * FP32
    rows.append(Row(**{**asdict(row), "strategy": f"+ shard_optimizer (ZeRO-1, {gpus} GPUs)",
                       "optimizer": 2 * share}))  # fmt: skip
    rows.append(fsdp_row(params, checkpointed, gpus))
    return rows


def fsdp_row(params: ParameterSet, checkpointed: Activations, gpus: int) -> Row:
    """``train.fsdp`` over ``gpus`` (checkpointing, fused AdamW; instead of DDP, ZeRO-1 and the
    CPU EMA): 1/N of the trained weights, gradients, moments and EMA per GPU; the frozen parts
    whole; plus the reference nets' trained weights, gathered from forward to backward, and
    two of the other units gathered at a time (the one running and the one prefetched)."""
    trained = params.trainable * FP32
    share = -(-trained // gpus)
    weights = share + (params.weight_bytes - trained) + params.fsdp_held
    weights += 2 * params.fsdp_largest_unit
    return Row(f"train.fsdp (FSDP2, {gpus} GPUs, EMA sharded)", weights, share, 0, 2 * share,
               share, checkpointed.total, 0)  # fmt: skip


# ----------------------------------------------------------------------------- report
def fits(total: int) -> dict[str, bool]:
    return {f"{gb} GB": total <= FIT_FRACTION * gb * GiB for gb in CARDS_GB}


def stage_report(
    config: dict[str, Any], stage: int, batch: int, frames: int, gpus: int,
    amp_dtype: torch.dtype,
) -> dict[str, Any]:  # fmt: skip
    """Parameter counts, activations (checkpointing off and on) and the strategy rows."""
    params = build_parameter_set(config, stage, amp_dtype)
    full = measure_activations(config, stage, batch, frames, False, amp_dtype)
    checkpointed = measure_activations(config, stage, batch, frames, True, amp_dtype)
    rows = strategy_rows(params, full, checkpointed, gpus)
    return {
        "stage": stage,
        "batch": batch,
        "frames": frames,
        "trainable_parameters": params.trainable,
        "frozen_parameters": params.frozen,
        "activations": {"full": asdict(full), "checkpointed": asdict(checkpointed)},
        "rows": [{**asdict(r), "total": r.total, "fits": fits(r.total)} for r in rows],
    }


UNITS = {"GiB": GiB, "MiB": 2**20}
COLUMNS = ("weights", "gradients", "ddp_bucket", "optimizer", "ema", "activations", "step", "total")


def markdown(report: dict[str, Any], gpus: int, resolution: int, unit: str = "GiB") -> str:
    """One stage's table and notes (``unit``: GiB, or MiB for the tiny profile)."""

    def size(n: int) -> str:
        return f"{n / UNITS[unit]:.1f}"

    cards = [f"{gb} GB" for gb in CARDS_GB]
    head = (
        f"### Stage {report['stage']}: {resolution}², batch {report['batch']}"
        + (f" × {report['frames']} frames" if report["frames"] > 1 else "")
        + f" per GPU; {report['trainable_parameters'] / 1e6:.1f} M trained, "
        f"{report['frozen_parameters'] / 1e6:.1f} M frozen parameters ({unit} per GPU)\n"
    )
    labels = {"gradients": "grads", "ddp_bucket": "DDP bucket", "optimizer": "AdamW", "ema": "EMA"}
    cols = ["strategy", *(labels.get(c, c) for c in COLUMNS), *cards]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        values = [r["strategy"], *(size(r[k]) for k in COLUMNS)]
        values += ["fits" if r["fits"][c] else "no" for c in cards]
        lines.append("| " + " | ".join(values) + " |")
    act = report["activations"]
    ckpt = act["checkpointed"]
    lines += [
        "",
        f"Activations: {size(act['full']['saved'])} {unit} without checkpointing; with it "
        f"{size(ckpt['saved'])} {unit} saved + {size(ckpt['recompute'])} {unit} for the largest "
        f"recomputed segment ({ckpt['segment']}). The last row is not a lever on top of the "
        "others: it replaces DDP, ZeRO-1 and the CPU EMA.",
    ]
    return "\n".join(lines) + "\n"


def inference_weights(config: dict[str, Any], dtype: torch.dtype) -> dict[str, int]:
    """Weight bytes on the GPU at inference (every floating tensor in ``dtype``, as
    ``load_durian_pipeline`` loads on CUDA): ``placed`` (the whole model, temporal module
    included) and, with ``--cpu-offload``, each phase's parts
    (:meth:`DurianModel.offload_groups`)."""
    with torch.device("meta"):
        model = DurianModel(**stage_config(config, 2))

    def size(modules: list[torch.nn.Module]) -> int:
        tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
        return sum(t.numel() * (torch.finfo(dtype).bits // 8 if t.is_floating_point()
                                else t.element_size()) for t in tensors.values())  # fmt: skip

    return {"placed": size([model]),
            **{phase: size(parts) for phase, parts in model.offload_groups().items()}}  # fmt: skip


def run(
    tiny: bool = False, resolution: int | None = None, batch1: int = 4, batch2: int = 4,
    frames: int = 24, gpus: int = 8, mixed_precision: str = "fp16",
) -> dict[str, Any]:  # fmt: skip
    """Both stages' reports as JSON data."""
    resolution = resolution or (64 if tiny else 512)
    config = model_config(tiny, resolution)
    dtype = DTYPES[mixed_precision]
    return {
        "profile": "tiny" if tiny else "sd15",
        "resolution": resolution,
        "gpus": gpus,
        "mixed_precision": mixed_precision,
        "fit_fraction": FIT_FRACTION,
        "activation_method": "fake tensors, CPU autocast, saved_tensors_hooks",
        "stages": [
            stage_report(config, 1, batch1, 1, gpus, dtype),
            stage_report(config, 2, batch2, frames, gpus, dtype),
        ],
        "inference_weights": inference_weights(config, dtype),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny profile (64² by default)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (512; tiny: 64)")
    parser.add_argument("--batch1", type=int, default=4, help="stage-1 batch per GPU")
    parser.add_argument("--batch2", type=int, default=4, help="stage-2 clips per GPU")
    parser.add_argument("--frames", type=int, default=24, help="stage-2 frames per clip")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel GPUs (ZeRO-1 shards)")
    parser.add_argument("--mixed-precision", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args.tiny, args.resolution, args.batch1, args.batch2, args.frames, args.gpus,
                 args.mixed_precision)  # fmt: skip
    print(
        f"Per-GPU training memory, {report['profile']} at {report['resolution']}², "
        f"{args.mixed_precision} autocast; 'fits' = total ≤ {FIT_FRACTION:.0%} of the card.\n"
    )
    for stage in report["stages"]:
        print(markdown(stage, args.gpus, report["resolution"], "MiB" if args.tiny else "GiB"))
    unit, scale = ("MiB", 2**20) if args.tiny else ("GiB", 2**30)
    w = {k: f"{v / scale:.2f}" for k, v in report["inference_weights"].items()}
    print(
        f"Inference weights on the GPU ({unit}, {args.mixed_precision}): {w['placed']} placed; "
        f"with --cpu-offload {w['references']} while the references are encoded, "
        f"{w['denoise']} in the denoising loop, {w['decode']} while decoding."
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
