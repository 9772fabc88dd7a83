"""Structured pruning stage: depth and width to the recipe's target shape."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task

from compactlm.config import PruneConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext, run_stage


def _log(tracker: Tracker, run_id: str, out: Path, summary: dict) -> None:
    record = json.loads((out / "pruning.json").read_text())
    tracker.log_metrics(run_id, {k: v for k, v in record.items() if k.startswith("params")})
    tracker.log_artifact(run_id, out / "pruning.json")
    tracker.log_artifact(run_id, out / "config.json")


@task(name="prune", retries=1, retry_delay_seconds=5)
def prune(ctx: RunContext, teacher_dir: str, scores_dir: str, cfg: PruneConfig) -> str:
    from compactlm.pruning import prune_to_dir

    def produce(out: Path, log_step) -> dict:
        return prune_to_dir(teacher_dir, scores_dir, cfg, out)

    return run_stage(ctx, "prune", cfg, [teacher_dir, scores_dir], produce, _log)
