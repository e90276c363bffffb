"""ZeRO-1 (``train.shard_optimizer``) on 2 real gloo workers: the losses follow plain DDP's,
each worker holds only its shard of the moments, and a checkpoint gathered on rank 0 resumes
on both workers with the same state."""

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

STEPS = 3
SIZE = 32
TOLERANCE = 1e-5  # same AdamW arithmetic, only where each moment lives differs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        for sharded in (False, True):  # plain DDP, then ZeRO-1, in the same two processes
            _train(rank, sharded, Path(out))
    finally:
        dist.destroy_process_group()


def _train(rank: int, sharded: bool, out: Path) -> None:
    from durian.models.profiles import build_model
    from durian.training.config import TrainConfig
    from durian.training.loop import Trainer
    from durian.training.step import random_training_batch

    cfg = TrainConfig(steps=STEPS + 1, lr=1e-3, batch_size=1, shard_optimizer=sharded)

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
    inner = lambda t: t.optimizer.optim if sharded else t.optimizer  # noqa: E731
    local = [p for p in first.params if inner(first).state.get(p)]
    ckpt = out / f"ckpt_{int(sharded)}"
    first.gather_for_checkpoint()
    if rank == 0:
        first.save(ckpt)
    dist.barrier()
    second = trainer()
    second.load(ckpt)
    # The resumed optimizer holds, on this rank, the moments the first one held.
    same = all(
        torch.equal(inner(first).state[p1]["exp_avg"], inner(second).state[p2]["exp_avg"])
        for p1, p2 in zip(first.params, second.params, strict=True)
        if p1 in inner(first).state
    )
    resumed = next(second.steps())["loss"]
    result = {
        "losses": losses,
        "optimizer": type(first.optimizer).__name__,
        "params_with_state": len(local),
        "params": len(first.params),
        "same_moments_after_resume": same,
        "resumed_step": second.step,
        "resumed_loss": resumed,
    }
    (out / f"rank{rank}_{int(sharded)}.json").write_text(json.dumps(result))


def test_zero1_follows_ddp_and_resumes_on_both_workers(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ddp, zero = (
        [json.loads((tmp_path / f"rank{r}_{s}.json").read_text()) for r in (0, 1)] for s in (0, 1)
    )
    assert ddp[0]["optimizer"] == "AdamW" and zero[0]["optimizer"] == "ZeroRedundancyOptimizer"
    for plain, sharded in zip(ddp, zero, strict=True):
        for a, b in zip(plain["losses"], sharded["losses"], strict=True):
            assert abs(a - b) <= TOLERANCE * max(1.0, abs(a)), (plain["losses"], sharded["losses"])
    # Each rank keeps moments for part of the parameters only; together all of them.
    held = [r["params_with_state"] for r in zero]
    assert all(0 < h < zero[0]["params"] for h in held) and sum(held) == zero[0]["params"]
    assert all(r["params_with_state"] == r["params"] for r in ddp)
    for r in zero + ddp:
        assert r["same_moments_after_resume"] and r["resumed_step"] == STEPS + 1
    assert abs(ddp[0]["resumed_loss"] - zero[0]["resumed_loss"]) <= 1e-4
