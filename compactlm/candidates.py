"""Budget candidates ranked by a short distillation (``prune.budget.short_distill``).

The proxy measured right after pruning ranks how much a shape lost, not how much of it distillation wins back:
ModelOpt found the zero-shot ranking picked shapes that ended 16 points apart after training, and Minitron ranks
its candidates after a light retraining. So the proxy stays the cheap first filter over the whole pool, and its
best ``budget.distill_top`` are each pruned (with the stage's repair), distilled for a few steps on the generated
data (``budget.short_distill``, teacher online or offline as configured) and measured by the same proxy on the same
calibration rows. The final ranking puts those first, by their distilled proxy, and the rest after them in proxy
order (:func:`compactlm.pruning.budget.rank_measured`, so a fan-out and the sequential path agree).

One candidate is one unit of work (:func:`distill_candidate`, a Prefect task each in ``tasks/prune.py``). A
result is kept in `cache_dir` as it finishes, so a prune stage killed during the short runs redoes only the
unfinished ones. On CPU a candidate's value is a function of the seed alone (the distillation is deterministic).
:func:`rank_with_short_distill` is the sequential path; ``prune_to_dir(..., ranking=...)`` then prunes its first.

This module sits above the stage packages (it runs pruning and distillation together), beside recipe and
preflight.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from compactlm.artifacts import write_json_atomic
from compactlm.config import PruneConfig


def to_distill(ranking: list[dict[str, Any]], cfg: PruneConfig) -> list[dict[str, Any]]:
    """The candidates of a proxy ranking (best first) that get a short distillation: the first
    ``budget.distill_top`` (none without ``budget.short_distill``)."""
    budget = cfg.budget
    if budget is None or budget.short_distill is None:
        return []
    return ranking[:budget.distill_top]


def _cache_file(cache_dir: Path, candidate: dict[str, Any]) -> Path:
    s = candidate["shape"]
    return cache_dir / ("-".join(f"{k}={s[k]}" for k in sorted(s)) + ".json")


def distill_candidate(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                      calibration: str | os.PathLike, candidate: dict[str, Any], *, device: str = "cpu",
                      seed: int = 0, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Prune the teacher in `model_dir` to ``candidate["shape"]`` (with ``cfg.repair``), distill it with
    ``cfg.budget.short_distill`` on `calibration` (a generated dataset dir, also the training data) and measure
    ``cfg.budget.proxy`` on the proxy's calibration rows (drawn with `seed`, as the proxy's were).

    Returns ``{**candidate, "distilled_value", "short_distill": {"steps", "tokens", "kd_loss", "seconds"}}``
    (JSON-serializable). With `cache_dir` the result is read from, or written to, a file named by the shape.
    Intermediate models live in a temporary directory under `cache_dir` (else the system's) and are removed.
    """
    from compactlm.distillation import distill
    from compactlm.pruning.prune import prune_to_dir, with_shape

    budget = cfg.budget
    if budget is None or budget.short_distill is None:
        raise ValueError("prune.budget.short_distill is not set: give the short distillation's settings (e.g. "
                         "budget: {params: 0.5, short_distill: {steps: 20}})")
    if not Path(calibration).is_dir():
        raise ValueError(f"prune.budget.short_distill trains on the generated dataset: give its directory as "
                         f"calibration, got {str(calibration)!r}")
    cached = _cache_file(Path(cache_dir), candidate) if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return json.loads(cached.read_text())
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".short-") as tmp:
        pruned, student = Path(tmp) / "pruned", Path(tmp) / "student"
        prune_to_dir(model_dir, scores_dir, with_shape(cfg, candidate["shape"]), pruned, calibration=calibration,
                     device=device, seed=seed)
        summary = distill(model_dir, pruned, calibration, budget.short_distill, student, seed=seed, device=device)
        value = measure(model_dir, student, cfg, calibration, device=device, seed=seed)
    out = {**candidate, "distilled_value": value,
           "short_distill": {"steps": summary["steps"], "tokens": summary["tokens"], "kd_loss": summary["kd_loss"],
                             "seconds": round(summary["seconds"], 1)}}
    if cached is not None:
        write_json_atomic(cached, out)
    return out


def measure(model_dir: str | os.PathLike, student_dir: str | os.PathLike, cfg: PruneConfig,
            calibration: str | os.PathLike, *, device: str = "cpu", seed: int = 0) -> float:
    """``cfg.budget.proxy`` of the student in `student_dir` on the proxy's calibration rows (drawn with `seed`)."""
    from compactlm.models import load_model
    from compactlm.pruning.budget import calibration_tensor, proxy_value

    ids = calibration_tensor(calibration, model_dir, cfg, seed=seed)
    student = load_model(student_dir, dtype="float32", device=device)
    teacher = load_model(model_dir, dtype="float32", device=device) if cfg.budget.proxy == "kl" else None
    return proxy_value(student, ids, cfg.budget.proxy, teacher=teacher)


def rerank(ranking: list[dict[str, Any]], distilled: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A proxy `ranking` (best first) with the `distilled` candidates' results in: those first by their distilled
    proxy, the rest after in proxy order; new "rank"s (:func:`compactlm.pruning.budget.rank_measured`)."""
    from compactlm.pruning.budget import rank_measured
    from compactlm.pruning.prune import shape_key

    by_shape = {shape_key(c): c for c in distilled}
    return rank_measured([{**{k: v for k, v in by_shape.get(shape_key(c), c).items() if k != "rank"},
                           "proxy_rank": c.get("proxy_rank", c["rank"])} for c in ranking])


def rank_with_short_distill(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                            calibration: str | os.PathLike, *, device: str = "cpu", seed: int = 0,
                            cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The whole pool of ``cfg.budget`` ranked by the proxy, then its best ``distill_top`` by the short
    distillation (one after the other, in this process): the ranking ``prune_to_dir(..., ranking=...)`` takes."""
    from compactlm.pruning.budget import _rank_dir

    ranking = _rank_dir(model_dir, scores_dir, cfg, calibration, device=device, seed=seed)
    return rerank(ranking, [distill_candidate(model_dir, scores_dir, cfg, calibration, c, device=device, seed=seed,
                                              cache_dir=cache_dir) for c in to_distill(ranking, cfg)])
