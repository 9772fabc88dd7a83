"""MLflow tracking helpers: where runs go, and a thread-safe way to log to an explicit run.

The fluent MLflow API keeps the active run per thread, and Prefect runs tasks in worker threads, so compactlm
always logs through :class:`Tracker` with explicit run ids. One *parent* run per pipeline run, one *child*
run per stage (``mlflow.parentRunId`` tag), so the MLflow UI shows the tree and its compare view lines up the
stage metrics of different pipeline runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Bounds on MLflow's HTTP retries, applied when the user has not set them. MLflow's own defaults (7 retries,
#: backoff factor 2, 120 s timeout) make one call to a stopped server take about 4 minutes before it fails.
#: With these a refused connection fails in about 7-10 s and a hung server in at most ~1 min per call.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store could not be reached (server down, hung or refusing connections).

    The message names the tracking URI, the cause and how to fix it. Stage outputs that were already
    published stay valid: a rerun after the store is back reuses them (cache hits).
    """


#: tracking URI -> when a call to it last failed as unreachable (this process): best-effort calls skip it
_DOWN_SINCE: dict[str, float] = {}
_DOWN_MEMORY_S = 120.0
#: The experiment tag that makes the MLflow UI (3.x) open an experiment on its runs, not on the GenAI
#: "Overview" of traces; set when compactlm creates the experiment, or finds one without a kind.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def bound_http_retries() -> dict[str, str]:
    """Set :data:`HTTP_BOUNDS` in ``os.environ`` where the user has not set them; returns what is in effect."""
    for k, v in HTTP_BOUNDS.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in HTTP_BOUNDS}


def _is_unreachable(exc: BaseException) -> bool:
    """True for failures to reach an MLflow server (refused, reset, timed out, retries of 5xx exhausted),
    False for errors the server itself reported (bad parameter, missing run, ...)."""
    import requests

    seen: BaseException | None = exc
    for _ in range(8):  # MLflow wraps the requests error without `from`, so walk cause and context
        if seen is None:
            return False
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                             requests.exceptions.RetryError, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-./: ]")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")
#: Keys whose values are secrets, compared whole (case and '-' folded): a recipe's max_tokens is not one.
SECRET_KEYS = frozenset({
    "token", "hf_token", "huggingface_token", "hugging_face_hub_token", "access_token", "auth_token", "api_token",
    "bearer_token", "refresh_token", "session_token", "aws_session_token", "github_token", "gh_token",
    "mlflow_tracking_token", "password", "passwd", "pwd", "mlflow_tracking_password", "secret", "client_secret",
    "secret_key", "aws_secret_access_key", "api_key", "apikey", "openai_api_key", "wandb_api_key", "private_key",
    "credential", "credentials",
})
#: Values that are secrets wherever they appear (inside any string): known token formats.
_SECRET_VALUES = re.compile(
    r"\bhf_[A-Za-z0-9]{16,}|\bsk-[A-Za-z0-9_-]{16,}|\bAKIA[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{20,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}|(?i:bearer\s+[A-Za-z0-9._~+/-]{8,}=*)"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----")


def is_secret_key(key: Any) -> bool:
    return str(key).lower().replace("-", "_") in SECRET_KEYS


def redact(obj: Any) -> Any:
    """Copy of `obj` safe to log: values under a secret key (:data:`SECRET_KEYS`, whole names), secret-looking
    values (Hugging Face, OpenAI, AWS, GitHub, Slack tokens, bearer tokens, private keys) and credentials in URLs
    become ``***``. Everything else is logged as is. Applied to everything compactlm logs."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        obj = _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", obj)
        return _SECRET_VALUES.sub("***", obj)
    return obj


def default_tracking_uri(workdir: str | os.PathLike, configured: str | None = None) -> str:
    """`configured`, else $MLFLOW_TRACKING_URI, else a SQLite file in the workdir (absolute path)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(workdir).resolve() / 'mlflow.db')}"


