"""Stage ``mask_bank``: the attribute masks of the training shards, for mask expansion.

Reads every training shard once, keeps a uniform sample of at most ``per_category_limit`` masks
per attribute category (each with its frame's landmarks and identity) and writes
``data/mask_bank.npz``. The train stage uses it when present (``durian-method.md`` §3: the
portrait's removed region is its own mask united with aligned masks of other identities).

The bank is a uniform sample over all shards, so it is written in one go at the end (with its
summary ``data/mask_bank.json``, both or neither): a stopped run leaves the earlier bank as it
was, and the rerun reads the shards again (seconds).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from prefect import flow, get_run_logger

from flows.project import paths, read_params, run_main, write_json
from flows.stop import report_progress, stop_deferred

BANK = Path("data") / "mask_bank.npz"


def mask_bank_path(root: Path | None = None) -> Path:
    return paths(root).root / BANK


def _clips(shards: list[str]) -> Iterator[Any]:
    import webdataset as wds

    from durian.data.clip_codec import decode_clip

    for i, url in enumerate(shards, 1):
        for sample in wds.tarfile_samples([{"url": url}]):
            yield decode_clip(sample)
        report_progress(f"nothing yet ({i} of {len(shards)} training shards read; the bank "
                        "is written in one go at the end)")


@flow(name="mask_bank")
def mask_bank_flow() -> dict[str, Any]:
    from durian.data.masks import build_mask_bank
    from preprocessing.shard_index import committed_shards

    log = get_run_logger()
    params = read_params().mask_bank
    p = paths()
    shards = committed_shards(p.shards, split="train")
    if not shards:
        raise FileNotFoundError(f"no training shards in {p.shards}: run the preprocess stage first")
    out = mask_bank_path()
    leftover = out.with_name(out.name + ".tmp")  # MaskBank.save's temporary, if a run died
    leftover.unlink(missing_ok=True)
    log.info("mask bank: reading %d training shards", len(shards))
    report_progress("nothing yet (the bank is written in one go at the end)")
    t0 = time.perf_counter()
    bank = build_mask_bank(
        _clips(shards),
        params.per_category_limit,
        np.random.default_rng(params.seed),
        size=params.size,
        frames_per_clip=params.frames_per_clip,
    )
    summary = {
        "path": str(out),
        "counts": {k: v for k, v in bank.counts().items() if v},
        "num_shards": len(shards),
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    with stop_deferred():  # the bank and its summary together, or neither
        try:
            bank.save(out)
        finally:
            leftover.unlink(missing_ok=True)
        write_json(out.with_suffix(".json"), summary)
        report_progress(f"the bank, {out} ({sum(summary['counts'].values())} masks)")
    log.info("mask bank: %s", summary)
    return summary


if __name__ == "__main__":
    run_main(mask_bank_flow)
