"""Stage ``train``: Ray Train ``TorchTrainer`` over the WebDataset shards.

``ScalingConfig`` comes from params (2 CPU workers on gloo here; ``use_gpu: true`` and N
workers on an existing cluster via ``RAY_ADDRESS`` or ``train.ray_address``). Rank 0 logs loss,
learning rate, samples/s and preview grids to MLflow; the other ranks log nothing. Checkpoints
(safetensors weights, optimizer, EMA, RNG, step, data position) are reported to Ray every
``checkpoint_every`` steps into ``models/checkpoints/<run name>/``, the last
``keep_checkpoints`` kept; the final weights (EMA when on) are saved as a pipeline folder
(``model_index.json``, ``model/``, ``scheduler/``) to ``models/durian/``.

Settings. The workers get the validated ``model``, ``pair`` and ``train`` sections as they are
(:func:`worker_config`: a :class:`durian.training.config.Recipe`, weight folders made absolute)
and build their trainer with ``Trainer.from_config``; the exported model folder records the
recipe's config hash (``training_recipe.json``), as ``benchmarks/learns_transfer.py``'s do.

Resume rule. With ``train.resume: true`` (default) the Ray run name is
``train-s<stage>-<hash>``, the hash covering everything that defines the run's trajectory: the
``model`` and ``pair`` sections, the ``train`` keys except bookkeeping ones
(:data:`NOT_IN_RUN_NAME`), the training shards (names and sizes), and a content fingerprint of
the mask bank and of the weights the run starts from (``train.init_from``,
``model.pretrained`` …; :func:`fingerprint`).
Ray Train V2 restores a run from the latest checkpoint found under the same ``storage_path`` +
``name``, so rerunning the flow with the same params after a driver crash (or a killed
``dvc repro``) continues at the saved step; a run that had finished is not trained again (its
last checkpoint is exported). Any change of params, data or starting weights gives a new name,
hence a fresh run. ``train.resume: false`` appends the MLflow run id: always a fresh run. Worker
crashes inside one run are absorbed by ``FailureConfig(max_failures)``: the workers restart from
the latest checkpoint. ``models/checkpoints`` must not be a DVC output (DVC deletes outputs
before it reruns a stage, which would throw the checkpoints away).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger

from durian.training.config import Recipe
from flows.mask_bank import mask_bank_path
from flows.mlflow_adapter import start_run
from flows.params import MODEL_WEIGHT_FIELDS, Params
from flows.project import paths, read_params, run_main, write_json
from flows.ray_adapter import (
    init_ray,
    is_local_ray,
    latest_reported_step,
    prune_unrecorded_checkpoints,
    shutdown_now,
)
from flows.stop import is_stop, report_progress

# train keys that do not change what the run computes: left out of the run name, so changing
# them (e.g. more frequent checkpoints after a crash) still resumes the run.
NOT_IN_RUN_NAME = frozenset(
    {
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "preview_every",
        "ray_address",
        "max_failures",
        "resume",
        "resume_data",
        "cpus_per_worker",
    }
)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch

    from durian.training.loop import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    recipe = config["recipe"]
    trainer = Trainer.from_config(
        recipe, config["shards"], config["mask_bank"], rank=rank, world_size=world, device=device
    )

    nodes = _worker_nodes(world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
    start = trainer.step

    # DDP over a module whose forward is the loss, so gradient sync follows the usual path
    # (not with train.fsdp: the sharded model synchronises itself). Unused parameters: a
    # sample whose references are both dropped (classifier-free guidance) leaves the
    # reference nets without gradient.
    trainer.wrap(
        lambda module: ray.train.torch.prepare_model(
            module,
            move_to_device=False,
            # Gradients as views of DDP's buckets: no second fp32 copy of them per GPU.
            parallel_strategy_kwargs={
                "find_unused_parameters": True,
                "gradient_as_bucket_view": True,
            },
        )
    )
    logger = _RankZeroLogger(config, trainer) if rank == 0 else None
    every = recipe.train.checkpoint_every
    t0, seen, timed_from = time.perf_counter(), 0, None
    for stats in trainer.steps():
        step = stats["step"]
        if timed_from is None:  # throughput from the end of the first (warm-up) step
            timed_from, t0 = step, time.perf_counter()
        else:
            seen += stats["samples"] * world
        rate = seen / max(time.perf_counter() - t0, 1e-9) if seen else float("nan")
        if logger is not None:
            logger.step(stats, rate)
        if step % every == 0 or step == trainer.total_steps:
            metrics = {"step": step, "loss": stats["loss"], "samples_per_s": rate,
                       "start_step": start, "world_size": world, "nodes": nodes}  # fmt: skip
            _report(trainer, rank, metrics)


def _worker_nodes(world: int) -> list[str]:
    """The Ray node ids the run's workers are on (every rank's, gathered): where it ran."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, node)
    return sorted(set(nodes))


