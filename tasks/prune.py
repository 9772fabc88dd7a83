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
def prune(ctx: RunContext, teacher_dir: str, scores_dir: str, data_dir: str, cfg: PruneConfig) -> str:
    """Prune to cfg's explicit shape, or, with a parameter budget (`cfg.params`), to the best of the candidate
    shapes ranked on the generated data (which then becomes an input of the output's key)."""
    from compactlm.pruning import prune_to_dir

    budget = cfg.params is not None

    def produce(out: Path, log_step) -> dict:
        return prune_to_dir(teacher_dir, scores_dir, cfg, out, calibration=data_dir if budget else None,
                            device=ctx.device, seed=ctx.seed)

    upstream = [teacher_dir, scores_dir] + ([data_dir] if budget else [])
    return run_stage(ctx, "prune", cfg, upstream, produce, _log)
