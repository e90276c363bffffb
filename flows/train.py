"""Stage ``train``: Ray Train ``TorchTrainer`` over the WebDataset shards.

``ScalingConfig`` comes from params (2 CPU workers on gloo here; ``use_gpu: true`` and N
workers on an existing cluster via ``RAY_ADDRESS`` or ``train.ray_address``). Rank 0 logs to
MLflow; checkpoints (safetensors) are reported to Ray every ``checkpoint_every`` steps; the
final weights are saved with ``save_pretrained`` to ``models/durian/``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger

from durian.config import Params
from flows.common import paths, read_params, run_main, write_json
from flows.mlflow_adapter import start_run
from flows.ray_adapter import init_ray


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    from mlflow.tracking import MlflowClient

    from durian.training.loop import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer = Trainer.from_config(config, rank=rank, world_size=world)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)

    # DDP over a module whose forward is the loss, so gradient sync follows the usual path.
    trainer.wrap(
        lambda module: ray.train.torch.prepare_model(
            module, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
    )
    client = MlflowClient() if rank == 0 and config.get("mlflow_run_id") else None
    run_id = config.get("mlflow_run_id")
    every, log_every = config["checkpoint_every"], config["log_every"]
    t0, seen = time.perf_counter(), 0
    for stats in trainer.steps():
        step = stats["step"]
        seen += stats["samples"] * world
        if client is not None and (step % log_every == 0 or step == trainer.total_steps):
            elapsed = max(time.perf_counter() - t0, 1e-9)
            client.log_metric(run_id, "loss", stats["loss"], step=step)
            client.log_metric(run_id, "lr", stats["lr"], step=step)
            client.log_metric(run_id, "samples_per_s", seen / elapsed, step=step)
        if step % every == 0 or step == trainer.total_steps:
            metrics = {"step": step, "loss": stats["loss"], "samples_per_s": seen / max(
                time.perf_counter() - t0, 1e-9)}
            with tempfile.TemporaryDirectory() as directory:
                ckpt = None
                if rank == 0:
                    trainer.save(directory)
                    ckpt = ray.train.Checkpoint.from_directory(directory)
                ray.train.report(metrics, checkpoint=ckpt)
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


def worker_config(params: Params, shards: list[str], run_id: str | None) -> dict[str, Any]:
    t = params.train
    return {
        "model": params.model.model_dump(),
        "shards": shards,
        "stage": t.stage,
        "steps": t.steps,
        "lr": t.lr,
        "batch_size": t.batch_size,
        "frames": t.frames,
        "grad_accum": t.grad_accum,
        "seed": t.seed,
        "log_every": t.log_every,
        "checkpoint_every": t.checkpoint_every,
        "mlflow_run_id": run_id,
    }


def fit(params: Params, shards: list[str], storage: Path, run_name: str, run_id: str | None):
    """Run the TorchTrainer; returns Ray's ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = params.train
    init_ray(t.ray_address, num_cpus=None)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config(params, shards, run_id),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=t.num_workers,
            use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
        ),
    )
    return trainer.fit()


@flow(name="train")
def train_flow() -> dict[str, Any]:
    from durian.training.loop import export_checkpoint
    from preprocessing.shards import list_shards

    log = get_run_logger()
    params = read_params()
    p = paths()
    shards = [str(s) for s in list_shards(p.shards, split="train")]
    if not shards:
        raise FileNotFoundError(f"no training shards in {p.shards}: run the preprocess stage first")
    with start_run("train", tags={"stage": "train"}) as run:
        mlflow.log_params(
            {f"train.{k}": v for k, v in params.train.model_dump().items()}
            | {f"model.{k}": v for k, v in params.model.model_dump().items()}
            | {"num_shards": len(shards)}
        )
        t0 = time.perf_counter()
        result = fit(params, shards, p.checkpoints, f"train-{run.info.run_id[:8]}", run.info.run_id)
        wall = time.perf_counter() - t0
        if result.checkpoint is None:
            raise RuntimeError(f"training produced no checkpoint: {result.error}")
        with result.checkpoint.as_directory() as directory:
            info = export_checkpoint(directory, params.model.model_dump(), p.model)
        metrics = dict(result.metrics or {})
        mlflow.log_metrics({"train_wall_s": wall, "final_loss": float(metrics.get("loss", "nan"))})
        summary = {
            "mlflow_run_id": run.info.run_id,
            "steps": int(metrics.get("step", info.get("step", 0))),
            "final_loss": float(metrics.get("loss", float("nan"))),
            "samples_per_s": float(metrics.get("samples_per_s", 0.0)),
            "wall_s": round(wall, 2),
            "checkpoint": str(result.checkpoint.path),
            "model_dir": str(p.model),
        }
        write_json(p.train_info, summary)
    log.info("train: %s", summary)
    return summary


if __name__ == "__main__":
    run_main(train_flow)
