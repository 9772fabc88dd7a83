"""Distillation stage: the pruned student learns from the teacher (metrics logged per step); and teacher correction,
the same trainer fine-tuning the teacher itself on the training data."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from compactlm.artifacts import read_manifest
from compactlm.config import CorrectConfig, DistillConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext, retry_transient, run_stage


def log_student(tracker: Tracker, run_id: str, out: Path, metrics: dict) -> str:
    """The distilled student (its folder: HF files, pruning record, training log) as an MLflow logged model of this
    run with its final metrics: the run's "Logged models" and the experiment's Models tab show it."""
    from tasks.registry import log_logged_model

    return log_logged_model(tracker, run_id, "student", out, metrics={f"final_{k}": v for k, v in metrics.items()},
                            params={}, attachments={}, tags={"compactlm.stage": "distill"},
                            model_type="compactlm-student")


def _make_log(log_model: bool):
    def _log(tracker: Tracker, run_id: str, out: Path, summary: dict) -> None:
        metrics = read_manifest(out)["metrics"]  # same names whether computed now or reused
        tracker.log_metrics(run_id, {f"final_{k}": v for k, v in metrics.items()})
        tracker.log_artifact(run_id, out / "train_log.jsonl")
        tracker.log_artifact(run_id, out / "config.json")
        tracker.set_tags(run_id, {"compactlm.model_dir": out})
        if log_model and not summary.get("cache_hit"):  # a reused student was uploaded by the run that made it
            log_student(tracker, run_id, out, metrics)
    return _log


@task(name="distill", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def distill(ctx: RunContext, teacher_dir: str, student_dir: str, data_dir: str, cfg: DistillConfig,
            log_model: bool = True, label: str = "distill") -> str:
    """The student distilled from the teacher on the data (its output dir); `label` names a later stage of a
    chain (``distill-2``: its child run, log and console lines)."""
    from compactlm.distillation import distill as run_distill

    def produce(out: Path, log_step) -> dict:
        return run_distill(teacher_dir, student_dir, data_dir, cfg, out, seed=ctx.seed, device=ctx.device,
                           log_fn=log_step)

    return run_stage(ctx, "distill", cfg, [teacher_dir, student_dir, data_dir], produce, _make_log(log_model),
                     label=label)


@task(name="correct", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def correct(ctx: RunContext, teacher_dir: str, data_dir: str, cfg: CorrectConfig) -> str:
    """The teacher fine-tuned on the training data (its output dir: a model like the teacher, with its tokenizer),
    under the child run ``correct``."""
    from compactlm.distillation import correct_teacher

    def produce(out: Path, log_step) -> dict:
        return correct_teacher(teacher_dir, data_dir, cfg, out, seed=ctx.seed, device=ctx.device, log_fn=log_step)

    return run_stage(ctx, "correct", cfg, [teacher_dir, data_dir], produce, _make_log(log_model=False))
