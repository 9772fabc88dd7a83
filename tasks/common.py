"""What every stage task shares: the run context, output keying and the child MLflow run."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from pydantic import BaseModel

from compactlm import progress
from compactlm.artifacts import WriteError, is_complete, output_lock, read_manifest, stage_key
from compactlm.evaluation.report import RecoveryError
from compactlm.tracking import Tracker, TrackingUnavailableError
from tasks.capture import capture_output

#: Whether a stage's output (engine internals, progress bars) is also shown live, besides its log file. The CLI's
#: console turns it off unless -v; elsewhere (workers, tests, notebooks) stages print as they always did.
SHOW_STAGE_OUTPUT = True


class RunContext(BaseModel):
    """Plain, hashable facts about one pipeline run, handed to every task (never live objects)."""

    workdir: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    seed: int = 0
    device: str = "cpu"
    flow_run_id: str | None = None

    def tracker(self) -> Tracker:
        return Tracker(self.tracking_uri, self.experiment)


def prefect_ids() -> dict[str, str]:
    tags = {}
    flow_ctx = FlowRunContext.get()
    if flow_ctx and flow_ctx.flow_run:
        tags["prefect.flow_run_id"] = str(flow_ctx.flow_run.id)
        tags["prefect.flow_run_name"] = str(flow_ctx.flow_run.name)
    task_ctx = TaskRunContext.get()
    if task_ctx and task_ctx.task_run:
        tags["prefect.task_run_id"] = str(task_ctx.task_run.id)
    return tags


LogFn = Callable[[Tracker, str, Path, dict[str, Any]], None]

#: Failures a retry cannot cure: bad input and broken files (ValueError: RecipeError, ModelRefError, DistillError,
#: ...), a failed quality gate, a non-finite loss, a full disk. Stage tasks are retried for anything else (an
#: engine crash, a lost connection).
PERMANENT = (ValueError, RecoveryError, FloatingPointError, WriteError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn`` of every stage task: retry only failures a second attempt may cure."""
    return not isinstance(state.data, PERMANENT)


def _child_run(tracker: Tracker, ctx: RunContext, stage: str, key: str) -> str:
    """The stage's child MLflow run: a new one, or on a Prefect retry of the same task run, the first attempt's
    (reopened), so a retried stage still has one run under the parent."""
    tags = {"compactlm.stage": stage, "compactlm.key": key, **prefect_ids()}
    task_run = tags.get("prefect.task_run_id")
    if task_run:
        earlier = tracker.find_run({"mlflow.parentRunId": ctx.parent_run_id, "compactlm.stage": stage,
                                    "prefect.task_run_id": task_run})
        if earlier is not None:
            tracker.reopen(earlier)
            return earlier
    return tracker.start_run(stage, parent_id=ctx.parent_run_id, tags=tags)


def stage_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow or task run, else the ``compactlm.stage`` logger (a task's
    ``.fn`` called from plain Python, as the fault tests do)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("compactlm.stage")


def stage_key_material(config: Any, seed: int, extra_key: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a stage's output is keyed by (with the upstream artifacts): the config less its ``NOT_IN_KEY``
    fields (settings that change how a run is observed, e.g. ``distill.log_every``), the seed, `extra_key`."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json", exclude=set(getattr(config, "NOT_IN_KEY", ())))
    return {"config": config, "seed": seed, **(extra_key or {})}


