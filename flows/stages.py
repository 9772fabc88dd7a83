"""One Prefect flow per stage: run (or re-run) a single stage on artifacts an earlier run produced.

    generate(teacher, config, settings)                    -> data_dir
    data(teacher, config, tokens, generated_dir, settings) -> a mixed data_dir (corpora, instructions, generated)
    score(teacher, data_dir, config, settings)             -> scores_dir
    prune(teacher, scores_dir, data_dir, config, settings) -> pruned model dir
    distill(teacher, student_dir, data_dir, config, settings) -> distilled student dir (any student model)
    evaluate(models={label: model ref or dir}, config, settings) -> eval dir (results.json, comparison.md)
    export(student_dir, teacher, config, eval_config, settings) -> export dir (results.json, rows.json, comparison.md)

``config`` is the stage's section of a recipe and ``settings`` the recipe's run settings (workdir, seed, device,
runner, tracking: :class:`compactlm.config.RunSettings`), so each flow's Prefect UI form shows the stage config and
one settings group, every field with its default, description and bounds. Each flow calls the same ``tasks/``
task as ``compress``: the output lives at the same ``<workdir>/<stage>/<key>`` (keyed by config, seed, the
upstream artifacts' manifests and the code version), so a stage flow and a compress run with the same inputs
share the result (the second one is a cache hit). Each flow run logs one parent MLflow run (tag
``compactlm.flow`` = the stage, plus the Prefect flow-run id) with the stage's usual child run under it, and
returns the output path.

Upstream paths are checked before anything runs: a directory that is not a finished compactlm output (no
``manifest.json``) fails with a ValueError naming the parameter. Once the models are resolved, the stage's memory
plan (:func:`compactlm.plan.plan_stage`) must fit this machine, as a compress run's must: a stage that does not
fails before computing, naming the field of ``config`` that makes it fit (COMPACTLM_SKIP_MEMORY_CHECK=1 runs it
anyway).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow

from compactlm.artifacts import is_complete
from compactlm.config import (
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    PruneConfig,
    RunSettings,
    ScoreConfig,
)
from compactlm.models import pick_device
from compactlm.preflight import check_prune_target, check_stage_memory
from compactlm.tracking import Tracker, default_tracking_uri
from tasks.common import RunContext, prefect_ids
from tasks.data import mix as mix_task
from tasks.distill import distill as distill_task
from tasks.evaluate import evaluate as evaluate_task
from tasks.export import export as export_task
from tasks.generate import generate as generate_task
from tasks.models import resolve_teacher
from tasks.prune import check_runner
from tasks.prune import prune as prune_task
from tasks.score import score as score_task


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
def _stage_run(stage: str, settings: RunSettings, params: dict[str, Any]) -> Iterator[tuple[RunContext, Tracker]]:
    """The parent MLflow run of one stage flow run and the RunContext its task gets; the run ends FAILED
    when the body raises."""
    root = Path(settings.workdir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(default_tracking_uri(root, settings.tracking.tracking_uri), settings.tracking.experiment)
    ids = prefect_ids()
    parent = tracker.start_run(stage, tags={"compactlm.flow": stage, **ids})
    try:
        tracker.log_params(parent, {"seed": settings.seed, "device": settings.device, "runner": settings.runner,
                                    **params})
        yield RunContext(workdir=str(root), tracking_uri=tracker.tracking_uri, experiment=tracker.experiment,
                         parent_run_id=parent, seed=settings.seed, device=pick_device(settings.device),
                         flow_run_id=ids.get("prefect.flow_run_id")), tracker
        tracker.end_run(parent)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise


@flow(name="generate", log_prints=True)
def generate(teacher: str, config: GenerateConfig = GenerateConfig(), settings: RunSettings = RunSettings()) -> str:
    """The teacher answers the prompts (vLLM in a child process); returns the generated dataset's dir.

    Args:
        teacher: The model to compress: a local Hugging Face folder, a .gguf file, a hub id or an alias.
        config: Generation settings (a recipe's generate section).
        settings: Workdir, seed, device, runner and MLflow tracking (a recipe's top-level settings).
    """
    with _stage_run("generate", settings, {"teacher": teacher}) as (ctx, _):
        teacher_dir = resolve_teacher(teacher)
        check_stage_memory("generate", config, settings.device, {"teacher": teacher_dir})
        return generate_task(ctx, teacher_dir, config)


@flow(name="data", log_prints=True)
def data(teacher: str, config: DataConfig = DataConfig(), tokens: int = 100_000, generated_dir: str | None = None,
         settings: RunSettings = RunSettings()) -> str:
    """Mix the training data (corpora, instruction data, the generated set) by tokens; returns its dir.

    Args:
        teacher: The model to compress (its tokenizer): a local Hugging Face folder, a .gguf file, a hub id or an
            alias.
        config: The sources and their weights (a recipe's data section).
        tokens: Tokens to draw in all (config.tokens wins when set).
        generated_dir: The generated dataset (what a generate run returned); needed when a source is the
            generated set.
        settings: Workdir, seed, device, runner and MLflow tracking (a recipe's top-level settings).
    """
    if any(s.kind == "generated" for s in config.sources):
        generated_dir = finished_output(generated_dir or "", "generated_dir", "generate")
    with _stage_run("data", settings, {"teacher": teacher}) as (ctx, _):
        return mix_task(ctx, resolve_teacher(teacher), generated_dir, config, config.tokens or tokens)


@flow(name="score", log_prints=True)
def score(teacher: str, data_dir: str | None = None, config: ScoreConfig = ScoreConfig(),
          settings: RunSettings = RunSettings()) -> str:
    """Importance scores of the teacher on `data_dir`; returns the scores dir.

    Args:
        teacher: The model to compress: a local Hugging Face folder, a .gguf file, a hub id or an alias.
        data_dir: The generated dataset (what a generate run returned); not needed when config.data is a file.
        config: Scoring settings (a recipe's score section).
        settings: Workdir, seed, device, runner and MLflow tracking (a recipe's top-level settings).
    """
    if config.data == "generated":
        data_dir = finished_output(data_dir or "", "data_dir", "generate")
    else:
        data_dir = config.data  # the task then reads config.data, as in compress
    with _stage_run("score", settings, {"teacher": teacher}) as (ctx, _):
        teacher_dir = resolve_teacher(teacher)
        check_stage_memory("score", config, settings.device, {"teacher": teacher_dir})
        return score_task(ctx, teacher_dir, data_dir, config)


@flow(name="prune", log_prints=True)
def prune(teacher: str, scores_dir: str, data_dir: str | None = None, config: PruneConfig = PruneConfig(),
          settings: RunSettings = RunSettings()) -> str:
    """Prune the teacher to ``config``'s shape, or with a budget to the best candidate shape measured on
    `data_dir` (one task per candidate on the settings' runner); returns the pruned model's dir.

    Args:
        teacher: The model to compress: a local Hugging Face folder, a .gguf file, a hub id or an alias.
        scores_dir: Importance scores of this teacher (what a score run returned).
        data_dir: The generated dataset (what a generate run returned); needed with a budget only.
        config: Target shape or parameter budget (a recipe's prune section).
        settings: Workdir, seed, device, runner and MLflow tracking (a recipe's top-level settings).
    """
    check_runner(settings.runner)
    scores_dir = finished_output(scores_dir, "scores_dir", "score")
    if config.budget is not None:
        data_dir = finished_output(data_dir or "", "data_dir", "generate")
    with _stage_run("prune", settings, {"teacher": teacher}) as (ctx, _):
        teacher_dir = resolve_teacher(teacher)
        try:
            check_prune_target(teacher_dir, config)
        except ValueError as e:
            raise ValueError(f"config: {e}") from None
        check_stage_memory("prune", config, settings.device, {"teacher": teacher_dir})
        return prune_task(ctx, teacher_dir, scores_dir, data_dir or "", config, runner=settings.runner)


@flow(name="distill", log_prints=True)
def distill(teacher: str, student_dir: str, data_dir: str, config: DistillConfig = DistillConfig(),
            settings: RunSettings = RunSettings()) -> str:
    """Distill a student from the teacher; returns the distilled student's dir.

    Args:
        teacher: The model to compress: a local Hugging Face folder, a .gguf file, a hub id or an alias.
        student_dir: The student: a pruned model (what a prune run returned) or any model of your own (a local
            Hugging Face folder, a .gguf file, a hub id or an alias).
        data_dir: The training data (what a generate or data run returned).
        config: Distillation settings (a recipe's distill section).
        settings: Workdir, seed, device, runner and MLflow tracking (a recipe's top-level settings).
    """
    student_dir = _student_ref(student_dir)
    data_dir = finished_output(data_dir, "data_dir", "generate")
    with _stage_run("distill", settings, {"teacher": teacher}) as (ctx, _):
        student = resolve_teacher.with_options(name="resolve-student")(student_dir)
        teacher_dir = resolve_teacher(teacher)
        check_stage_memory("distill", config, settings.device, {"teacher": teacher_dir, "student": student})
        return distill_task(ctx, teacher_dir, student, data_dir, config, log_model=settings.tracking.log_model)


def _student_ref(ref: str, producer: str = "prune") -> str:
    """A `producer` output (finished) or any model reference; the error names the parameter otherwise."""
    p = Path(ref or "").expanduser()
    if ref and p.is_dir() and not (p / "manifest.json").is_file() and (p / "config.json").is_file():
        return str(p.resolve())  # a model of the user's own
    if ref and not p.exists() and not ref.startswith(("/", ".", "~")):
        return ref  # an alias or hub id: resolved (and checked) in the flow
    return finished_output(ref, "student_dir", producer)


@flow(name="evaluate", log_prints=True)
def evaluate(models: dict[str, str], config: EvalConfig = EvalConfig(), settings: RunSettings = RunSettings()) -> str:
    """Evaluate labelled models side by side; returns the eval dir (results.json, comparison.md).

    Args:
        models: Label -> model reference or dir, e.g. {"teacher": "smollm2-135m-instruct", "pruned": "<prune
            dir>", "student": "<distill dir>"}; the first is the table's reference; config.min_recovery needs
            "teacher" and "student".
        config: Benchmarks and perplexity settings (a recipe's eval section).
        settings: Workdir, seed, device, runner and MLflow tracking (a recipe's top-level settings).
    """
    from compactlm.evaluation import check_tasks, flat_metrics

    if not models:
        raise ValueError("models: give at least one {label: model reference or directory}")
    check_tasks(config)
    with _stage_run("evaluate", settings, {f"model.{k}": v for k, v in models.items()}) as (ctx, tracker):
        resolved = {label: resolve_teacher(ref) for label, ref in models.items()}
        check_stage_memory("evaluate", config, settings.device, resolved)
        eval_dir = evaluate_task(ctx, resolved, config)
        results = json.loads((Path(eval_dir) / "results.json").read_text())
        tracker.log_metrics(ctx.parent_run_id, {f"{label}/{k}": v for label, result in results.items()
                                                for k, v in flat_metrics(result).items()})
        return eval_dir


@flow(name="export", log_prints=True)
def export(student_dir: str, teacher: str | None = None, config: ExportConfig = ExportConfig(),
           eval_config: EvalConfig = EvalConfig(), settings: RunSettings = RunSettings()) -> str:
    """Export a student as deployable files (GGUF for llama.cpp, quantized vLLM directories), each evaluated and
    timed beside the full-precision model, and register them in MLflow; returns the export dir (results.json,
    rows.json, comparison.md).

    Args:
        student_dir: The student: a distilled student (what a distill run returned) or any model of your own (a
            local Hugging Face folder, a .gguf file, a hub id or an alias).
        teacher: The teacher, exported and measured beside the student as the reference when config.teacher is on
            (a local Hugging Face folder, a .gguf file, a hub id or an alias).
        config: What to export and how to measure it (a recipe's export section).
        eval_config: The benchmarks and perplexity every export is scored on (a recipe's eval section).
        settings: Workdir, seed, device, runner and MLflow tracking (a recipe's top-level settings).
    """
    from compactlm.evaluation import check_tasks

    if not config.enabled:
        raise ValueError("config: give at least one format: config.gguf (e.g. [f16, q8_0, q4_k_m]) or config.vllm "
                         "(e.g. [w8a8])")
    if config.teacher and not teacher:
        raise ValueError("teacher: config.teacher is on: give the teacher, or switch config.teacher off")
    if config.evaluate:
        check_tasks(eval_config)
    student_dir = _student_ref(student_dir, "distill")
    with _stage_run("export", settings, {"student_dir": student_dir, "teacher": teacher or ""}) as (ctx, tracker):
        student = resolve_teacher.with_options(name="resolve-student")(student_dir)
        models = {"student": student, **({"teacher": resolve_teacher(teacher)} if config.teacher else {})}
        check_stage_memory("export", config, settings.device, models)
        inputs = {"student_dir": student_dir, "teacher": teacher, "export": config.model_dump(mode="json"),
                  "eval": eval_config.model_dump(mode="json"), "settings": settings.model_dump(mode="json")}
        out = export_task(ctx, models, config, eval_config, recipe=inputs, log_files=settings.tracking.log_model,
                          registered_model=config.registered_model or "compactlm-student")
        rows = json.loads((Path(out) / "rows.json").read_text())
        tracker.log_metrics(ctx.parent_run_id, {f"{r['model']}/{r['format']}/{k}": v for r in rows
                                                for k, v in r.items() if isinstance(v, float)})
        return out


#: The stage flows by name (what prefect.yaml's entrypoints point at).
STAGE_FLOWS = {"generate": generate, "data": data, "score": score, "prune": prune, "distill": distill,
               "evaluate": evaluate, "export": export}
