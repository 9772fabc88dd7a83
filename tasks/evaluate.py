"""Evaluation stage: the same lm-eval tasks and perplexity for every model, side by side.

Each model's results are cached on their own (``<workdir>/eval-model/<key>``), so a new student is
evaluated while the teacher's results are reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from compactlm.artifacts import is_complete, publish_dir, stage_key
from compactlm.config import EvalConfig
from compactlm.tracking import Tracker
from tasks.common import RunContext, run_stage


def _evaluate_cached(ctx: RunContext, model_dir: str, cfg: EvalConfig) -> dict:
    from compactlm.evaluation import evaluate_model

    out = Path(ctx.workdir) / "eval-model" / stage_key("eval-model", {"config": cfg.model_dump(mode="json"),
                                                                      "seed": ctx.seed}, [model_dir])
    if not is_complete(out):
        result = evaluate_model(model_dir, cfg, device=ctx.device, seed=ctx.seed)
        with publish_dir(out, {"model_dir": model_dir}) as tmp:
            (tmp / "results.json").write_text(json.dumps(result, indent=2, default=str))
    else:
        get_run_logger().info("evaluate: cache hit for %s", model_dir)
    return json.loads((out / "results.json").read_text())


def _log(tracker: Tracker, run_id: str, out: Path, summary: dict) -> None:
    from compactlm.evaluation import flat_metrics

    results = json.loads((out / "results.json").read_text())
    for label, result in results.items():
        tracker.log_metrics(run_id, {f"{label}/{k}": v for k, v in flat_metrics(result).items()})
    tracker.log_artifact(run_id, out / "results.json")
    tracker.log_artifact(run_id, out / "comparison.md")


@task(name="evaluate", retries=1, retry_delay_seconds=5)
def evaluate(ctx: RunContext, models: dict[str, str], cfg: EvalConfig) -> str:
    """Evaluate each labelled model dir (e.g. teacher / pruned / student); return the output dir holding
    results.json ({label: result}) and comparison.md."""
    from compactlm.evaluation import compare_table

    def produce(out: Path, log_step) -> dict:
        results = {label: _evaluate_cached(ctx, d, cfg) for label, d in models.items()}
        table = compare_table(results, reference=next(iter(models)))
        with publish_dir(out, {"models": models}) as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
            (tmp / "comparison.md").write_text(table + "\n")
        return {"models": models}

    out = run_stage(ctx, "evaluate", cfg, list(models.values()), produce, _log,
                    extra_key={"labels": list(models)})
    table = (Path(out) / "comparison.md").read_text()
    create_markdown_artifact(table, key="compactlm-comparison", description="teacher vs pruned vs student")
    return out
