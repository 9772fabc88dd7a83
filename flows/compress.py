"""The `compress` flow: teacher -> generate -> [data] -> [correct] -> score -> prune [-> rounds] (or a student of
your own) -> distill [-> distill-2 ...] -> evaluate -> [export].

One parent MLflow run per flow run (tagged with the Prefect flow-run id), one child run per stage that runs.
Stages hand each other directories on disk, keyed by their inputs, so a re-run reuses finished stages. With a
given student (``student: <model>``) score and prune are skipped; generation runs when the training data or the
pruning needs it; the data stage runs when the training data is more than the generated set. With ``correct``
the teacher is first fine-tuned on the training data, and scoring, pruning and distillation learn from the
corrected teacher; the evaluation shows it beside the original, which stays the table's reference. With a
``schedule`` the shape is reached in rounds of prune -> distill (tasks/schedule.py) from the same total steps.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact

from compactlm.config import DistillConfig, Recipe
from compactlm.models import pick_device
from compactlm.preflight import preflight
from compactlm.tracking import Tracker, default_tracking_uri
from tasks.common import RunContext, prefect_ids
from tasks.data import mix
from tasks.distill import correct, distill
from tasks.evaluate import evaluate
from tasks.export import export_for_recipe
from tasks.generate import generate
from tasks.models import resolve_teacher
from tasks.prune import check_runner, prune
from tasks.schedule import run_schedule
from tasks.score import score
from tasks.summary import log_run_summary


def _needs_generation(recipe: Recipe) -> bool:
    """Generation runs when a data source is the generated set, or pruning calibrates or ranks on it."""
    prune_uses_it = recipe.pruned_student and (recipe.score.data == "generated" or recipe.prune.budget is not None)
    return prune_uses_it or any(s.kind == "generated" for s in recipe.data.sources)


def _student(ctx: RunContext, recipe: Recipe, teacher: str, data: str | None,
             train: str) -> tuple[str, str | None, str | None, dict]:
    """(the model to distill into, the pruned model, the scores, what the schedule changed): the teacher scored and
    pruned, or the given model (then the pruned model and scores are None). With a schedule the teacher is still
    pruned in one cut (the table's pruned model, and a budget's choice of shape), then the rounds run to that shape
    and the last round's pruned model is distilled with the steps left ({"distill": its config, "rounds": rows})."""
    logger = get_run_logger()
    if recipe.pruned_student:
        scores = score(ctx, teacher, data, recipe.score)
        pruned = prune(ctx, teacher, scores, data, recipe.prune, runner=recipe.runner)
        if recipe.schedule is None:
            return pruned, pruned, scores, {}
        start, first, rounds = run_schedule(ctx, recipe, teacher, scores, pruned, data, train)
        return start, pruned, scores, {"distill": first, "rounds": rounds}
    from compactlm.models import count_params_on_disk
    from compactlm.preflight import student_size_warning

    student = resolve_teacher.with_options(name="resolve-student")(recipe.student)
    logger.info("student: %s given (%s parameters, the teacher has %s); score and prune are skipped",
                recipe.student, f"{count_params_on_disk(student):,}", f"{count_params_on_disk(teacher):,}")
    if warning := student_size_warning(student, teacher):
        logger.warning(warning)
    return student, None, None, {}


def _distill_chain(ctx: RunContext, recipe: Recipe, teacher: str, student: str, train: str,
                   first: DistillConfig | None = None) -> str:
    """distill (`first` in its place: a schedule's steps left), then each distill_then stage from the student the
    one before made; the last student is the result (the one uploaded to MLflow)."""
    stages = [first or recipe.distill, *recipe.distill_then]
    for i, cfg in enumerate(stages, start=1):
        label = "distill" if i == 1 else f"distill-{i}"
        student = distill.with_options(name=label)(ctx, teacher, student, train, cfg, label=label,
                                                   log_model=recipe.tracking.log_model and i == len(stages))
    return student