def _report(trainer: Any, rank: int, metrics: dict[str, Any]) -> None:
    """Every rank reports (Ray Train needs all); rank 0 alone writes the checkpoint."""
    import ray.train

    name = f"checkpoint_{metrics['step']:07d}"
    trainer.gather_for_checkpoint()  # collective (a sharded optimizer's state to rank 0)
    with tempfile.TemporaryDirectory() as directory:
        ckpt = None
        if rank == 0:
            trainer.save(directory)
            ckpt = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


class _RankZeroLogger:
    """MLflow logging from rank 0 with the run id the driver passed in the config."""

    def __init__(self, config: dict[str, Any], trainer: Any) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = config.get("mlflow_run_id")
        uri = config.get("mlflow_tracking_uri")
        self.client = MlflowClient(tracking_uri=uri) if self.run_id else None
        self.trainer = trainer
        train = config["recipe"].train
        self.log_every = train.log_every
        self.preview_every = train.preview_every
        self.preview_batch = None
        if self.client is not None and self.preview_every and trainer.sharded:
            # A sharded model's forward needs every worker; previews run on rank 0 alone.
            logging.getLogger(__name__).warning("train.fsdp: no preview grids in this run")
        elif self.client is not None and self.preview_every:
            self.preview_batch = trainer.preview_batch(train.batch_size)

    def step(self, stats: dict[str, Any], rate: float) -> None:
        if self.client is None:
            return
        step, last = stats["step"], stats["step"] == self.trainer.total_steps
        if step % self.log_every == 0 or last:
            metrics = {"loss": stats["loss"], "lr": stats["lr"]}
            if rate == rate:  # not NaN (no timed step yet)
                metrics["samples_per_s"] = rate
            if stats["grad_norm"] == stats["grad_norm"]:
                metrics["grad_norm"] = stats["grad_norm"]
            for key, value in metrics.items():
                self.client.log_metric(self.run_id, key, float(value), step=step)
        if self.preview_batch is not None and (step % self.preview_every == 0 or last):
            grid = self.trainer.preview(self.preview_batch)
            self.client.log_image(self.run_id, grid, artifact_file=f"previews/step_{step:07d}.png")


def _abs(path: str | None, root: Path) -> str | None:
    # Ray workers need not share the driver's working directory.
    if not path:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else (root / p).resolve())


def resolved_recipe(params: Params) -> Recipe:
    """The run's recipe: the ``model``, ``pair`` and ``train`` sections as validated, with the
    weight folders made absolute (Ray workers need not share the driver's directory)."""
    root = paths().root
    folders = {key: _abs(getattr(params.model, key), root) for key in MODEL_WEIGHT_FIELDS}
    return params.recipe(**folders, init_from=_abs(params.train.init_from, root))


def worker_config(
    params: Params, shards: list[str], run_id: str | None, mask_bank: Path | None = None
) -> dict[str, Any]:
    """What every Ray worker gets: the recipe as validated objects (they pickle; the ``train``
    section still carries the checkpoint and logging cadence), plus this run's own values."""
    root = paths().root
    return {
        "recipe": resolved_recipe(params),
        "shards": [_abs(s, root) for s in shards],
        "mask_bank": str(mask_bank) if mask_bank is not None else None,
        "mlflow_run_id": run_id,
        # Explicit: a Ray started by an earlier flow in this process keeps that flow's env.
        "mlflow_tracking_uri": mlflow.get_tracking_uri() if run_id else None,
    }


