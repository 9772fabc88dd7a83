"""Checks that need more than the schema but no weights, run before any compute: benchmark task names and their
data files, and that the prune target fits the teacher (its ``config.json`` only).

This module sits above the stages (it asks evaluation and pruning), so the schema stays free of them.
"""

from __future__ import annotations

import os
from typing import Any

from compactlm.config import PruneConfig, Recipe
from compactlm.recipe import RecipeError


def check_prune_target(teacher_dir: str | os.PathLike, cfg: PruneConfig) -> dict[str, Any]:
    """The student shape `cfg` asks of this teacher; ValueError when it does not fit (shape larger than the
    teacher, heads not in KV groups, an unreachable budget, an architecture compactlm cannot prune)."""
    from transformers import AutoConfig

    from compactlm.pruning.shapes import target_shape

    return target_shape(AutoConfig.from_pretrained(teacher_dir, trust_remote_code=False), cfg)


def preflight(recipe: Recipe, teacher_dir: str | os.PathLike | None = None) -> None:
    """Raise RecipeError naming the field when a check fails. Shipped task names are checked in about a
    millisecond; with `teacher_dir` the prune target is checked against the teacher's config.json."""
    from compactlm.evaluation import check_tasks

    try:
        check_tasks(recipe.eval)
    except ValueError as e:
        raise RecipeError(f"invalid recipe:\n  eval.tasks: {e}") from None
    if teacher_dir is not None:
        try:
            check_prune_target(teacher_dir, recipe.prune)
        except ValueError as e:
            raise RecipeError(f"invalid recipe:\n  prune: {e}") from None
