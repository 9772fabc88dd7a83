"""Iterative pruning (``schedule``): one ``prune-round`` Prefect task per round. A round scores the model it starts
from (round 1 reuses the teacher's scores), prunes it to the round's shape and, before the last round, distills it
from the teacher for the round's steps. Each of those is the usual stage task (``score-r2``, ``prune-r2``,
``distill-r1`` child runs), keyed by its inputs, so a run killed between rounds (or inside one) resumes where it
stopped: finished rounds are cache hits. The final round's pruned model goes on to the recipe's distillation.
"""

from __future__ import annotations

import json
from typing import Any

from prefect import task

from compactlm.config import DistillConfig, PruneConfig, Recipe
from tasks.common import RunContext, stage_logger
from tasks.distill import distill
from tasks.prune import prune
from tasks.score import score


@task(name="prune-round")
def prune_round(ctx: RunContext, r: int, teacher: str, model: str, scores: str | None, data: str | None,
                train: str, recipe: Recipe, cfg: PruneConfig, steps: list[int]) -> dict[str, str | None]:
    """Round `r`: {"scores", "pruned", "student"} (student None in the last round, which does not distill here).
    `scores` given = reuse them (round 1: the teacher's); `steps`: every round's distillation steps."""
    if scores is None:
        scores = score.with_options(name=f"score-r{r}")(ctx, model, data, recipe.score, label=f"score-r{r}")
    pruned = prune.with_options(name=f"prune-r{r}")(ctx, model, scores, data, cfg, runner=recipe.runner,
                                                     label=f"prune-r{r}")
    student = None
    if r < len(steps):
        d = round_distill(recipe.distill, steps, r)
        student = distill.with_options(name=f"distill-r{r}")(ctx, teacher, pruned, train, d, log_model=False,
                                                             label=f"distill-r{r}")
    return {"scores": scores, "pruned": pruned, "student": student}


def round_distill(cfg: DistillConfig, steps: list[int], r: int) -> DistillConfig:
    """`cfg` for round `r` (1-based) of a schedule whose rounds distill `steps`: its steps (warmup capped at them),
    continuing the data order where the round before stopped (so the rounds together see what one cut would)."""
    return DistillConfig.model_validate({**cfg.model_dump(), "steps": steps[r - 1],
                                         "warmup_steps": min(cfg.warmup_steps, steps[r - 1]),
                                         "skip_rows": cfg.skip_rows + sum(steps[:r - 1]) * cfg.batch_size})


def run_schedule(ctx: RunContext, recipe: Recipe, teacher: str, scores: str, one_shot: str,
                 data: str | None, train: str) -> tuple[str, DistillConfig, list[dict[str, Any]]]:
    """The rounds of ``recipe.schedule`` to the shape of `one_shot` (the teacher pruned in one cut: its record
    names the final shape, also a budget's choice). Returns (the last round's pruned model, the final student's
    distill config (the steps left), one row per round)."""
    from transformers import AutoConfig

    from compactlm.formats.pruning import read_record
    from compactlm.pruning.schedule import describe, round_shapes, round_steps

    sched = recipe.schedule
    config = AutoConfig.from_pretrained(teacher, trust_remote_code=False)
    final = read_record(one_shot)["candidate"]["shape"]
    steps = round_steps(recipe.distill.steps, sched.rounds, sched.share)
    rows = describe(config, round_shapes(config, final, sched.rounds), steps)
    stage_logger().info("schedule: %s", json.dumps([{k: row[k] for k in ("round", "shape", "param_ratio", "steps")}
                                                    for row in rows]))
    model, round_scores, out = teacher, scores, {}
    for row in rows:
        cfg = PruneConfig.model_validate({**recipe.prune.model_dump(), "budget": None, **row["shape"]})
        out = prune_round.with_options(task_run_name=f"prune-round-{row['round']}")(
            ctx, row["round"], teacher, model, round_scores, data, train, recipe, cfg, steps)
        row.update(out)
        model, round_scores = out["student"], None
    return out["pruned"], round_distill(recipe.distill, steps, sched.rounds), rows
