"""MLflow model registry for the export stage: the student and each of its exports as a logged model (files,
parameters, metrics, the recipe and pruning record attached) and a registered model version pointing at it, so
"which student do we ship" is answered on the registry's page: every version carries its format, size, speed and
quality, and links back to the run that made it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from compactlm.tracking import Tracker, redact


def _stage(files: Path, tmp: Path) -> Path:
    """A directory holding `files` (itself when a directory; a hard link, else a copy, of a single file)."""
    if files.is_dir():
        return files
    target = tmp / files.name
    try:
        os.link(files, target)
    except OSError:
        shutil.copy2(files, target)
    return tmp


def _ensure_registered_model(tracker: Tracker, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tracker.call(lambda: tracker.client.create_registered_model(name, description=description))
    except MlflowException as e:
        if "already exists" not in str(e).lower() and getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise


def log_logged_model(tracker: Tracker, run_id: str, name: str, files: Path | None, *, metrics: dict[str, float],
                     params: dict[str, Any], attachments: dict[str, Any], tags: dict[str, str],
                     model_type: str) -> str:
    """A logged model of the experiment (source run `run_id`; `files` uploaded unless None, `attachments` written
    beside them as JSON files, `metrics` and `params` on the model), READY; returns its model id. The MLflow UI
    lists it under the run's "Logged models" and the experiment's Models tab."""
    flat = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v) for k, v in redact(params).items()}
    model = tracker.call(lambda: tracker.client.create_logged_model(
        tracker.experiment_id, name=name, source_run_id=run_id, tags=tags, params=flat, model_type=model_type))
    model_id = model.model_id
    with tempfile.TemporaryDirectory(prefix="compactlm-register-") as tmp:
        side = Path(tmp) / "side"
        side.mkdir()
        for fname, obj in attachments.items():
            (side / fname).write_text(json.dumps(redact(obj), indent=2, default=str))
        tracker.call(lambda: tracker.client.log_model_artifacts(model_id, str(side)))
        if files is not None:
            staged = _stage(Path(files), _mkdir(Path(tmp) / "files"))
            tracker.call(lambda: tracker.client.log_model_artifacts(model_id, str(staged)))
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            tracker.call(lambda k=key, v=value: tracker.client.log_metric(run_id, k, float(v), model_id=model_id))
    tracker.call(lambda: tracker.client.finalize_logged_model(model_id, "READY"))
    from mlflow.entities import LoggedModelOutput

    # the run's output: what makes the run page list it under "Logged models"
    tracker.call(lambda: tracker.client.log_outputs(run_id, [LoggedModelOutput(model_id, 0)]))
    return model_id


def register(tracker: Tracker, run_id: str, name: str, files: Path | None, *, metrics: dict[str, float],
             params: dict[str, Any], attachments: dict[str, Any], tags: dict[str, str],
             model_type: str) -> dict[str, Any]:
    """:func:`log_logged_model` and a new version of registered model `name` pointing at it. Returns
    ``{"name", "version", "model_id"}``."""
    model_id = log_logged_model(tracker, run_id, name, files, metrics=metrics, params=params,
                                attachments=attachments, tags=tags, model_type=model_type)
    _ensure_registered_model(tracker, name, f"compactlm export: {model_type}")
    # the logged model's artifact location, not models:/<id>: the SQL registry resolves that through the global
    # tracking URI (an MLflow TODO), which compactlm never sets
    location = tracker.call(lambda: tracker.client.get_logged_model(model_id)).artifact_location
    version = tracker.call(lambda: tracker.client.create_model_version(
        name, source=location, run_id=run_id, tags={**tags, "compactlm.model_id": model_id}, model_id=model_id,
        await_creation_for=0))
    # the SQL registry keeps no model id on the version: the tags link both ways
    tracker.call(lambda: tracker.client.set_logged_model_tags(
        model_id, {"compactlm.registered_version": f"{name}:{version.version}"}))
    return {"name": name, "version": int(version.version), "model_id": model_id}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
