"""The pipeline's parent MLflow run as its users read it: the comparison table as the run's description, a few
key metrics named for the chart view (``student/avg_acc``, ``student/word_ppl``, ``student_param_fraction``,
``student/speedup``), the training data as the run's dataset input, and two plots (the distillation loss curve,
the models side by side) as PNG artifacts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from compactlm.tracking import Tracker
from tasks.common import log_dataset_input

NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description


def key_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per model label: every flat metric, plus ``avg_acc`` (mean headline metric over the tasks), ``word_ppl``;
    for the student (and the pruned model) ``param_fraction`` / ``speedup`` against the teacher."""
    from compactlm.evaluation import flat_metrics, main_metric

    out: dict[str, float] = {}
    teacher = results.get("teacher", {})
    for label, result in results.items():
        out.update({f"{label}/{k}": v for k, v in flat_metrics(result).items()})
        heads = [m[main_metric(m)] for m in (result.get("tasks") or {}).values() if main_metric(m)]
        if heads:
            out[f"{label}/avg_acc"] = sum(heads) / len(heads)
        ppl = (result.get("perplexity") or {}).get("word_perplexity")
        if ppl is not None and math.isfinite(ppl):
            out[f"{label}/word_ppl"] = ppl
        if label != "teacher" and teacher.get("params") and result.get("params"):
            out[f"{label}_param_fraction"] = result["params"] / teacher["params"]
        t_speed, s_speed = (teacher.get("speed") or {}).get("tok_s"), (result.get("speed") or {}).get("tok_s")
        if label != "teacher" and t_speed and s_speed:
            out[f"{label}/speedup"] = s_speed / t_speed
    return out


def _loss_curve(train_log: Path, png: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(x) for x in train_log.read_text().splitlines() if x.strip()] if train_log.is_file() else []
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "kd_loss", "ce_loss", "hidden_loss"):
        pts = [(x["step"], x[key]) for x in lines if isinstance(x.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=key, marker="." if len(pts) < 30 else None)
    ax.set(xlabel="step", ylabel="loss", title="distillation loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def _comparison(metrics: dict[str, float], labels: list[str], png: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [metrics.get(f"{x}/avg_acc") for x in labels]
    ppl = [metrics.get(f"{x}/word_ppl") for x in labels]
    if all(v is None for v in acc + ppl):
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.bar(labels, [v or 0 for v in acc], color="tab:blue")
    a.set(title="task average (higher is better)", ylim=(0, 1))
    b.bar(labels, [v or 0 for v in ppl], color="tab:orange")
    b.set(title="held-out word perplexity (lower is better)")
    if any(v and v > 0 for v in ppl):  # log scale only with something to draw (the eval may skip perplexity)
        b.set_yscale("log")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def _plots(eval_dir: Path, student_dir: Path, metrics: dict[str, float], labels: list[str]) -> Path:
    """The run's two plots, drawn once per (evaluation, student) pair and kept beside the stage outputs
    (``<workdir>/plots/<eval key>-<student key>/``), so a rerun whose stages are all cached draws nothing."""
    import shutil
    import tempfile

    out = eval_dir.parent.parent / "plots" / f"{eval_dir.name}-{student_dir.name}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _loss_curve(student_dir / "train_log.jsonl", tmp / "loss_curve.png")
        _comparison(metrics, labels, tmp / "comparison.png")
        tmp.rename(out)  # published whole: a crash leaves no half-drawn folder under the final name
    except OSError:
        if not out.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def log_run_summary(tracker: Tracker, run_id: str, outputs: dict[str, Any], header: str = "") -> dict[str, float]:
    """Log the parent run's description, key metrics, training-data input and plots; returns the metrics."""
    eval_dir = Path(outputs["eval"])
    results = json.loads((eval_dir / "results.json").read_text())
    table = (eval_dir / "comparison.md").read_text()
    metrics = key_metrics(results)
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, {NOTE_TAG: f"{header}\n\n{table}".strip()})
    tracker.log_artifact(run_id, eval_dir / "comparison.md")
    if outputs.get("rounds"):  # a schedule's rounds: shape, parameters, steps and outputs of each
        tracker.log_dict(run_id, outputs["rounds"], "schedule.json")
    if outputs.get("train_data"):
        from tasks.generate import dataset_frame

        train = Path(outputs["train_data"])
        log_dataset_input(tracker, run_id, dataset_frame(train), train / "data", f"train-{train.name}")
    for png in sorted(_plots(eval_dir, Path(outputs["student"]), metrics, list(results)).glob("*.png")):
        tracker.log_artifact(run_id, png, "plots")
    return metrics