def metric_name(name: str) -> str:
    """MLflow-safe metric/param name: lm-eval's ``acc,none`` becomes ``acc``; other odd characters ``_``."""
    return _BAD_CHARS.sub("_", name.replace(",none", ""))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Logs to explicit MLflow runs of one experiment; tasks rebuild it from (tracking_uri, experiment)."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_root: str | None = None):
        from mlflow.tracking import MlflowClient

        from compactlm.artifacts import output_lock

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.unavailable: TrackingUnavailableError | None = None  # set once a call could not reach the store
        if tracking_uri.startswith(("http://", "https://")):
            bound_http_retries()
        # Opening a SQLite store the first time creates its schema (alembic migrations); two processes doing
        # it at once corrupt the version table. Serialise store creation across processes.
        sqlite = tracking_uri.startswith("sqlite:///")
        with output_lock(tracking_uri.removeprefix("sqlite:///")) if sqlite else contextlib.nullcontext():
            self.client = MlflowClient(tracking_uri=tracking_uri)
            # forces the store (and its schema) into existence; fails here, before any compute, when a
            # tracking server is down
            self.call(lambda: self.client.search_experiments(max_results=1))
            # No mlflow.set_tracking_uri(): it also exports MLFLOW_TRACKING_URI, so in a long-lived process (a
            # worker, a test session) the next pipeline's default_tracking_uri() would log into this store.
            self.experiment_id = self.call(lambda: self._experiment_id(artifact_root))

    def call(self, fn: Callable[[], T]) -> T:
        """Run MLflow client call(s) in `fn`; an unreachable store becomes :class:`TrackingUnavailableError`
        (for code that uses ``self.client`` directly)."""
        try:
            return fn()
        except TrackingUnavailableError:
            raise
        except Exception as e:
            if not _is_unreachable(e):
                raise
            cause = redact(" ".join(str(e).split()))
            if len(cause) > 400:
                cause = cause[:400] + " ..."
            bounds = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in HTTP_BOUNDS)
            err = TrackingUnavailableError(
                f"MLflow tracking store {redact(self.tracking_uri)} is unreachable ({cause}). Start it again "
                "(`make serve`, or `mlflow server --host 127.0.0.1 --port ...`) or point MLFLOW_TRACKING_URI / "
                "tracking.tracking_uri at a reachable store, then rerun: stage outputs already published are "
                f"reused. HTTP retries: {bounds}.")
            self.unavailable = err
            _DOWN_SINCE[self.tracking_uri] = time.monotonic()
            raise err from e

    def _experiment_id(self, artifact_root: str | None) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if EXPERIMENT_KIND[0] not in exp.tags:  # an experiment made before compactlm marked them
                self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        if artifact_root is None and self.tracking_uri.startswith("sqlite:///"):
            # Keep artifacts beside the SQLite file, not in whatever the current directory is.
            artifact_root = str(Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
        location = None
        if artifact_root:
            location = Path(artifact_root).resolve().as_uri() if "://" not in artifact_root else artifact_root
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location,
                                                 tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created concurrently by another run
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def start_run(self, name: str, *, parent_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.call(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags))
        return run.info.run_id

    def find_run(self, tags: dict[str, str]) -> str | None:
        """The newest run of this experiment carrying all `tags` (exact values), or None."""
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.call(lambda: self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1,
                                                         order_by=["attributes.start_time DESC"]))
        return runs[0].info.run_id if runs else None

    def reopen(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a retried stage continues its first attempt's run)."""
        self.call(lambda: self.client.update_run(run_id, status="RUNNING"))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark `run_id` ended. Marking a run FAILED/KILLED is best effort: it happens while another error
        propagates, so an unreachable store is only logged (and not even retried once this tracker found it
        down, nor when another tracker of this process found the same URI down in the last 2 minutes) rather
        than raised over the error that matters."""
        if status == "FINISHED":
            self.call(lambda: self.client.set_terminated(run_id, status=status))
            return
        down_at = _DOWN_SINCE.get(self.tracking_uri)
        if self.unavailable is not None or (down_at is not None and time.monotonic() - down_at < _DOWN_MEMORY_S):
            log.warning("MLflow run %s left RUNNING: %s is unreachable", run_id, redact(self.tracking_uri))
            return
        try:
            self.call(lambda: self.client.set_terminated(run_id, status=status))
        except TrackingUnavailableError as e:
            log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in redact(tags).items():
            self.call(lambda k=k, v=v: self.client.set_tag(run_id, k, str(v)))

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(redact(params))
        items = [Param(metric_name(k), json.dumps(v) if isinstance(v, (list, dict)) else str(v)[:6000])
                 for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.call(lambda i=i: self.client.log_batch(run_id, params=items[i:i + 100]))

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), ts, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        for i in range(0, len(items), 500):
            self.call(lambda i=i: self.client.log_batch(run_id, metrics=items[i:i + 500]))

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.call(lambda: self.client.log_artifacts(run_id, str(path), artifact_path))
        else:
            self.call(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.call(lambda: self.client.log_text(run_id, text, artifact_file))

    def log_dict(self, run_id: str, obj: dict, artifact_file: str) -> None:
        self.call(lambda: self.client.log_dict(run_id, redact(obj), artifact_file))

    def run_url(self, run_id: str) -> str:
        """Link for http tracking servers; for local stores, the command that opens the UI."""
        if self.tracking_uri.startswith("http"):
            return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"
        return (f"mlflow ui --backend-store-uri {shlex.quote(redact(self.tracking_uri))}  "
                f"(experiment {self.experiment!r}, run {run_id})")