def fingerprint(path: str | Path | None, root: Path | None = None) -> list[Any] | None:
    """A cheap content fingerprint of a weights file or folder: every file's relative path,
    size and a hash of its first and last MiB. A folder whose path stays the same while its
    content changes (``init_from`` pointing at the latest @champion) gets a new fingerprint."""
    if not path:
        return None
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = root / p
    if not p.exists():
        return [str(path), "missing"]
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    out: list[Any] = []
    for f in files:
        size = f.stat().st_size
        h = hashlib.sha256()
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 1 << 20:
                fh.seek(max(size - (1 << 20), 1 << 20))
                h.update(fh.read())
        out.append([str(f.relative_to(p)) if p.is_dir() else f.name, size, h.hexdigest()[:16]])
    return out


def run_name(
    params: Params, shards: list[str], mask_bank: Path | None, run_id: str | None = None
) -> str:
    """The Ray run name (see the module docstring for the resume rule)."""
    root = paths().root
    train = {k: v for k, v in params.train.model_dump().items() if k not in NOT_IN_RUN_NAME}
    model = params.model.model_dump()
    identity = {
        "model": model,
        "pair": params.pair.model_dump(mode="json"),
        "train": train,
        "shards": [(Path(s).name, Path(s).stat().st_size) for s in shards],
        "mask_bank": fingerprint(mask_bank),
        "weights": {
            key: fingerprint(value, root)
            for key, value in {
                "init_from": params.train.init_from,
                **{k: model[k] for k in MODEL_WEIGHT_FIELDS},
            }.items()
            if value
        },
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    name = f"train-s{params.train.stage}-{digest}"
    if not params.train.resume and run_id:
        name += f"-{run_id[:8]}"
    return name


def _trainer_class() -> type:
    """``TorchTrainer`` without Ray's own Ctrl-C handler, so SIGINT stops training like
    SIGTERM: Ray's handler asks the controller for a graceful abort and blocks the main
    thread in it for seconds; ours (:mod:`flows.stop`) unwinds at once and
    :func:`flows.ray_adapter.shutdown_now` ends the workers."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            return None

    return Trainer


def fit(
    params: Params,
    shards: list[str],
    storage: Path,
    run_name: str,
    run_id: str | None,
    mask_bank: Path | None = None,
):
    """Run the TorchTrainer; returns Ray's ``Result``.

    Stopped (Ctrl-C, SIGTERM), it leaves Ray at once and, with a
    local cluster, removes the checkpoint folders Ray had not recorded as whole, so the run
    folder holds only checkpoints a rerun resumes from."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    t = params.train
    run_dir = storage / run_name
    prune_unrecorded_checkpoints(run_dir)  # what an earlier stop or crash left half-made
    try:
        init_ray(t.ray_address, num_cpus=None)
        trainer = _trainer_class()(
            train_loop_per_worker,
            train_loop_config=worker_config(params, shards, run_id, mask_bank),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=t.num_workers,
                use_gpu=t.use_gpu,
                resources_per_worker={
                    "CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})
                },
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=str(storage.resolve()),
                checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                failure_config=FailureConfig(max_failures=t.max_failures),
            ),
        )
        return trainer.fit()
    except BaseException as err:
        if not is_stop(err):
            raise
        local = is_local_ray()
        shutdown_now()
        if local:  # no worker of ours is left to write: safe to tidy the run folder
            prune_unrecorded_checkpoints(run_dir)
        report_progress(checkpoint_progress(run_dir, t.steps))
        raise


def checkpoint_progress(run_dir: Path, steps: int) -> str:
    """What a stop leaves of a training run, for the stop message."""
    step = latest_reported_step(run_dir)
    if step is None:
        return f"no checkpoint yet of {run_dir.name}"
    return f"checkpoint at step {step} of {steps} in {run_dir}"


