"""One Prefect flow per stage: run (or re-run) a single stage on artifacts an earlier run produced.

    generate(teacher, config)                              -> data_dir
    score(teacher, data_dir, config)                       -> scores_dir
    prune(teacher, scores_dir, data_dir, config, runner)   -> pruned model dir
    distill(teacher, student_dir, data_dir, config)        -> distilled student dir
    evaluate(models={label: model ref or dir}, config)     -> eval dir (results.json, comparison.md)

Every flow also takes ``workdir``, ``seed``, ``device`` and ``tracking`` (the recipe's fields of the same
names), so its Prefect UI form shows the stage's pydantic config with every field's default, description and
bounds. Each flow calls the same ``tasks/`` task as ``compress``: the output lives at the same
``<workdir>/<stage>/<key>`` (keyed by config, seed, the upstream artifacts' manifests and the code version),
so a stage flow and a compress run with the same inputs share the result (the second one is a cache hit). Each
flow run logs one parent MLflow run (tag ``compactlm.flow`` = the stage, plus the Prefect flow-run id) with the
stage's usual child run under it, and returns the output path.

Upstream paths are checked before anything runs: a directory that is not a finished compactlm output (no
``manifest.json``) fails with a ValueError naming the parameter.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from compactlm.artifacts import is_complete
from compactlm.config import (DistillConfig, EvalConfig, GenerateConfig, PruneConfig, ScoreConfig,
                              TrackingConfig)
from compactlm.models import pick_device
from compactlm.tracking import Tracker, default_tracking_uri
from tasks.common import RunContext, prefect_ids
from tasks.distill import distill as distill_task
from tasks.evaluate import evaluate as evaluate_task
from tasks.generate import generate as generate_task
from tasks.models import resolve_teacher
from tasks.prune import check_runner
from tasks.prune import prune as prune_task
from tasks.score import score as score_task

Device = Literal["auto", "cpu", "cuda"]
Runner = Literal["thread", "process", "ray"]


def finished_output(path: str, param: str, producer: str) -> str:
    """`path` as the absolute path the producing task returned; ValueError unless it is a finished output."""
    if not path or not str(path).strip():
        raise ValueError(f"{param}: give the directory the {producer} stage returned")
    p = Path(path).expanduser().resolve()
    if not is_complete(p):
        raise ValueError(f"{param}: {path!r} is not a finished {producer} output (no manifest.json); run the "
                         f"{producer} flow (or compress) first and pass the path it returned")
    return str(p)


@contextmanager
def _stage_run(stage: str, workdir: str, seed: int, device: str, tracking: TrackingConfig,
               params: dict[str, Any]) -> Iterator[tuple[RunContext, Tracker]]:
    """The parent MLflow run of one stage flow run and the RunContext its task gets; the run ends FAILED
    when the body raises."""
    root = Path(workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(default_tracking_uri(root, tracking.tracking_uri), tracking.experiment)
    ids = prefect_ids()
    parent = tracker.start_run(stage, tags={"compactlm.flow": stage, **ids})
    try:
        tracker.log_params(parent, {"seed": seed, "device": device, **params})
        yield RunContext(workdir=str(root), tracking_uri=tracker.tracking_uri, experiment=tracker.experiment,
                         parent_run_id=parent, seed=seed, device=pick_device(device),
                         flow_run_id=ids.get("prefect.flow_run_id")), tracker
        tracker.end_run(parent)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise


@flow(name="generate", log_prints=True)
def generate(teacher: str, config: GenerateConfig = GenerateConfig(), workdir: str = "runs", seed: int = 0,
             device: Device = "auto", tracking: TrackingConfig = TrackingConfig()) -> str:
    """The teacher answers the prompts (vLLM in a child process); returns the generated dataset's dir.

    Args:
        teacher: Teacher model: local HF dir, .gguf file, hub id or alias (smollm2-135m-instruct).
        config: Generation settings (the recipe's `generate` section).
        workdir: Where stage outputs are written (keyed by their inputs); the compress run's workdir to share
            its outputs.
        seed: Seed for sampling, data order and training (part of the output key).
        device: Torch device; auto = cuda when available.
        tracking: MLflow tracking URI and experiment (the flow run's parent run goes there).
    """
    with _stage_run("generate", workdir, seed, device, tracking, {"teacher": teacher}) as (ctx, _):
        return generate_task(ctx, resolve_teacher(teacher), config)


@flow(name="score", log_prints=True)
def score(teacher: str, data_dir: str | None = None, config: ScoreConfig = ScoreConfig(), workdir: str = "runs",
          seed: int = 0, device: Device = "auto", tracking: TrackingConfig = TrackingConfig()) -> str:
    """Importance scores of the teacher on `data_dir`; returns the scores dir.

    Args:
        teacher: Teacher model: local HF dir, .gguf file, hub id or alias (smollm2-135m-instruct).
        data_dir: The generated dataset (a generate run's output dir); not needed when config.data is a file.
        config: Scoring settings (the recipe's `score` section).
        workdir: Where stage outputs are written (keyed by their inputs); the compress run's workdir to share
            its outputs.
        seed: Seed for sampling, data order and training (part of the output key).
        device: Torch device; auto = cuda when available.
        tracking: MLflow tracking URI and experiment (the flow run's parent run goes there).
    """
    if config.data == "generated":
        data_dir = finished_output(data_dir or "", "data_dir", "generate")
    else:
        data_dir = config.data  # the task then reads config.data, as in compress
    with _stage_run("score", workdir, seed, device, tracking, {"teacher": teacher}) as (ctx, _):
        return score_task(ctx, resolve_teacher(teacher), data_dir, config)


@flow(name="prune", log_prints=True)
def prune(teacher: str, scores_dir: str, data_dir: str | None = None, config: PruneConfig = PruneConfig(),
          runner: Runner = "thread", workdir: str = "runs", seed: int = 0, device: Device = "auto",
          tracking: TrackingConfig = TrackingConfig()) -> str:
    """Prune the teacher to ``config``'s shape, or with ``config.params`` to the best candidate shape
    measured on `data_dir` (one task per candidate on `runner`); returns the pruned model's dir.

    Args:
        teacher: Teacher model: local HF dir, .gguf file, hub id or alias (smollm2-135m-instruct).
        scores_dir: Importance scores of this teacher (a score run's output dir).
        data_dir: The generated dataset (a generate run's output dir); needed with config.params only.
        config: Target shape or parameter budget (the recipe's `prune` section).
        runner: Task runner for the candidate fan-out: thread, process or ray (same choice either way).
        workdir: Where stage outputs are written (keyed by their inputs); the compress run's workdir to share
            its outputs.
        seed: Seed for sampling, data order and training (part of the output key).
        device: Torch device; auto = cuda when available.
        tracking: MLflow tracking URI and experiment (the flow run's parent run goes there).
    """
    check_runner(runner)
    scores_dir = finished_output(scores_dir, "scores_dir", "score")
    if config.params is not None:
        data_dir = finished_output(data_dir or "", "data_dir", "generate")
    with _stage_run("prune", workdir, seed, device, tracking, {"teacher": teacher, "runner": runner}) as (ctx, _):
        teacher_dir = resolve_teacher(teacher)
        _check_target(teacher_dir, config)
        return prune_task(ctx, teacher_dir, scores_dir, data_dir or "", config, runner=runner)


@flow(name="distill", log_prints=True)
def distill(teacher: str, student_dir: str, data_dir: str, config: DistillConfig = DistillConfig(),
            workdir: str = "runs", seed: int = 0, device: Device = "auto",
            tracking: TrackingConfig = TrackingConfig()) -> str:
    """Distill the pruned student from the teacher; returns the distilled student's dir.

    Args:
        teacher: Teacher model: local HF dir, .gguf file, hub id or alias (smollm2-135m-instruct).
        student_dir: The pruned student (a prune run's output dir).
        data_dir: The generated dataset (a generate run's output dir).
        config: Distillation settings (the recipe's `distill` section).
        workdir: Where stage outputs are written (keyed by their inputs); the compress run's workdir to share
            its outputs.
        seed: Seed for sampling, data order and training (part of the output key).
        device: Torch device; auto = cuda when available.
        tracking: MLflow tracking URI and experiment (the flow run's parent run goes there).
    """
    student_dir = finished_output(student_dir, "student_dir", "prune")
    data_dir = finished_output(data_dir, "data_dir", "generate")
    with _stage_run("distill", workdir, seed, device, tracking, {"teacher": teacher}) as (ctx, _):
        return distill_task(ctx, resolve_teacher(teacher), student_dir, data_dir, config,
                            log_model=tracking.log_model)


@flow(name="evaluate", log_prints=True)
def evaluate(models: dict[str, str], config: EvalConfig = EvalConfig(), workdir: str = "runs", seed: int = 0,
             device: Device = "auto", tracking: TrackingConfig = TrackingConfig()) -> str:
    """Evaluate labelled models side by side; returns the eval dir (results.json, comparison.md).

    Args:
        models: Label -> model reference or dir, e.g. {"teacher": "smollm2-135m-instruct", "pruned": "<prune
            dir>", "student": "<distill dir>"}; the first is the table's reference; config.min_recovery needs
            "teacher" and "student".
        config: Benchmarks and perplexity settings (the recipe's `eval` section).
        workdir: Where stage outputs are written (keyed by their inputs); the compress run's workdir to share
            its outputs.
        seed: Seed for sampling, data order and training (part of the output key).
        device: Torch device; auto = cuda when available.
        tracking: MLflow tracking URI and experiment (the flow run's parent run goes there).
    """
    from compactlm.evaluation import check_tasks, flat_metrics

    if not models:
        raise ValueError("models: give at least one {label: model reference or directory}")
    check_tasks(config)
    with _stage_run("evaluate", workdir, seed, device, tracking, {f"model.{k}": v for k, v in models.items()}) \
            as (ctx, tracker):
        resolved = {label: resolve_teacher(ref) for label, ref in models.items()}
        eval_dir = evaluate_task(ctx, resolved, config)
        results = json.loads((Path(eval_dir) / "results.json").read_text())
        tracker.log_metrics(ctx.parent_run_id, {f"{label}/{k}": v for label, result in results.items()
                                                for k, v in flat_metrics(result).items()})
        return eval_dir


def _check_target(teacher_dir: str, config: PruneConfig) -> None:
    """The prune target fits this teacher (config.json only), as compress's preflight checks."""
    from transformers import AutoConfig

    from compactlm.pruning.prune import target_shape

    try:
        target_shape(AutoConfig.from_pretrained(teacher_dir, trust_remote_code=False), config)
    except ValueError as e:
        raise ValueError(f"config: {e}") from None


#: The stage flows by name (what prefect.yaml's entrypoints point at).
STAGE_FLOWS = {"generate": generate, "score": score, "prune": prune, "distill": distill, "evaluate": evaluate}
