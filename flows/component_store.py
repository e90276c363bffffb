"""Frozen components stored once in MLflow, however many registered versions use them.

A pipeline folder keeps its frozen components (the VAE; the image encoder when it is not
trained) in ``vae/`` and ``image_encoder/``: the same bytes in every model trained on the same
base (1.5 GB at SD size). A registered version holds only the rest; each frozen component is
the artifact of one MLflow run of the project's experiment, tagged with the component's sha256,
logged the first time a version needs it and found by that tag afterwards. The version's
``frozen_components.json`` names them (``runs:/…`` URI and sha256) and
:func:`durian.pipelines.components.complete_pipeline_folder` puts them back on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from durian.pipelines.components import FROZEN_RECORD, folder_digest
from flows.mlflow_adapter import client, experiment_id
from flows.stop import is_stop

FROZEN_NAMES = ("vae", "image_encoder")
DIGEST_TAG = "durian.component_sha256"


def frozen_component_folders(folder: Path) -> dict[str, Path]:
    """The frozen component folders a pipeline folder holds, by component name."""
    index = folder / "model_index.json"
    if not index.is_file():
        return {}  # a bare model folder: everything in one
    entries = json.loads(index.read_text())
    return {
        name: folder / name
        for name in FROZEN_NAMES
        if (entries.get(name) or [None])[0] is not None and (folder / name).is_dir()
    }


def stored_component(name: str, path: Path) -> dict[str, str]:
    """``{"uri", "sha256"}`` of component ``path`` in MLflow, logging it only when no finished
    run holds the same bytes yet (a run cut short is never reused)."""
    sha256 = folder_digest(path)
    c = client()
    experiment = experiment_id()
    found = c.search_runs(
        [experiment],
        filter_string=f"tags.`{DIGEST_TAG}` = '{sha256}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if found:
        return {"uri": f"runs:/{found[0].info.run_id}/{name}", "sha256": sha256}
    run = c.create_run(experiment, run_name=f"component-{name}",
                       tags={DIGEST_TAG: sha256, "durian.component": name})  # fmt: skip
    try:
        c.log_artifacts(run.info.run_id, str(path), artifact_path=name)
    except BaseException as err:
        # KILLED for a stop, as the stages' own runs end; FAILED for an error.
        c.set_terminated(run.info.run_id, "KILLED" if is_stop(err) else "FAILED")
        raise
    c.set_terminated(run.info.run_id, "FINISHED")
    return {"uri": f"runs:/{run.info.run_id}/{name}", "sha256": sha256}


def without_frozen(folder: Path, staging: Path) -> Path:
    """``staging``: a copy of pipeline folder ``folder`` (hard links where the filesystem
    allows) without its frozen components, which are stored once in MLflow and named in its
    ``frozen_components.json``. A folder without frozen components is copied whole."""
    frozen = frozen_component_folders(folder)
    shutil.rmtree(staging, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another filesystem
            shutil.copy2(src, dst)

    shutil.copytree(folder, staging, copy_function=link,
                    ignore=lambda d, names: [n for n in names
                                             if Path(d) == folder and n in frozen])  # fmt: skip
    if frozen:
        record = {name: stored_component(name, path) for name, path in frozen.items()}
        (staging / FROZEN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return staging
