"""The whole pipeline as one Prefect flow: each stage's flow runs as a subflow, in order.

``durian run`` normally runs the same stages through DVC (``dvc repro``) so that only what
changed reruns; this flow is what a Prefect deployment serves."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

STAGES = ("sample", "ingest", "preprocess", "train", "evaluate", "register")


@flow(name="durian-pipeline")
def pipeline_flow(stages: list[str] | None = None) -> dict[str, Any]:
    import importlib

    chosen = list(stages or STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    results: dict[str, Any] = {}
    for name in STAGES:
        if name in chosen:
            stage_flow = getattr(importlib.import_module(f"flows.{name}"), f"{name}_flow")
            results[name] = stage_flow()
    get_run_logger().info("pipeline finished: %s", ", ".join(results))
    return results


if __name__ == "__main__":
    from flows.common import run_main

    run_main(pipeline_flow)
