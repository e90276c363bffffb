"""The registered model: an MLflow pyfunc wrapping :class:`DurianPipeline` (models-from-code).

Logged by ``flows/register.py`` with the pipeline folder (safetensors + configs + the
scheduler, never pickled modules) as the ``model`` artifact and the ``durian`` package as code.
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


class DurianPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from durian.pipelines.pipeline_durian import load_durian_pipeline

        # MLflow has already resolved the version to a local artifact folder, and only the
        # ``durian`` package travels with the version: no flows.model_store here. The GPU in
        # half precision when there is one (the loader durian animate uses).
        self.pipe = load_durian_pipeline(context.artifacts["model"])
        self.pipe.set_progress_bar_config(disable=True)

    # No type hints here: MLflow would read them as an input schema for list-wise inputs.
    def predict(self, context, model_input, params=None):  # noqa: ANN001
        import torch

        rows = model_input.to_dict(orient="records")
        out = []
        for row in rows:
            generator = torch.Generator().manual_seed(int(row.get("seed", 0) or 0))
            frames = self.pipe(
                decode_png(row["portrait"]),
                decode_png(row["portrait_mask"]) > 0,
                decode_png(row["attribute"]),
                decode_png(row["attribute_mask"]) > 0,
                np.stack([decode_png(k) for k in json.loads(row["keypoints"])]),
                num_inference_steps=int(row.get("steps", 10) or 10),
                guidance_scale=float(row.get("guidance", 1.0) or 1.0),
                generator=generator,
                window=None,
            ).frames
            out.append([encode_png(f) for f in frames])
        return out


mlflow.models.set_model(DurianPyfunc())
