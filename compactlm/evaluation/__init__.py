"""Evaluation stage: lm-eval benchmarks, held-out perplexity, MLflow-ready metrics and a comparison table.

Public API::

    evaluate_model(model_dir, cfg: EvalConfig, *, device="cpu", seed=0) -> dict
    evaluate_lm(lm: lm_eval LM, cfg, *, seed=0) -> dict   # same, for an already-built lm-eval model
    flat_metrics(result) -> dict[str, float]
    compare_table({label: result}, reference="teacher") -> str
    compare_rows({label: result}, reference="teacher") -> (header, rows)   # same table, as cells
    check_recovery({label: result}, min_recovery) -> None   # quality gate; raises RecoveryError
    check_tasks(cfg) -> list[str]          # cheap validation, no model, no lm-eval import
    local_task_names() -> list[str]        # shipped tasks (compactlm_facts, compactlm_arc_easy, ...)

``cfg.backend = "vllm"`` scores with lm-eval's VLLM class in a child process
(``python -m compactlm.evaluation --model DIR --config JSON --out FILE``).

Importing this package is cheap: lm-eval, torch and datasets load only inside :func:`evaluate_model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compactlm.evaluation.registry import PERPLEXITY_TASK, check_tasks, local_task_names
from compactlm.evaluation.report import (
    RecoveryError,
    check_recovery,
    compare_rows,
    compare_table,
    flat_metrics,
    kept_fraction,
    main_metric,
    tok_per_second,
)

if TYPE_CHECKING:
    import os

    from compactlm.config import EvalConfig


def evaluate_model(model_dir: str | os.PathLike, cfg: EvalConfig, *, device: str = "cpu",
                   seed: int = 0) -> dict[str, Any]:
    """See :func:`compactlm.evaluation.runner.evaluate_model`."""
    from compactlm.evaluation.runner import evaluate_model as _evaluate

    return _evaluate(model_dir, cfg, device=device, seed=seed)


def evaluate_lm(lm: Any, cfg: EvalConfig, *, seed: int = 0) -> dict[str, Any]:
    """See :func:`compactlm.evaluation.runner.evaluate_lm` (any lm-eval LM; no params/size/seconds)."""
    from compactlm.evaluation.runner import evaluate_lm as _evaluate_lm

    return _evaluate_lm(lm, cfg, seed=seed)


__all__ = ["PERPLEXITY_TASK", "RecoveryError", "check_recovery", "check_tasks", "compare_rows", "compare_table",
           "evaluate_lm", "evaluate_model", "flat_metrics", "kept_fraction", "local_task_names", "main_metric",
           "tok_per_second"]