def _stages(ctx: RunContext, recipe: Recipe, teacher: str) -> dict[str, str | None]:
    """Run the stages; return every output (None for a stage that did not run)."""
    data = generate(ctx, teacher, recipe.generate) if _needs_generation(recipe) else None
    train = data
    if not recipe.data.generated_only:
        trained = [recipe.correct, *recipe.distill_stages] if recipe.correct else recipe.distill_stages
        tokens = max(d.steps * d.batch_size * d.seq_len for d in trained)
        train = mix(ctx, teacher, data, recipe.data, recipe.data.tokens or tokens)
    corrected = correct(ctx, teacher, train, recipe.correct) if recipe.correct else None
    start, pruned, scores, scheduled = _student(ctx, recipe, corrected or teacher, data, train)
    student = _distill_chain(ctx, recipe, corrected or teacher, start, train, scheduled.get("distill"))
    models = {"teacher": teacher, **({"corrected": corrected} if corrected else {}),
              **({"pruned": pruned} if pruned else {}), "student": student}
    out = {"data": data, "train_data": train, "corrected_teacher": corrected, "scores": scores, "pruned": pruned,
           "student": student, **({"rounds": scheduled["rounds"]} if scheduled else {}),
           "eval": evaluate(ctx, models, recipe.eval)}
    out["export"] = export_for_recipe(ctx, recipe, teacher, student)  # None unless the recipe asks for exports
    return out


@flow(name="compress", log_prints=True)
def compress(recipe: Recipe) -> dict:
    """Compress `recipe.teacher` into a distilled student (the teacher pruned, or a model you give) and benchmark
    them side by side."""
    logger = get_run_logger()
    preflight(recipe)  # fail before any compute (the UI form already enforced the schema)
    check_runner(recipe.runner)
    workdir = Path(recipe.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(default_tracking_uri(workdir, recipe.tracking.tracking_uri), recipe.tracking.experiment)
    parent = tracker.start_run(recipe.name, tags={"compactlm.recipe": recipe.name, "compactlm.student":
                                                  recipe.student, **prefect_ids()})
    try:
        tracker.log_params(parent, {"teacher": recipe.teacher, "student": recipe.student, "seed": recipe.seed,
                                    "device": recipe.device, "runner": recipe.runner})
        tracker.log_dict(parent, recipe.model_dump(mode="json"), "recipe.json")
        ctx = RunContext(workdir=str(workdir), tracking_uri=tracker.tracking_uri, experiment=tracker.experiment,
                         parent_run_id=parent, seed=recipe.seed, device=pick_device(recipe.device),
                         flow_run_id=prefect_ids().get("prefect.flow_run_id"))
        teacher = resolve_teacher(recipe.teacher)
        preflight(recipe, teacher)  # the prune target must fit this teacher: fail before generating
        out = _stages(ctx, recipe, teacher)
        table = (Path(out["eval"]) / "comparison.md").read_text()
        header = (f"compactlm `{recipe.name}`: {recipe.teacher} -> "
                  + ("the teacher pruned and distilled" if recipe.pruned_student else f"`{recipe.student}`"))
        log_run_summary(tracker, parent, out, header)
        tracker.end_run(parent)
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise

    url = tracker.run_url(parent)
    if url.startswith("http"):
        create_link_artifact(url, link_text="MLflow run", key="compactlm-mlflow-run")
    given = "" if recipe.pruned_student else f"\n\nStudent given: `{recipe.student}` (score and prune skipped).\n"
    create_markdown_artifact(f"# compactlm: {recipe.name}\n\n{table}{given}\n\nMLflow: `{url}`\n",
                             key="compactlm-summary", description="compress pipeline summary")
    logger.info("student: %s", out["student"])
    return {"mlflow_run_id": parent, "tracking_uri": tracker.tracking_uri, "experiment": tracker.experiment,
            "mlflow": url, "teacher": teacher, **out, "table": table}
