"""Turn :func:`evaluate_model` results into MLflow metrics and a markdown comparison table (pure Python)."""

from __future__ import annotations

import math
import re
from typing import Any

_MAIN_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mc2", "mc1")
_PPL_METRIC = "word_perplexity"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./: ]")


def _safe(name: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . / :` and space; anything else becomes `_`."""
    return _UNSAFE.sub("_", name)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flatten an :func:`evaluate_model` result into MLflow-safe, run-independent metric names.

    ``<task>/<metric>`` for every numeric task metric (e.g. ``compactlm_facts/acc``,
    ``compactlm_facts/acc_norm``), ``perplexity/<metric>`` (word_perplexity, byte_perplexity,
    bits_per_byte), ``params``, ``size_bytes``, ``size_mb``, ``tok_s`` (when speed was measured) and
    ``eval_seconds``. Values that are None
    (stderr "N/A") or not finite are left out, since MLflow cannot chart them.
    """
    out: dict[str, float] = {}
    for task, metrics in (result.get("tasks") or {}).items():
        for metric, value in metrics.items():
            if _finite(value):
                out[_safe(f"{task}/{metric}")] = float(value)
    for metric, value in (result.get("perplexity") or {}).items():
        if _finite(value):
            out[_safe(f"perplexity/{metric}")] = float(value)
    if _finite(result.get("params")):
        out["params"] = float(result["params"])
    if _finite(result.get("size_bytes")):
        out["size_bytes"] = float(result["size_bytes"])
        out["size_mb"] = result["size_bytes"] / 1e6
    if tok_per_second(result) is not None:
        out["tok_s"] = tok_per_second(result)
    if _finite(result.get("seconds")):
        out["eval_seconds"] = float(result["seconds"])
    return out


def main_metric(metrics: dict[str, Any]) -> str | None:
    """The headline metric of a task: acc_norm if present, else acc (else exact_match, f1, mc2, mc1)."""
    for name in _MAIN_METRICS:
        if _finite(metrics.get(name)):
            return name
    return None


def _fmt_params(n: Any) -> str:
    if not _finite(n):
        return "—"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{int(n):,}"


def kept_fraction(result: dict[str, Any], reference: dict[str, Any]) -> float | None:
    """How much of the reference model's quality `result` keeps, as a fraction (1.0 = all of it).

    Definition (:data:`KEPT_FORMULA`): the mean of one term per task both share and one for perplexity. A task's
    term is its headline metric above chance over the reference's above chance, ``(score - chance) / (ref - chance)``,
    where ``chance`` is the expected score of guessing (``tasks[t]["chance"]``: mean of 1 / number of choices over
    the questions; 0 when unknown); tasks where the reference is not above chance are left out (nothing to keep).
    The perplexity term (lower is better) is ``reference_word_perplexity / word_perplexity``. None when nothing is
    comparable. A model at chance level keeps 0 % of a task, one worse than chance a negative share.
    """
    ratios: list[float] = []
    ref_tasks = reference.get("tasks") or {}
    for task, metrics in (result.get("tasks") or {}).items():
        ref = ref_tasks.get(task)
        name = main_metric(ref) if ref else None
        if name is None or not _finite(metrics.get(name)):
            continue
        chance = chance_level(ref)
        if ref[name] - chance <= 1e-9:
            continue
        ratios.append((metrics[name] - chance) / (ref[name] - chance))
    ppl = (result.get("perplexity") or {}).get(_PPL_METRIC)
    ref_ppl = (reference.get("perplexity") or {}).get(_PPL_METRIC)
    if _finite(ppl) and _finite(ref_ppl) and ppl > 0:
        ratios.append(ref_ppl / ppl)
    return sum(ratios) / len(ratios) if ratios else None


def chance_level(metrics: dict[str, Any]) -> float:
    """A task's expected score when guessing (``metrics["chance"]``, set by the evaluation for multiple-choice
    tasks), 0 when unknown."""
    chance = metrics.get("chance")
    return float(chance) if _finite(chance) else 0.0


#: The "% kept" column's formula, printed under the comparison table.
KEPT_FORMULA = ("% kept = mean over the tasks of (score - chance) / (teacher's score - chance), with the "
                "perplexity term teacher's ppl / ppl; chance = 1 / number of choices")


def compare_rows(results: dict[str, dict[str, Any]], reference: str = "teacher") -> tuple[list[str], list[list[str]]]:
    """The comparison table as (header, rows of formatted cells); :func:`compare_table` renders it as markdown,
    ``tasks/evaluate.py`` as a Prefect table artifact. Columns are documented at :func:`compare_table`."""
    if not results:
        raise ValueError("compare_table: results is empty; give {label: evaluate_model(...) result}")
    tasks: list[str] = []
    for res in results.values():
        for task in res.get("tasks") or {}:
            if task not in tasks:
                tasks.append(task)
    metric_of = {}
    for task in tasks:
        names = [main_metric(r["tasks"][task]) for r in results.values() if task in (r.get("tasks") or {})]
        metric_of[task] = next((n for n in names if n), None)
    has_ppl = any(_finite((r.get("perplexity") or {}).get(_PPL_METRIC)) for r in results.values())
    has_speed = any(_finite(tok_per_second(r)) for r in results.values())
    batch = next((s["batch_size"] for r in results.values() if _finite((s := r.get("speed") or {}).get("tok_s_batch"))),
                 None)
    ref = results.get(reference)

    header = ["model", "params", "size MB"]
    if has_speed:  # side by side (compare_speeds): batch 1 and a batch; timed alone: generation_speed's tok/s
        header += ["decode tok/s b1 ↑", f"decode tok/s b{batch} ↑"] if batch else ["tok/s ↑"]
    header += [f"{t} ({metric_of[t] or '—'})" for t in tasks]
    header += ["word ppl ↓"] if has_ppl else []
    header += [f"% of {reference} kept ↑"]
    rows = []
    for label, res in results.items():
        size = res.get("size_bytes")
        row = [label, _fmt_params(res.get("params")), f"{size / 1e6:.1f}" if _finite(size) else "—"]
        if has_speed:
            speed = tok_per_second(res)
            row.append(f"{speed:.1f}" if _finite(speed) else "—")
            if batch:
                speed = (res.get("speed") or {}).get("tok_s_batch")
                row.append(f"{speed:.1f}" if _finite(speed) else "—")
        for task in tasks:
            value = (res.get("tasks") or {}).get(task, {}).get(metric_of[task]) if metric_of[task] else None
            row.append(f"{value:.3f}" if _finite(value) else "—")
        if has_ppl:
            ppl = (res.get("perplexity") or {}).get(_PPL_METRIC)
            row.append(f"{ppl:.2f}" if _finite(ppl) else "—")
        kept = kept_fraction(res, ref) if ref is not None else None
        row.append(f"{100 * kept:.1f}" if kept is not None else "—")
        rows.append(row)
    return header, rows


def compare_table(results: dict[str, dict[str, Any]], reference: str = "teacher") -> str:
    """Markdown table, one row per model label (in the order given), e.g. teacher / pruned / student, then a
    legend that says what every column is.

    Columns: model, params, size MB (safetensors on disk, 1 MB = 1e6 bytes), "decode tok/s b1 ↑" and
    "decode tok/s b8 ↑" (greedy HF generation, :func:`compactlm.evaluation.speed.compare_speeds`: medians of
    interleaved rounds; a result timed alone shows its ``tok_s`` only), each task's headline metric (acc_norm if
    present else acc; the header names it), held-out word perplexity (lower is better), and "% of teacher kept" =
    100 x :func:`kept_fraction` against the `reference` row ("—" when `reference` is not among `results`; the
    reference row itself shows 100.0). Speed and size are reported, not part of "kept".
    """
    header, rows = compare_rows(results, reference)
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)] + rows
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"
    speed = next((r["speed"] for r in results.values() if (r.get("speed") or {}).get("tok_s_batch")), {})
    return table + "\n" + legend(header, reference, speed) + "\n"


def legend(header: list[str], reference: str = "teacher", speed: dict[str, Any] | None = None) -> str:
    """What the comparison table's columns are, in one paragraph (`speed`: one model's speed record)."""
    parts = ["size MB: weights on disk"]
    if any(h.startswith("decode tok/s") for h in header):
        speed = speed or {}
        parts.append(f"decode tok/s: greedy generation of {speed.get('new_tokens', '?')} tokens per prompt at batch "
                     f"1 and at batch {speed.get('batch_size', '?')} (HF, prompt included), median of "
                     f"{speed.get('repeats', '?')} rounds with the models interleaved")
    elif "tok/s ↑" in header:
        parts.append("tok/s: greedy generation, 8 prompts x 32 tokens at batch 8, each model timed alone")
    parts.append("task columns: the task's headline metric (higher is better)")
    if "word ppl ↓" in header:
        parts.append("word ppl: held-out word perplexity (lower is better)")
    parts.append(KEPT_FORMULA.replace("teacher", reference))
    return "; ".join(parts) + "."


def tok_per_second(result: dict[str, Any]) -> float | None:
    """The result's headline inference throughput (``result["speed"]["tok_s"]``: batch-1 decode when
    :func:`compactlm.evaluation.speed.compare_speeds` measured it), or None when not measured."""
    value = (result.get("speed") or {}).get("tok_s")
    return float(value) if _finite(value) else None


class RecoveryError(RuntimeError):
    """The student kept less of the teacher's quality than ``eval.min_recovery`` demands.

    ``str(err)`` contains the whole comparison table; ``recovery`` (None = nothing comparable),
    ``min_recovery`` and ``table`` are attributes.
    """

    def __init__(self, message: str, *, recovery: float | None, min_recovery: float, table: str):
        super().__init__(message)
        self.recovery, self.min_recovery, self.table = recovery, min_recovery, table


def check_recovery(results: dict[str, dict[str, Any]], min_recovery: float | None, *,
                   reference: str = "teacher", candidate: str = "student") -> None:
    """Quality gate: return None if `candidate` keeps at least `min_recovery` of `reference`, else raise.

    "Kept" is :func:`kept_fraction` (the comparison table's "% of teacher kept" / 100). `min_recovery`
    None disables the gate. Raises :class:`RecoveryError` (message includes the table) when the fraction
    is below the threshold or when nothing is comparable (a gate that cannot be checked does not pass);
    ValueError for a threshold outside [0, 1] or when `reference` / `candidate` is not in `results`.
    """
    if min_recovery is None:
        return None
    if not _finite(min_recovery) or not 0.0 <= min_recovery <= 1.0:
        raise ValueError(f"eval.min_recovery must be a fraction in [0, 1] (e.g. 0.8) or None, got {min_recovery!r}")
    missing = [label for label in (reference, candidate) if label not in results]
    if missing:
        raise ValueError(f"eval.min_recovery: the gate compares {candidate!r} against {reference!r}, but "
                         f"results lack {missing} (labels present: {list(results)})")
    kept = kept_fraction(results[candidate], results[reference])
    if kept is not None and kept >= min_recovery:
        return None
    table = compare_table(results, reference=reference)
    why = ("no task or perplexity is comparable between them" if kept is None
           else f"kept {100 * kept:.1f}% of {reference}")
    raise RecoveryError(
        f"quality gate failed: {candidate} {why}, below eval.min_recovery = {100 * min_recovery:.1f}%. "
        f"Distill longer, prune less, or lower eval.min_recovery.\n\n{table}",
        recovery=kept, min_recovery=min_recovery, table=table)
