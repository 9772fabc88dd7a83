"""Evaluation stage: the same lm-eval tasks and perplexity for every model, side by side.

Each model's results are cached on their own (``<workdir>/eval-model/<key>``), so a new student is
evaluated while the teacher's results are reused. ``eval.min_recovery`` is a gate, not a measurement: it is
left out of the per-model key, so changing it never re-evaluates a model.

Quality gate: when the student keeps less than ``eval.min_recovery`` of the teacher, the task raises
:class:`compactlm.evaluation.RecoveryError` (message = reason + comparison table) *after* everything is
recorded: results.json / comparison.md are published, the child MLflow run holds all metrics plus
``student_recovery`` and ends **FINISHED** with tag ``compactlm.quality_gate=failed`` (the evaluation itself
succeeded; the verdict is the tag), and both Prefect artifacts exist. The task is not retried for a gate
failure or bad input; the flow run then fails (its parent MLflow run ends FAILED).
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from compactlm import progress
from compactlm.artifacts import is_complete, publish_dir, stage_key
from compactlm.config import EvalConfig
from compactlm.evaluation.report import RecoveryError
from compactlm.tracking import Tracker
from tasks.common import RunContext, retry_transient, run_stage

REFERENCE, CANDIDATE = "teacher", "student"  # the gate's labels (as the compress flow names its models)


def _model_key_config(cfg: EvalConfig) -> dict:
    """What a single model's scores depend on: the config minus the gate threshold, how the choices are batched
    (``shared_prefix`` gives the same scores) and over how many GPUs."""
    return cfg.model_dump(mode="json", exclude={"min_recovery", "shared_prefix", "tensor_parallel_size"})


def _task_inputs(cfg: EvalConfig) -> list[str]:
    """The user's task files (jsonl tasks, include-path YAMLs and their data): editing one re-evaluates."""
    from compactlm.evaluation.registry import task_inputs

    return task_inputs(cfg)


def _evaluate_cached(ctx: RunContext, model_dir: str, cfg: EvalConfig) -> dict:
    from compactlm.evaluation import evaluate_model

    out = Path(ctx.workdir) / "eval-model" / stage_key("eval-model", {"config": _model_key_config(cfg),
                                                                      "seed": ctx.seed},
                                                       [model_dir, *_task_inputs(cfg)])
    if not is_complete(out):
        result = evaluate_model(model_dir, cfg, device=ctx.device, seed=ctx.seed)
        with publish_dir(out, {"model_dir": model_dir}) as tmp:
            (tmp / "results.json").write_text(json.dumps(result, indent=2, default=str))
    else:
        get_run_logger().info("evaluate: cache hit for %s", model_dir)
    return json.loads((out / "results.json").read_text())


def _speeds(ctx: RunContext, models: dict[str, str], cfg: EvalConfig) -> dict[str, dict]:
    from compactlm.evaluation.runner import eval_dtype
    from compactlm.evaluation.speed import compare_speeds
    from compactlm.models import pick_device

    device = pick_device(ctx.device)
    return compare_speeds(models, device=device, dtype=eval_dtype(cfg, device))


def _gate(results: dict, cfg: EvalConfig) -> tuple[str, float | None]:
    """("off" | "passed" | "failed", the student's kept fraction or None)."""
    from compactlm.evaluation import check_recovery, kept_fraction

    kept = (kept_fraction(results[CANDIDATE], results[REFERENCE])
            if CANDIDATE in results and REFERENCE in results else None)
    if cfg.min_recovery is None:
        return "off", kept
    try:
        check_recovery(results, cfg.min_recovery, reference=REFERENCE, candidate=CANDIDATE)
    except RecoveryError:
        return "failed", kept
    return "passed", kept


def _logger(cfg: EvalConfig):
    def log(tracker: Tracker, run_id: str, out: Path, summary: dict) -> None:
        from compactlm.evaluation import flat_metrics

        results = json.loads((out / "results.json").read_text())
        for label, result in results.items():
            tracker.log_metrics(run_id, {f"{label}/{k}": v for k, v in flat_metrics(result).items()})
        verdict, kept = _gate(results, cfg)
        if kept is not None:
            tracker.log_metrics(run_id, {f"{CANDIDATE}_recovery": kept})
        tracker.set_tags(run_id, {"compactlm.quality_gate": verdict})
        tracker.log_artifact(run_id, out / "results.json")
        tracker.log_artifact(run_id, out / "comparison.md")

    return log


@task(name="evaluate", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def evaluate(ctx: RunContext, models: dict[str, str], cfg: EvalConfig) -> str:
    """Evaluate each labelled model dir (e.g. teacher / pruned / student); return the output dir holding
    results.json ({label: result}) and comparison.md. Creates a markdown and a table Prefect artifact, then
    applies the ``cfg.min_recovery`` gate (raises RecoveryError; see the module docstring)."""
    from compactlm.evaluation import check_recovery, compare_rows, compare_table

    if cfg.min_recovery is not None and not {REFERENCE, CANDIDATE} <= set(models):
        raise ValueError(f"eval.min_recovery needs models labelled {REFERENCE!r} and {CANDIDATE!r}; got "
                         f"{list(models)} (unset eval.min_recovery to evaluate without the gate)")

    def produce(out: Path, log_step) -> dict:
        results = {}
        for i, (label, d) in enumerate(models.items()):
            progress.report("evaluate", i, len(models), model=label)
            results[label] = _evaluate_cached(ctx, d, cfg.model_copy(update={"speed": False}))
        progress.report("evaluate", len(models), len(models))
        if cfg.speed:  # timed side by side, interleaved, after the scoring: one figure per model that compares
            for label, speed in _speeds(ctx, models, cfg).items():
                results[label]["speed"] = speed
        table = compare_table(results, reference=next(iter(models)))
        with publish_dir(out, {"models": models}) as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
            (tmp / "comparison.md").write_text(table + "\n")
        return {"models": models}

    out = run_stage(ctx, "evaluate", cfg, list(models.values()) + _task_inputs(cfg), produce, _logger(cfg),
                    extra_key={"labels": list(models)})
    table = (Path(out) / "comparison.md").read_text()
    create_markdown_artifact(table, key="compactlm-comparison", description="teacher vs pruned vs student")
    results = json.loads((Path(out) / "results.json").read_text())
    header, rows = compare_rows(results, reference=next(iter(models)))
    create_table_artifact([dict(zip(header, row)) for row in rows], key="compactlm-comparison-table",
                          description="teacher vs pruned vs student (same figures as compactlm-comparison)")
    check_recovery(results, cfg.min_recovery, reference=REFERENCE, candidate=CANDIDATE)
    return out