def run_stage(ctx: RunContext, stage: str, config: Any, upstream: list[str],
              produce: Callable[[Path, Callable[[dict, int], None]], dict], log: LogFn | None = None,
              extra_key: dict[str, Any] | None = None, label: str | None = None) -> str:
    """Run one stage under a child MLflow run and return its output directory.

    The output lives at ``<workdir>/<stage>/<key>``, keyed by :func:`stage_key_material` (the stage config,
    the seed), the upstream artifacts and the code version. If that directory is complete, the stage is a cache
    hit: nothing is recomputed, but the child run is still logged (tagged ``compactlm.cache_hit``), so every
    pipeline run has its full run tree; `log` then gets the manifest with ``"cache_hit": True`` and may skip
    re-uploading large artifacts.

    MLflow going away: an unreachable store fails the stage before any compute (opening the tracker and the
    child run). If it goes away *during* the compute, per-step metrics stop being logged (one warning) and
    the compute finishes and publishes its output; logging the finished stage then raises
    :class:`TrackingUnavailableError` naming the tracking URI and the complete output, which a rerun reuses.

    `label` names this run of the stage where one pipeline runs it more than once (``distill-2``): its child run,
    log file and console lines; the output still lives under ``<workdir>/<stage>``.
    """
    logger = stage_logger()
    key_material = stage_key_material(config, ctx.seed, extra_key)
    key = stage_key(stage, key_material, upstream)
    out = Path(ctx.workdir) / stage / key
    name = label or stage
    log_file = stage_log_path(ctx, name)
    tracker = ctx.tracker()
    run_id = _child_run(tracker, ctx, name, key)
    t0, cached = time.time(), False
    try:
        tracker.log_params(run_id, {**key_material, "config": config.model_dump(mode="json")}
                           if hasattr(config, "model_dump") else key_material)
        for i, u in enumerate(upstream):
            tracker.log_params(run_id, {f"input_{i}": u})
        with output_lock(out):  # another run computing the same output: wait for it, then reuse it
            cached = is_complete(out)
            progress.announce(name, "start", output=str(out), cached=cached)
            if cached:
                logger.info("%s: cache hit, reusing %s", name, out)
                summary = {**read_manifest(out), "cache_hit": True}
            else:
                logger.info("%s: computing into %s (log: %s)", name, out, log_file)
                with capture_output(log_file, tee=SHOW_STAGE_OUTPUT):
                    summary = produce(out, _step_logger(tracker, run_id, name, logger))
        try:
            tracker.set_tags(run_id, {"compactlm.cache_hit": str(cached).lower(), "compactlm.output": out})
            if log is not None:
                tracker.call(lambda: log(tracker, run_id, out, summary))
            _log_stage_log(tracker, run_id, log_file)
            tracker.log_metrics(run_id, {"stage_seconds": time.time() - t0})
            tracker.end_run(run_id)
        except TrackingUnavailableError as e:
            raise TrackingUnavailableError(f"{name}: the output {out} is complete and a rerun reuses it, but "
                                           f"logging the stage failed: {e}") from e
    except BaseException as e:
        progress.announce(name, "end", ok=False, seconds=time.time() - t0, cached=cached, log=str(log_file),
                          error=f"{type(e).__name__}: {e}")
        _log_stage_log(tracker, run_id, log_file, quiet=True)
        tracker.end_run(run_id, "FAILED")
        raise
    progress.announce(name, "end", ok=True, seconds=time.time() - t0, cached=cached, output=str(out),
                      log=str(log_file), summary=_brief(summary))
    return str(out)


def stage_log_path(ctx: RunContext, stage: str) -> Path:
    """Where a stage's output goes: ``<workdir>/logs/<parent MLflow run>/<stage>.log``."""
    return Path(ctx.workdir) / "logs" / ctx.parent_run_id / f"{stage}.log"


def _step_logger(tracker: Tracker, run_id: str, stage: str, logger) -> Callable[[dict, int], None]:
    """Per-step metrics to the child run; when MLflow goes away, one warning and the compute goes on."""
    def log_step(metrics: dict, step: int) -> None:
        if tracker.unavailable is not None:
            return  # already reported
        try:
            tracker.log_metrics(run_id, metrics, step=step)
        except TrackingUnavailableError as e:
            logger.warning("%s: step metrics are no longer logged, the stage goes on: %s", stage, e)

    return log_step


def _log_stage_log(tracker: Tracker, run_id: str, log_file: Path, quiet: bool = False) -> None:
    """The stage's log file as the child run's artifact ``logs/<stage>.log`` (best effort when `quiet`)."""
    if not log_file.is_file():
        return
    try:
        tracker.call(lambda: tracker.log_artifact(run_id, log_file, "logs"))
    except Exception:  # noqa: BLE001
        if not quiet:
            raise


def _brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The few figures of a stage summary a console line shows: rows, tok/s, loss, parameters."""
    stats = {**summary, **(summary.get("stats") or {}), **(summary.get("metrics") or {})}
    pick = {"rows": stats.get("completions"), "loss": stats.get("loss"),
            "tok_s": stats.get("completion_tokens_per_s") or stats.get("tokens_per_s"),
            "params": stats.get("params_after")}
    return {k: v for k, v in pick.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_dataset_input(tracker: Tracker, run_id: str, frame, source: Path, name: str,
                      context: str = "training") -> None:
    """`frame` (a pandas DataFrame) as an MLflow dataset input of the run (``mlflow.data.from_pandas``); an empty
    frame is skipped (MLflow cannot infer a schema from it; the manifest still says 0 rows)."""
    import warnings

    import mlflow
    from mlflow.entities import DatasetInput, InputTag

    if not len(frame):
        return
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways", int-column schema hint
        warnings.simplefilter("ignore", UserWarning)
        ds = mlflow.data.from_pandas(frame, source=str(Path(source).resolve()), name=name)
    inputs = [DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    try:
        tracker.call(lambda: tracker.client.log_inputs(run_id, inputs))
    except mlflow.exceptions.MlflowException as e:
        # Two runs logging the same dataset at once race in MLflow's get-or-create (UNIQUE constraint on the
        # datasets table); by now the other run created it, so a second attempt links to it.
        if "UNIQUE constraint" not in str(e):
            raise
        tracker.call(lambda: tracker.client.log_inputs(run_id, inputs))
