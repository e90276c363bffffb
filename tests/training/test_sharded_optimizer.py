"""ZeRO-1 (``train.shard_optimizer``) and full sharding (``train.fsdp``, FSDP2) on 2 real gloo
workers: the losses follow plain DDP's, each worker holds only its shard of the moments (FSDP:
of the weights, moments and EMA too), and a checkpoint gathered on rank 0 resumes on both
workers with the same state."""

from __future__ import annotations

import itertools
import json
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

STEPS = 2
SIZE = 32
TOLERANCE = 1e-5  # same AdamW arithmetic, only where each moment lives differs
MODES = ("ddp", "zero1", "fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        for mode in MODES:  # plain DDP, ZeRO-1, FSDP, in the same two processes
            _train(rank, mode, Path(out))
        _stage2(rank, Path(out))
    finally:
        dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _train(rank: int, mode: str, out: Path) -> None:
    from durian.models.profiles import build_model
    from durian.training.config import TrainConfig
    from durian.training.loop import Trainer
    from durian.training.step import random_training_batch

    # FSDP with gradient checkpointing too: the reference nets' blocks are recomputed while
    # their weights stay gathered; the losses are the same either way.
    cfg = TrainConfig(steps=STEPS + 1, lr=1e-3, batch_size=1, ema=True, ema_decay=0.9,
                      shard_optimizer=mode == "zero1", fsdp=mode == "fsdp",
                      gradient_checkpointing=mode == "fsdp")  # fmt: skip

    def trainer() -> Trainer:
        torch.manual_seed(0)  # the same initial weights on every rank
        model = build_model("tiny", resolution=SIZE)
        batches = itertools.repeat(random_training_batch(1, 1, SIZE, seed=rank))
        t = Trainer(model, batches, cfg, rank=rank)
        t.wrap(lambda m: DistributedDataParallel(
            m, find_unused_parameters=True, gradient_as_bucket_view=True))  # fmt: skip
        return t

    first = trainer()
    steps = first.steps()
    losses = [next(steps)["loss"] for _ in range(STEPS)]
    # ZeRO's own state is that of its local AdamW over this rank's shard.
    inner = lambda t: t.optimizer.optim if mode == "zero1" else t.optimizer  # noqa: E731
    local = [p for p in first.params if inner(first).state.get(p)]
    ckpt = out / f"ckpt_{mode}"
    first.gather_for_checkpoint()
    if rank == 0:
        first.save(ckpt)
    dist.barrier()
    second = trainer()
    second.load(ckpt)
    # The resumed optimizer holds, on this rank, the moments the first one held.
    same = all(
        torch.equal(_local(inner(first).state[p1]["exp_avg"]),
                    _local(inner(second).state[p2]["exp_avg"]))
        for p1, p2 in zip(first.params, second.params, strict=True)
        if p1 in inner(first).state
    )  # fmt: skip
    same_ema = all(torch.equal(_local(a), _local(b)) for a, b in zip(
        first.ema.shadow.values(), second.ema.shadow.values(), strict=True))  # fmt: skip
    resumed = next(second.steps())["loss"]
    result = {
        "losses": losses,
        "optimizer": type(first.optimizer).__name__,
        "params_with_state": len(local),
        "params": len(first.params),
        "numel_here": sum(_local(p).numel() for p in first.params),
        "numel": sum(p.numel() for p in first.params),
        "same_moments_after_resume": same,
        "same_ema_after_resume": same_ema,
        "resumed_step": second.step,
        "resumed_loss": resumed,
    }
    (out / f"rank{rank}_{mode}.json").write_text(json.dumps(result))


def _stage2(rank: int, out: Path) -> None:
    """Stage 2 (the motion modules are the units) in bf16 with checkpointing: DDP, then FSDP."""
    from durian.models.profiles import build_model
    from durian.training.config import TrainConfig
    from durian.training.loop import Trainer
    from durian.training.step import random_training_batch

    losses = {}
    for fsdp in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny", resolution=SIZE)
        model.add_temporal_module()
        cfg = TrainConfig(stage=2, steps=STEPS, lr=1e-2, batch_size=1, fsdp=fsdp,
                          gradient_checkpointing=True, mixed_precision="bf16")  # fmt: skip
        t = Trainer(model, itertools.repeat(random_training_batch(1, 3, SIZE, seed=rank)), cfg,
                    rank=rank)  # fmt: skip
        t.wrap(lambda m: DistributedDataParallel(m, find_unused_parameters=True))
        losses[str(fsdp)] = [s["loss"] for s in t.steps()]
        losses[f"sharded_{fsdp}"] = t.sharded
    (out / f"rank{rank}_stage2.json").write_text(json.dumps(losses))


def test_sharding_follows_ddp_and_resumes_on_both_workers(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp, zero, fsdp = (
        [json.loads((tmp_path / f"rank{r}_{m}.json").read_text()) for r in (0, 1)] for m in MODES
    )
    assert ddp[0]["optimizer"] == "AdamW" and zero[0]["optimizer"] == "ZeroRedundancyOptimizer"
    for plain, zero_r, fsdp_r in zip(ddp, zero, fsdp, strict=True):
        for a, b, c in zip(plain["losses"], zero_r["losses"], fsdp_r["losses"], strict=True):
            assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (plain["losses"], zero_r["losses"])
            assert abs(a - c) <= TOLERANCE * max(1.0, abs(a)), (plain["losses"], fsdp_r["losses"])
    # ZeRO-1: each rank keeps moments for part of the parameters only; together all of them.
    held = [r["params_with_state"] for r in zero]
    assert all(0 < h < zero[0]["params"] for h in held) and sum(held) == zero[0]["params"]
    assert all(r["params_with_state"] == r["params"] for r in ddp)
    # FSDP: each rank holds about half of every trained tensor (and so of its moments and EMA).
    assert sum(r["numel_here"] for r in fsdp) >= fsdp[0]["numel"]
    assert all(r["numel_here"] <= 0.55 * r["numel"] for r in fsdp)
    assert all(r["numel_here"] == r["numel"] for r in ddp)
    for r in zero + ddp + fsdp:
        assert r["same_moments_after_resume"] and r["same_ema_after_resume"]
        assert r["resumed_step"] == STEPS + 1
    for other in (zero, fsdp):
        assert abs(ddp[0]["resumed_loss"] - other[0]["resumed_loss"]) <= 1e-4
    for rank in (0, 1):
        stage2 = json.loads((tmp_path / f"rank{rank}_stage2.json").read_text())
        assert stage2["sharded_True"] and not stage2["sharded_False"]
        for a, b in zip(stage2["False"], stage2["True"], strict=True):
            assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), stage2
