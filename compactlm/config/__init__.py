"""The recipe schema: one pydantic model per section, and :class:`Recipe`, a whole pipeline.

These models are the Prefect UI's forms (field descriptions, defaults and bounds come from here) and the only
definition of what a recipe may say. Bad values fail here, before any compute, with pydantic's error naming the
field. Loading YAML, ``--set`` overrides and error formatting are :mod:`compactlm.recipe`; checks that need the
teacher's config are :mod:`compactlm.preflight`. Nothing here imports torch, transformers or prefect.

Modules: ``generate`` (prompts, sampling, filters, self-instruct), ``data`` (the training mixture), ``stages``
(score, prune, distill, teacher correction, eval), ``export`` (deployable files), ``pipeline`` (the recipe, run
settings, tracking), ``base`` (shared behaviour).
"""

from compactlm.config.base import _Strict
from compactlm.config.data import DataConfig, DataSource
from compactlm.config.export import ExportConfig
from compactlm.config.generate import (
    SELF_INSTRUCT_BLOCKED_WORDS,
    FilterConfig,
    GenerateConfig,
    SelfInstructConfig,
)
from compactlm.config.pipeline import Recipe, RunSettings, ScheduleConfig, TrackingConfig
from compactlm.config.stages import (
    SHAPE_FIELDS,
    BudgetConfig,
    CorrectConfig,
    DistillConfig,
    EvalConfig,
    JsonlTask,
    LoraConfig,
    OnPolicyConfig,
    PruneConfig,
    RepairConfig,
    ScoreConfig,
)

__all__ = ["SELF_INSTRUCT_BLOCKED_WORDS", "SHAPE_FIELDS", "BudgetConfig", "CorrectConfig", "DataConfig",
           "DataSource", "DistillConfig", "EvalConfig", "ExportConfig", "FilterConfig", "GenerateConfig", "JsonlTask",
           "LoraConfig", "OnPolicyConfig", "PruneConfig", "Recipe", "RepairConfig", "RunSettings", "ScheduleConfig",
           "ScoreConfig", "SelfInstructConfig", "TrackingConfig", "_Strict"]
