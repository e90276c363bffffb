"""Stage ``sample``: the embedded sample data — real photographs animated with a synthetic head
motion plus procedurally drawn portraits with exact labels — written to ``data/raw/``."""

from __future__ import annotations

import shutil

from prefect import flow, get_run_logger

from flows.common import paths, read_params, run_main
from preprocessing.sample import generate_sample


@flow(name="sample")
def sample_flow() -> list[str]:
    params = read_params().sample
    out = paths().raw
    # The stage owns data/raw entirely: regenerate from scratch so removed videos don't linger.
    if out.exists():
        shutil.rmtree(out)
    written = generate_sample(
        out,
        n_synthetic=params.n_synthetic,
        n_frames=params.n_frames,
        size=params.size,
        fps=params.fps,
        seed=params.seed,
        real_photos=params.real_photos,
    )
    get_run_logger().info("sample: wrote %d videos to %s", len(written), out)
    return [str(p) for p in written]


if __name__ == "__main__":
    run_main(sample_flow)
