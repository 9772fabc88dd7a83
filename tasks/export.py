"""Export stage: the distilled student (and with ``export.teacher`` the teacher) as deployable files, each one
evaluated and timed, side by side with the full-precision model, then registered in MLflow.

Per model, ``<workdir>/export-model/<key>/`` holds the exports (:mod:`compactlm.export`: ``gguf/``, ``vllm-*/``,
``exports.json``) and ``results.json`` (``{format: {"size_bytes", "eval", "speed", ...}}``, the full-precision HF
row ``hf-fp32`` first), all published at once: a crash leaves nothing half-written and a rerun is a cache hit. It
is keyed by the model, the export config (less what only changes logging) and, when evaluating, the eval config,
so a teacher's exports are made once across runs. The stage output ``<workdir>/export/<key>/`` holds
``results.json`` (``{label: {"model_dir", "export_dir", "formats"}}``), ``rows.json`` (one row per model and
format: size, decode and prompt tok/s, peak RSS, word perplexity, average accuracy) and ``comparison.md``.

MLflow: the child run gets every row's figures as metrics and the tables as artifacts; the student and each of its
exports become a logged model (files uploaded when ``tracking.log_model``) with a registered model version
(``export.registered_model``, exports as ``<name>-<format>``) carrying the recipe, the pruning record and the
metrics. A cache hit logs the figures again but registers nothing new.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from compactlm.artifacts import is_complete, output_lock, publish_dir, stage_key
from compactlm.config import EvalConfig, ExportConfig, Recipe
from compactlm.tracking import Tracker
from tasks.common import RunContext, retry_transient, run_stage, stage_logger

#: Row fields logged as metrics (``<label>/<format>/<field>``) and attached to registered versions.
ROW_METRICS = ("size_mb", "decode_tok_s_b1", "decode_tok_s_batch", "prompt_tok_s", "peak_rss_mib", "word_ppl",
               "avg_acc", "ppl_ratio")
HF_ROW = "hf-fp32"


def _eval_key(cfg: ExportConfig, eval_cfg: EvalConfig) -> dict | None:
    return eval_cfg.model_dump(mode="json", exclude={"min_recovery"}) if cfg.evaluate else None


def _summary(result: dict) -> dict:
    """An evaluation result without lm-eval's raw dump (kept in eval-model/ for the HF row)."""
    return {k: v for k, v in result.items() if k != "lm_eval"}


def _evaluate_export(ctx: RunContext, record: dict, eval_cfg: EvalConfig, threads: int | None) -> dict:
    from compactlm.evaluation import evaluate_model
    from compactlm.evaluation.llamacpp import evaluate_gguf

    cfg = eval_cfg.model_copy(update={"speed": False})
    if record["format"] == "gguf":
        return _summary(evaluate_gguf(record["path"], cfg, seed=ctx.seed, threads=threads))
    # vLLM's CPU int4 kernel has no fp32 path: the exports are bfloat16 and run so
    cfg = cfg.model_copy(update={"backend": "vllm", "dtype": record.get("dtype") or "bfloat16"})
    return _summary(evaluate_model(record["path"], cfg, device=ctx.device, seed=ctx.seed))


def _speed(path: str, fmt: str, cfg: ExportConfig, dtype: str | None = None) -> dict:
    from compactlm.evaluation.deploy import measure

    return measure(path, fmt, prompt_tokens=cfg.prompt_tokens, decode_tokens=cfg.decode_tokens, threads=cfg.threads,
                   dtype=dtype, batch=cfg.decode_batch)


def _hf_row(ctx: RunContext, model_dir: str, cfg: ExportConfig, eval_cfg: EvalConfig) -> dict:
    from compactlm.models import check_weights
    from tasks.evaluate import _evaluate_cached  # the evaluate stage's per-model cache: usually a hit

    row: dict[str, Any] = {"format": "hf", "type": "fp32", "path": model_dir, "size_bytes": check_weights(model_dir)}
    if cfg.evaluate:
        row["eval"] = _summary(_evaluate_cached(ctx, model_dir, eval_cfg))
    if cfg.speed:
        row["speed"] = _speed(model_dir, "hf", cfg, "float32")
    return row


