"""The `compress` flow: teacher -> generate -> score -> prune -> distill -> evaluate.

One parent MLflow run per flow run (tagged with the Prefect flow-run id), one child run per stage.
Stages hand each other directories on disk, keyed by their inputs, so a re-run reuses finished stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from compactlm.config import Recipe
from compactlm.models import pick_device
from compactlm.preflight import preflight
from compactlm.tracking import Tracker, default_tracking_uri
from tasks.common import RunContext, prefect_ids
from tasks.distill import distill
from tasks.evaluate import evaluate
from tasks.generate import generate
from tasks.models import resolve_teacher
from tasks.prune import check_runner, prune
from tasks.score import score


def _summary_metrics(results: dict) -> dict[str, float]:
    from compactlm.evaluation import flat_metrics

    out: dict[str, float] = {}
    for label, result in results.items():
        out.update({f"{label}/{k}": v for k, v in flat_metrics(result).items()})
    t, s = results.get("teacher", {}).get("params"), results.get("student", {}).get("params")
    if t and s:
        out["student_param_fraction"] = s / t
    return out


@flow(name="compress", log_prints=True)
def compress(recipe: Recipe) -> dict:
    """Compress `recipe.teacher` into a pruned, distilled student and benchmark all three models."""
    logger = get_run_logger()
    preflight(recipe)  # fail before any compute (the UI form already enforced the schema)
    check_runner(recipe.runner)
    workdir = Path(recipe.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(default_tracking_uri(workdir, recipe.tracking.tracking_uri), recipe.tracking.experiment)
    parent = tracker.start_run(recipe.name, tags={"compactlm.recipe": recipe.name, **prefect_ids()})
    try:
        tracker.log_params(parent, {"teacher": recipe.teacher, "seed": recipe.seed, "device": recipe.device,
                                    "runner": recipe.runner})
        tracker.log_dict(parent, recipe.model_dump(mode="json"), "recipe.json")
        ctx = RunContext(workdir=str(workdir), tracking_uri=tracker.tracking_uri, experiment=tracker.experiment,
                         parent_run_id=parent, seed=recipe.seed, device=pick_device(recipe.device),
                         flow_run_id=prefect_ids().get("prefect.flow_run_id"))

        teacher = resolve_teacher(recipe.teacher)
        preflight(recipe, teacher)  # the prune target must fit this teacher: fail before generating
        data = generate(ctx, teacher, recipe.generate)
        scores = score(ctx, teacher, data, recipe.score)
        pruned = prune(ctx, teacher, scores, data, recipe.prune, runner=recipe.runner)
        student = distill(ctx, teacher, pruned, data, recipe.distill, log_model=recipe.tracking.log_model)
        eval_dir = evaluate(ctx, {"teacher": teacher, "pruned": pruned, "student": student}, recipe.eval)

        results = json.loads((Path(eval_dir) / "results.json").read_text())
        table = (Path(eval_dir) / "comparison.md").read_text()
        tracker.log_metrics(parent, _summary_metrics(results))
        tracker.log_artifact(parent, Path(eval_dir) / "comparison.md")
        tracker.end_run(parent)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise

    url = tracker.run_url(parent)
    if url.startswith("http"):
        create_link_artifact(url, link_text="MLflow run", key="compactlm-mlflow-run")
    create_markdown_artifact(f"# compactlm: {recipe.name}\n\n{table}\n\nMLflow: `{url}`\n",
                             key="compactlm-summary", description="compress pipeline summary")
    logger.info("student: %s", student)
    return {"mlflow_run_id": parent, "tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment,
            "mlflow": url, "teacher": teacher, "data": data, "scores": scores, "pruned": pruned,
            "student": student, "eval": eval_dir, "table": table}
