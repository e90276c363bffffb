"""Where the model is: the one answer for animate, app, evaluate, the pyfunc and fine-tuning.

``resolve_model(ref)`` takes a local folder or a registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``) and returns the local folder that
:meth:`durian.pipelines.pipeline_durian.DurianPipeline.from_pretrained` loads: a pipeline folder
(``model_index.json``) or a bare ``DurianModel`` folder saved before pipeline folders. A
registered version is the MLflow pyfunc of ``flows/register.py``; MLflow resolves the alias and
downloads the version, and the pyfunc's ``model`` artifact is the folder. Registered versions
never change, so each is downloaded once, into ``<project>/.durian/models/NAME/vVERSION`` (or the
``cache`` given), and a new alias target is a new folder. A version's frozen components (VAE,
image encoder) are stored once in MLflow (``flows/component_store.py``): downloaded once into
``<project>/.durian/components/<sha256>/`` and linked from every version folder that uses them.
"""

from __future__ import annotations

import os
from pathlib import Path

REGISTRY_SCHEME = "models:/"


class ModelNotFoundError(LookupError):
    """A model reference names nothing loadable in the registry or on disk (one-line message)."""


class NotRegisteredError(ModelNotFoundError):
    """The registry has no such name, alias or version (or no store at all)."""


def not_found(
    ref: str, why: str, kind: type[ModelNotFoundError] = ModelNotFoundError
) -> ModelNotFoundError:
    return kind(f"model cannot be found in the registry or on disk: {ref} ({why})")


def _loadable(folder: Path) -> Path | None:
    """The loadable folder in ``folder``: itself (a pipeline or bare model folder) or, in a
    downloaded MLflow pyfunc, its ``model`` artifact; None if neither."""
    if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return folder
    if (folder / "MLmodel").is_file():
        from mlflow.models import Model

        flavor = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {})
        artifact = (flavor.get("artifacts") or {}).get("model") or {}
        if artifact.get("path"):
            return _loadable(folder / artifact["path"])
    return None


def _registry_version(ref: str) -> tuple[str, str]:
    """(name, version) of a ``models:/`` URI, the alias resolved by MLflow."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from flows.env import tracking_uri
    from flows.mlflow_adapter import client

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        # Opening a missing sqlite store would create an empty one in the user's folder.
        raise not_found(ref, f"no MLflow store at {uri[len('sqlite:///') :]}", NotRegisteredError)
    try:
        resolved = get_model_name_and_version(client(), ref)
    except MlflowException as err:
        first = str(err.message).strip().splitlines()[0] if str(err.message) else "not found"
        raise not_found(ref, first, NotRegisteredError) from None
    if len(resolved) != 2:
        raise not_found(ref, "not a registered model version (models:/NAME@ALIAS or /VERSION)")
    return resolved[0], str(resolved[1])


def _download(name: str, version: str, target: Path) -> None:
    """MLflow's download of one registered version into ``target``, whole or not at all."""
    import mlflow

    from durian.pipelines.components import fetch_whole

    def download(tmp: Path) -> Path:
        mlflow.artifacts.download_artifacts(f"{REGISTRY_SCHEME}{name}/{version}", dst_path=str(tmp))
        return tmp

    fetch_whole(target, download)


def resolve_model(ref: str | os.PathLike, cache: Path | None = None) -> Path:
    """The local, loadable folder of the model ``ref`` names (see the module docstring).

    ``cache``: where a registry version ``N`` is kept (``cache/vN``); default
    ``<project>/.durian/models/NAME``. Raises :class:`ModelNotFoundError` naming ``ref``."""
    text = str(ref)
    if not text.startswith(REGISTRY_SCHEME):
        path = Path(text).expanduser()
        if not path.exists():
            raise not_found(text, "no such folder")
        folder = _loadable(path) if path.is_dir() else None
        if folder is None:
            raise not_found(text, "not a Durian model folder: no model_index.json or config.json")
        return folder

    from mlflow.exceptions import MlflowException

    from durian.pipelines.components import complete_pipeline_folder
    from flows.env import project_dir
    from flows.pyfunc_model import fetch_artifacts

    name, version = _registry_version(text)
    target = (cache or project_dir() / ".durian" / "models" / name) / f"v{version}"
    if not target.is_dir():
        try:
            _download(name, version, target)
        except MlflowException as err:
            raise not_found(text, str(err.message).strip().splitlines()[0]) from None
    folder = _loadable(target)
    if folder is None:
        raise not_found(text, f"{name} v{version} has no 'model' artifact")
    try:  # frozen components are stored once: shared by every version that uses them
        return complete_pipeline_folder(
            folder, fetch_artifacts, project_dir() / ".durian" / "components"
        )
    except MlflowException as err:
        raise not_found(text, str(err.message).strip().splitlines()[0]) from None


def finetune_start(model_name: str, cache: Path) -> Path | None:
    """``train.retrain: finetune``: the folder of the registered @champion (kept in
    ``cache/vN``), or None while there is no champion (the run trains from scratch)."""
    try:
        return resolve_model(f"{REGISTRY_SCHEME}{model_name}@champion", cache)
    except NotRegisteredError:
        return None
