"""Checks that need more than the schema but no weights, run before any compute: benchmark task names and their
data files, the teacher's weight files (headers and sizes only), that the prune target fits the teacher (its
``config.json`` only) and that every stage's memory plan fits this machine.

This module sits above the stages (it asks evaluation and pruning), so the schema stays free of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from compactlm.config import PruneConfig, Recipe
from compactlm.recipe import RecipeError


def check_prune_target(teacher_dir: str | os.PathLike, cfg: PruneConfig) -> dict[str, Any]:
    """The student shape `cfg` asks of this teacher; ValueError when it does not fit (shape larger than the
    teacher, heads not in KV groups, an unreachable budget, an architecture compactlm cannot prune)."""
    from transformers import AutoConfig

    from compactlm.pruning.rotation import check_rotatable
    from compactlm.pruning.shapes import target_shape

    config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=False)
    if cfg.repair is not None and cfg.repair.hidden == "pca":
        check_rotatable(config)
    return target_shape(config, cfg)


def preflight(recipe: Recipe, teacher_dir: str | os.PathLike | None = None) -> None:
    """Raise RecipeError naming the field when a check fails. Shipped task names are checked in about a
    millisecond; with `teacher_dir` its weight files are checked (a truncated or corrupt file fails here, in
    seconds, not in a stage) and the prune target against its config.json."""
    from compactlm.evaluation import check_tasks
    from compactlm.models import check_weights

    try:
        check_tasks(recipe.eval)
    except ValueError as e:
        raise RecipeError("invalid recipe:\n  " + _named(e, "eval.tasks")) from None
    _check_export_tools(recipe)
    if teacher_dir is not None:
        try:
            check_weights(teacher_dir)
        except ValueError as e:
            raise RecipeError(f"invalid recipe:\n  teacher: {e}") from None
        if recipe.export.enabled and recipe.pruned_student:  # the student keeps the teacher's family and tokenizer
            _check_export_model(recipe, teacher_dir)
        if recipe.pruned_student:  # (a student of your own skips score and prune)
            try:
                target = check_prune_target(teacher_dir, recipe.prune)
            except ValueError as e:
                raise RecipeError(f"invalid recipe:\n  prune: {e}") from None
            if recipe.schedule is not None and recipe.prune.budget is None:  # a budget's: checked once it chose
                _check_rounds(recipe, teacher_dir, target)
        check_memory(recipe, teacher_dir)


#: Set to 1 to run a recipe the memory plan says does not fit (the plan is an estimate; you may know better).
SKIP_MEMORY_CHECK = "COMPACTLM_SKIP_MEMORY_CHECK"


def check_memory(recipe: Recipe, teacher_dir: str | os.PathLike) -> None:
    """Refuse, before any compute, a recipe whose memory plan (:mod:`compactlm.plan`) does not fit this machine."""
    from compactlm.models import local_config
    from compactlm.plan import plan_run

    student = None if recipe.pruned_student else local_config(recipe.student)
    refusal = _misfit(recipe.device, lambda machine: plan_run(recipe, teacher_dir, machine, student))
    if refusal:
        raise RecipeError(refusal)


#: The recipe section whose fields a stage's fixes name, where it is not the stage's own name.
_SECTION = {"evaluate": "eval"}


def check_stage_memory(stage: str, cfg: Any, device: str, models: dict[str, str | os.PathLike]) -> None:
    """:func:`check_memory` for one stage run on its own (a stage flow, whose form calls the stage's section
    ``config``): ValueError naming ``config`` and the fix when the stage's plan (:func:`compactlm.plan.plan_stage`,
    `models` by label) does not fit this machine."""
    from compactlm.plan import plan_stage

    refusal = _misfit(device, lambda machine: plan_stage(stage, cfg, machine, models, device=device),
                      f"the {stage} stage does not fit this machine")
    if refusal:
        raise ValueError("config: " + re.sub(rf"\b{_SECTION.get(stage, stage)}\.", "config.", refusal))


def _misfit(device: str, plan_for: Callable[[Any], Any], headline: str | None = None) -> str | None:
    """The refusal, with the override, when the plan `plan_for(this machine)` does not fit (None when it fits or
    $COMPACTLM_SKIP_MEMORY_CHECK is 1); `device` is the run's setting (cpu: the GPUs are not counted)."""
    if os.environ.get(SKIP_MEMORY_CHECK) == "1":
        return None
    from compactlm.plan import Machine, check_fits

    plan = plan_for(Machine.detect(gpus=0 if device == "cpu" else None))
    try:
        check_fits(plan, headline)
    except ValueError as e:
        return f"{e}\n(set {SKIP_MEMORY_CHECK}=1 to run it anyway)"
    return None


def _check_rounds(recipe: Recipe, teacher_dir: str | os.PathLike, target: dict[str, Any]) -> None:
    """Every intermediate shape of the schedule is a valid student of this teacher."""
    from transformers import AutoConfig

    from compactlm.config import SHAPE_FIELDS, PruneConfig
    from compactlm.pruning.schedule import round_shapes
    from compactlm.pruning.shapes import target_shape

    config = AutoConfig.from_pretrained(teacher_dir, trust_remote_code=False)
    for r, shape in enumerate(round_shapes(config, {k: target[k] for k in SHAPE_FIELDS}, recipe.schedule.rounds),
                              start=1):
        try:
            target_shape(config, PruneConfig(**shape))
        except ValueError as e:
            raise RecipeError(f"invalid recipe:\n  schedule.rounds: round {r}'s shape {shape} does not fit: {e}; "
                              "try fewer rounds") from None


def _check_export_tools(recipe: Recipe) -> None:
    """GGUF exports need llama.cpp (built by `make install`): fail before any compute when it is missing."""
    if not recipe.export.gguf:
        return
    from compactlm.export.toolchain import ExportError, check_llama_cpp, converter_script

    try:
        converter_script()
        check_llama_cpp()
    except ExportError as e:
        raise RecipeError(f"invalid recipe:\n  export.gguf: {e}") from None


def _check_export_model(recipe: Recipe, model_dir: str | os.PathLike) -> None:
    """The teacher's family and tokenizer (which a pruned student keeps) can take the asked-for exports."""
    from compactlm.export import ExportError, check_export

    try:
        check_export(model_dir, recipe.export)
    except ExportError as e:
        raise RecipeError(f"invalid recipe:\n  {e}") from None


def student_size_warning(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike) -> str | None:
    """A warning when the given student has more parameters than the teacher (allowed, but likely a mistake)."""
    from compactlm.models import count_params_on_disk

    s_params, t_params = count_params_on_disk(student_dir), count_params_on_disk(teacher_dir)
    if s_params <= t_params:
        return None
    return (f"student: the student ({s_params:,} parameters) is larger than the teacher ({t_params:,}): "
            "distillation still runs, but check that student and teacher are not swapped")


def _named(err: Exception, field: str) -> str:
    """``field: message``, unless the message already starts with a field name (``eval.data_dir: ...``,
    ``eval.jsonl_tasks.0.choices: ...``)."""
    msg = str(err)
    return msg if re.match(r"^[a-z_]+(\.[a-z_0-9]+)+: ", msg) else f"{field}: {msg}"
