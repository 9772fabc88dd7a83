"""Importance scoring stage: activation statistics of the teacher on calibration data."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from compactlm.config import ScoreConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext, retry_transient, run_stage


def _log(tracker: Tracker, run_id: str, out: Path, summary: dict) -> None:
    if "base_loss" in summary:
        tracker.log_metrics(run_id, {"base_loss": summary["base_loss"]})
    for name in ("scores.json", "scores.safetensors", "plots"):
        if (out / name).exists():
            tracker.log_artifact(run_id, out / name, "plots" if name == "plots" else None)


@task(name="score", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def score(ctx: RunContext, teacher_dir: str, data_dir: str, cfg: ScoreConfig, label: str = "score") -> str:
    """Importance scores of the model in `teacher_dir` (its output dir); `label` names a later round of a
    schedule (``score-r2``: its child run, log and console lines)."""
    from compactlm.importance import score_model

    calibration = data_dir if cfg.data == "generated" else cfg.data

    def produce(out: Path, log_step) -> dict:
        return score_model(teacher_dir, calibration, cfg, out, device=ctx.device, seed=ctx.seed)

    return run_stage(ctx, "score", cfg, [teacher_dir, calibration], produce, _log, label=label)