def publish_model(export: Callable[[Path], Any], model_dir: Path) -> Any:
    """``export(folder)`` into a hidden sibling of ``model_dir``, then swap it in: the model
    folder is whole (the old one or the new one) or, for the instant between two renames,
    absent; never half written. Leftovers of an earlier stop are removed first."""
    parent = model_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{model_dir.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{model_dir.name}.tmp-{os.getpid()}"
    old = parent / f".{model_dir.name}.old-{os.getpid()}"
    try:
        out = export(tmp)
        if model_dir.exists():
            model_dir.rename(old)
        tmp.rename(model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def with_finetune_start(params: Params) -> Params:
    """``train.retrain: finetune`` with no ``init_from``: start from the registered @champion
    (downloaded into ``.durian/champion``); from scratch while there is none. The registry is
    state DVC does not track: a new champion changes what this stage starts from."""
    if params.train.retrain != "finetune" or params.train.init_from:
        return params
    from flows.model_store import finetune_start

    model = finetune_start(params.register.model_name, paths().root / ".durian" / "champion")
    if model is None:
        get_run_logger().info("retrain finetune: no @champion yet, training from scratch")
        return params
    get_run_logger().info("retrain finetune: starting from @champion at %s", model)
    train = params.train.model_copy(update={"init_from": str(model)})
    return params.model_copy(update={"train": train})


@flow(name="train")
def train_flow() -> dict[str, Any]:
    from preprocessing.shard_index import committed_shards

    log = get_run_logger()
    params = with_finetune_start(read_params())
    p = paths()
    shards = [str(s) for s in committed_shards(p.shards, split="train")]
    if not shards:
        raise FileNotFoundError(f"no training shards in {p.shards}: run the preprocess stage first")
    bank = mask_bank_path()
    bank = bank if bank.exists() else None
    if bank is None:
        log.warning("train: no %s; mask expansion is random dilation only", mask_bank_path())
    recipe = resolved_recipe(params)
    with start_run("train", tags={"stage": "train"}) as run:
        name = run_name(params, shards, bank, run.info.run_id)
        mlflow.set_tags({"ray_run_name": name, "mask_bank": str(bank or ""),
                         "config_hash": recipe.config_hash()})  # fmt: skip
        mlflow.log_params(
            {f"{section}.{k}": v for section in ("train", "model", "pair")
             for k, v in getattr(params, section).model_dump().items()}
            | {"num_shards": len(shards)}
        )  # fmt: skip
        prior = latest_reported_step(p.checkpoints / name)
        report_progress(checkpoint_progress(p.checkpoints / name, params.train.steps))
        t0 = time.perf_counter()
        result = fit(params, shards, p.checkpoints, name, run.info.run_id, bank)
        wall = time.perf_counter() - t0
        if result.error is not None:
            raise RuntimeError(f"training failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError("training produced no checkpoint")
        # The model code (diffusers, ~3 s to import) loads in the workers; the driver needs it
        # only now, to export, so a stopped run never pays for it.
        from durian.training.loop import export_checkpoint

        with result.checkpoint.as_directory() as directory:
            info = publish_model(lambda out: export_checkpoint(directory, recipe, out), p.model)
        report_progress(f"{checkpoint_progress(p.checkpoints / name, params.train.steps)}, "
                        f"exported to {p.model}")
        metrics = dict(result.metrics or {})
        # A resumed run that had nothing left to do reports nothing: fall back on Ray's record.
        start_step = max(int(metrics.get("start_step", 0)), prior or 0)
        final_loss = float(metrics.get("loss", float("nan")))
        mlflow.log_metrics({"train_wall_s": wall, "final_loss": final_loss})
        mlflow.set_tag("resumed_from_step", str(start_step))
        summary = {
            "mlflow_run_id": run.info.run_id,
            "ray_run_name": name,
            "steps": int(info.get("step", metrics.get("step", 0))),
            "start_step": start_step,
            "final_loss": final_loss,
            "samples_per_s": float(metrics.get("samples_per_s", 0.0)),
            "wall_s": round(wall, 2),
            "checkpoint": str(result.checkpoint.path),
            "model_dir": str(p.model),
            "ema": bool(info.get("exported_ema", False)),
            "config_hash": recipe.config_hash(),
            "nodes": list(metrics.get("nodes", [])),  # the Ray nodes its workers ran on
        }
        write_json(p.train_info, summary)
        report_progress(f"training done, model in {p.model}, summary in {p.train_info}")
    log.info("train: %s", summary)
    return summary


if __name__ == "__main__":
    run_main(train_flow)