def export_model_cached(ctx: RunContext, model_dir: str, cfg: ExportConfig, eval_cfg: EvalConfig) -> str:
    """``export-model/<key>``: the exports of `model_dir` with every one evaluated and timed (see module doc)."""
    from compactlm.export import read_exports, write_exports

    key = {"config": cfg.model_dump(mode="json", exclude=set(ExportConfig.NOT_IN_KEY)),
           "eval": _eval_key(cfg, eval_cfg), "seed": ctx.seed}
    out = Path(ctx.workdir) / "export-model" / stage_key("export-model", key, [model_dir])
    with output_lock(out):
        if is_complete(out):
            stage_logger().info("export: cache hit for %s", model_dir)
            return str(out)
        manifest: dict[str, Any] = {"model_dir": model_dir, **key}
        with publish_dir(out, manifest) as tmp:
            write_exports(model_dir, cfg, tmp)
            results = {HF_ROW: _hf_row(ctx, model_dir, cfg, eval_cfg)}
            for record in read_exports(tmp):
                stage_logger().info("export: measuring %s of %s", record["name"], model_dir)
                result = {**record, "path": str(Path(record["path"]).relative_to(tmp))}
                if cfg.evaluate:
                    result["eval"] = _evaluate_export(ctx, record, eval_cfg, cfg.threads)
                if cfg.speed:
                    result["speed"] = _speed(record["path"], record["format"], cfg, record.get("dtype"))
                results[record["name"]] = result
            (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
            manifest["formats"] = list(results)
    return str(out)


def _registered_files(export_dir: Path, fmt: str, result: dict) -> Path:
    return Path(result["path"]) if fmt == HF_ROW else export_dir / result["path"]


def _register_all(tracker: Tracker, run_id: str, label_result: dict, rows: list[dict], name: str,
                  recipe: dict | None, log_files: bool) -> list[str]:
    """Register the student and each export (see module doc); returns ``name:version`` per registered model."""
    from tasks.registry import register

    export_dir = Path(label_result["export_dir"])
    pruning = Path(label_result["model_dir"]) / "pruning.json"
    side = {"recipe.json": recipe or {}, **({"pruning.json": json.loads(pruning.read_text())}
                                           if pruning.is_file() else {})}
    done = []
    for fmt, result in label_result["formats"].items():
        row = next(r for r in rows if r["model"] == "student" and r["format"] == fmt)
        metrics = {k: row[k] for k in ROW_METRICS if row.get(k) is not None}
        reg_name = name if fmt == HF_ROW else f"{name}-{fmt}"
        tags = {"compactlm.format": fmt, "compactlm.export_dir": str(export_dir),
                "compactlm.model_dir": label_result["model_dir"]}
        info = register(tracker, run_id, reg_name, _registered_files(export_dir, fmt, result) if log_files else None,
                        metrics=metrics, params={"format": result["format"], "type": result["type"]},
                        attachments={**side, "metrics.json": row, "export.json": {k: v for k, v in result.items()
                                                                                 if k not in ("eval", "speed")}},
                        tags=tags, model_type=f"compactlm-{result['format']}")
        done.append(f"{info['name']}:{info['version']}")
    return done


def _make_log(cfg: ExportConfig, recipe: dict | None, log_files: bool, registered_model: str):
    def log(tracker: Tracker, run_id: str, out: Path, summary: dict) -> None:
        rows = json.loads((out / "rows.json").read_text())
        for row in rows:
            tracker.log_metrics(run_id, {f"{row['model']}/{row['format']}/{k}": row[k] for k in ROW_METRICS
                                         if row.get(k) is not None})
        for name in ("results.json", "rows.json", "comparison.md"):
            tracker.log_artifact(run_id, out / name)
        results = json.loads((out / "results.json").read_text())
        if summary.get("cache_hit") or "student" not in results:
            return  # registered (and uploaded) by the run that made them
        if cfg.register_models:
            done = _register_all(tracker, run_id, results["student"], rows, registered_model, recipe, log_files)
            tracker.set_tags(run_id, {"compactlm.registered": ", ".join(done)})
        elif log_files:
            tracker.log_artifact(run_id, results["student"]["export_dir"], "exports")

    return log


@task(name="export", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def export(ctx: RunContext, models: dict[str, str], cfg: ExportConfig, eval_cfg: EvalConfig,
           recipe: dict | None = None, log_files: bool = True, registered_model: str = "compactlm-student") -> str:
    """Export, evaluate and time each labelled model dir (``student``, optionally ``teacher``); returns the export
    dir (results.json, rows.json, comparison.md) and creates a markdown and a table Prefect artifact."""
    from compactlm.evaluation.deploy import deploy_rows, deploy_table

    def produce(out: Path, log_step) -> dict:
        results = {}
        for label, model_dir in models.items():
            export_dir = export_model_cached(ctx, model_dir, cfg, eval_cfg)
            formats = json.loads((Path(export_dir) / "results.json").read_text())
            results[label] = {"model_dir": model_dir, "export_dir": export_dir, "formats": formats}
        rows = deploy_rows({label: r["formats"] for label, r in results.items()})
        with publish_dir(out, {"models": models}) as tmp:
            (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str))
            (tmp / "rows.json").write_text(json.dumps(rows, indent=2))
            (tmp / "comparison.md").write_text(deploy_table(rows) + "\n")
        return {"models": models}

    out = run_stage(ctx, "export", cfg, list(models.values()), produce,
                    _make_log(cfg, recipe, log_files, registered_model),
                    extra_key={"labels": list(models), "eval": _eval_key(cfg, eval_cfg)})
    table = (Path(out) / "comparison.md").read_text()
    create_markdown_artifact(table, key="compactlm-export", description="deployable exports: size, speed, quality")
    rows = json.loads((Path(out) / "rows.json").read_text())
    create_table_artifact([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                          key="compactlm-export-table", description="deployable exports (same figures as "
                          "compactlm-export)")
    return out


def export_for_recipe(ctx: RunContext, recipe: Recipe, teacher: str, student: str) -> str | None:
    """The compress flow's export step: the student (and with ``export.teacher`` the teacher) when the recipe asks
    for any export, else None."""
    if not recipe.export.enabled:
        return None
    models = {"student": student, **({"teacher": teacher} if recipe.export.teacher else {})}
    return export(ctx, models, recipe.export, recipe.eval, recipe=recipe.model_dump(mode="json"),
                  log_files=recipe.tracking.log_model,
                  registered_model=recipe.export.registered_model or f"{recipe.name}-student")
