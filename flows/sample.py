"""Stage ``sample``: the embedded sample data — real photographs animated with a synthetic head
motion plus procedurally drawn portraits with exact labels — written to ``data/raw/``.

Resumable: every file is written atomically, and ``data/raw/state.json`` names the settings
and code the files were made with (a fingerprint). A rerun with the same fingerprint keeps
the videos already there and writes the rest, so a stopped run continues where it stopped;
a different fingerprint regenerates the folder from scratch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

import preprocessing.labels as labels_lib
import preprocessing.video as video_lib
import synthetic
from flows.project import paths, read_params, run_main
from flows.stop import report_progress
from preprocessing.incremental import STATE_FILE, fingerprint, read_state, write_state
from synthetic.sample import generate_sample, sample_files, sample_videos

# The code that shapes the files (as dvc.yaml's deps of the stage): the synthetic package (the
# sample itself included), the label schema of its label maps and the video writer.
CODE = [*sorted(str(p) for p in Path(synthetic.__file__).parent.glob("*.py")),
        labels_lib.__file__, video_lib.__file__]


def sample_fingerprint(settings: dict[str, Any]) -> str:
    return fingerprint(settings, CODE)


def open_raw_folder(out: Path, fp: str, names: list[str]) -> str:
    """Make ``out`` hold only files of this fingerprint; returns why it was kept or cleared.

    The stage owns the folder entirely: anything not in ``names`` (a video the params no
    longer ask for, a temporary file of a killed run) goes.
    """
    if out.is_dir() and read_state(out).get("fingerprint") == fp:
        keep = {*names, STATE_FILE}
        for p in out.iterdir():
            if p.name not in keep:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return "continuing the earlier files"
    existed = out.exists()
    if existed:
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_state(out, {"fingerprint": fp})  # before any video: a file here is of this fp
    return "params or sample code changed: regenerating" if existed else "no earlier sample"


@flow(name="sample")
def sample_flow() -> list[str]:
    log = get_run_logger()
    params = read_params().sample
    out = paths().raw
    fp = sample_fingerprint(params.model_dump())
    why = open_raw_folder(out, fp, sample_files(params.n_synthetic, params.real_photos))
    total = len(sample_videos(params.n_synthetic, params.real_photos))
    counts = {True: 0, False: 0}  # kept, written

    def on_video(video: Path, kept: bool) -> None:
        counts[kept] += 1
        report_progress(f"{counts[True] + counts[False]} of {total} videos in "
                        f"{out.relative_to(paths().root)}")

    report_progress(f"0 of {total} videos")
    written = generate_sample(
        out,
        n_synthetic=params.n_synthetic,
        n_frames=params.n_frames,
        size=params.size,
        fps=params.fps,
        seed=params.seed,
        real_photos=params.real_photos,
        keep_existing=True,
        on_video=on_video,
    )
    log.info("sample: %d videos in %s (%s): %d kept, %d written", len(written), out, why,
             counts[True], counts[False])
    print(f"sample: {len(written)} videos, {counts[True]} kept from an earlier run, "
          f"{counts[False]} written")
    return [str(p) for p in written]


if __name__ == "__main__":
    run_main(sample_flow)
