"""The registered model: an MLflow pyfunc wrapping :class:`DurianPipeline` (models-from-code).

Logged by ``flows/register.py`` with the pipeline folder (safetensors + configs + the
scheduler, never pickled modules) as the ``model`` artifact and the ``durian`` package as code.
The frozen components (the VAE, a frozen image encoder) are not in it: they are stored once in
MLflow (``flows/component_store.py``) and the folder's ``frozen_components.json`` names them;
:func:`durian.pipelines.components.complete_pipeline_folder` puts them back on load.
Input: a DataFrame, one row per request, images as base64 PNG strings:

    portrait, portrait_mask, attribute, attribute_mask   base64 PNG
    keypoints                                            JSON list of base64 PNG (one per frame)
    steps, guidance, seed                                optional numbers

Output: one list of base64 PNG frames per row.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from PIL import Image


def encode_png(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def fetch_artifacts(uri: str, dst: Path) -> Path:
    """MLflow's download of an artifact URI into ``dst``; the local path of what it wrote."""
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst)))


# MLflow asks every PythonModel for type hints on predict; ours has none on purpose (below).
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


class DurianPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from durian.models.config import identity_embedder_of
        from durian.pipelines.components import completed_view
        from durian.pipelines.pipeline_durian import load_durian_pipeline
        from preprocessing.identity import make_embedder

        # MLflow has already resolved the version to a local artifact folder, and only the
        # ``durian`` and ``preprocessing`` packages travel with the version: no flows here. The
        # GPU in half precision when there is one (the loader durian animate uses). The
        # artifact folder stays as MLflow wrote it (at logging time MLflow still uploads it):
        # the frozen components go to a private folder, removed with this object.
        work = Path(tempfile.mkdtemp(prefix="durian-model-"))
        self._work = weakref.finalize(self, shutil.rmtree, work, True)
        folder = completed_view(Path(context.artifacts["model"]), fetch_artifacts, work)
        self.pipe = load_durian_pipeline(folder)
        self.pipe.set_progress_bar_config(disable=True)
        # A model that reads a face embedding gets the portrait's, computed as in training.
        kind = identity_embedder_of(self.pipe.model.config)
        self.identity = make_embedder(kind) if kind else None

    # No type hints here: MLflow would read them as an input schema for list-wise inputs.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        import torch

        from durian.inference.prepare import portrait_identity

        rows = model_input.to_dict(orient="records")
        out = []
        for row in rows:
            generator = torch.Generator().manual_seed(int(row.get("seed", 0) or 0))
            portrait = decode_png(row["portrait"])
            identity = None
            if self.identity is not None:
                identity = torch.from_numpy(portrait_identity(self.identity, portrait, "portrait"))
            frames = self.pipe(
                portrait,
                decode_png(row["portrait_mask"]) > 0,
                decode_png(row["attribute"]),
                decode_png(row["attribute_mask"]) > 0,
                np.stack([decode_png(k) for k in json.loads(row["keypoints"])]),
                num_inference_steps=int(row.get("steps", 10) or 10),
                guidance_scale=float(row.get("guidance", 1.0) or 1.0),
                generator=generator,
                window=None,
                identity_embedding=identity,
            ).frames
            out.append([encode_png(f) for f in frames])
        return out


mlflow.models.set_model(DurianPyfunc())
