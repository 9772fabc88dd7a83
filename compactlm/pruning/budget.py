"""Parameter budgets: rank the student shapes that fit a budget by a proxy measured right after pruning.

* :func:`candidate_shapes` — the shapes that fit (:mod:`compactlm.pruning.shapes`), optionally scored;
* :func:`rank_candidates` — prune the teacher to each candidate and rank them by a cheap proxy measured before
  any distillation: the calibration loss, or KL(teacher || student).
* Fan-out (one unit of work per candidate, e.g. one Prefect task each): :func:`plan_candidates` lists the pool
  from the directories (no weights loaded), :func:`measure_candidate` prunes and measures one candidate on its
  own, :func:`rank_measured` orders the gathered results. Together they give exactly what
  :func:`rank_candidates` gives (same pool, same per-candidate computation, same stable sort).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.calibration import batches, calibration_loss
from compactlm.choices import PROXY_CHOICES
from compactlm.config import SHAPE_FIELDS, PruneConfig
from compactlm.models import stored_dtype
from compactlm.pruning.shapes import fitting_shapes, target_shape
from compactlm.pruning.slicing import plan_pruning, prune_model
from compactlm.runtime import release_freed_memory

if TYPE_CHECKING:
    import torch

    from compactlm.formats.scores import ImportanceScores

PROXY_BATCH_SIZE = 4
TEACHER_CACHE_BYTES = 1 << 30  # KL proxy: cache the teacher's fp32 log-probs up to this size, else recompute


def candidate_shapes(config: Any, budget: float, *, max_per_kind: int = 3, slack: float = 0.05,
                     scores: ImportanceScores | None = None, model=None, calibration: torch.Tensor | None = None,
                     batch_size: int = PROXY_BATCH_SIZE) -> list[dict[str, Any]]:
    """Student shapes with at most ``budget`` x the teacher's parameters (:func:`~compactlm.pruning.shapes.
    fitting_shapes`). With `model`, `scores` and `calibration` ids each is also pruned and scored (key
    "proxy_value", proxy "loss") and the list is sorted best first (see :func:`score_candidates`)."""
    out = fitting_shapes(config, budget, max_per_kind=max_per_kind, slack=slack)
    if model is not None and scores is not None and calibration is not None:
        out = score_candidates(model, scores, out, calibration, proxy="loss", batch_size=batch_size)
        for c in out:
            c["proxy_loss"] = c["proxy_value"]
    return out


def _teacher_logprobs(teacher, ids: torch.Tensor, batch_size: int):
    """Per batch, the teacher's fp32 log-probs [B, T, V] (position t predicts token t + 1; the last is unused),
    its logits dropped as soon as they are normalized."""
    import torch

    device = next(teacher.parameters()).device
    with torch.no_grad():
        for batch in batches(ids, batch_size):
            logits = teacher(input_ids=batch.to(device), use_cache=False).logits
            logp = torch.log_softmax(logits.float(), -1)  # whole rows: a slice would be copied first
            del logits
            yield logp
            del logp


#: Positions whose KL terms are computed at once (their [positions, vocab] working tensors).
KL_CHUNK = 64


def _kl(student, ids: torch.Tensor, teacher_logp, batch_size: int) -> float:
    """Mean per predicted token of KL(teacher || student); `teacher_logp` yields per-batch fp32 log-probs [B, T, V].
    One batch's student logits and teacher log-probs are held at a time, and the working tensors of KL_CHUNK
    positions (views into both: no copy of a batch)."""
    import torch

    device = next(student.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        logps = iter(teacher_logp)  # not zip(): its result tuple would hold the last batch's during the next
        for batch in batches(ids, batch_size):
            t_logp = next(logps)
            logits = student(input_ids=batch.to(device), use_cache=False).logits
            n, length = logits.shape[0], logits.shape[1] - 1  # the last position predicts nothing here
            for row in range(n):
                for i in range(0, length, KL_CHUNK):
                    j = min(i + KL_CHUNK, length)
                    total += _kl_sum(logits[row, i:j], t_logp[row, i:j])
            count += n * length
            del logits, t_logp  # before the next batch's teacher forward, and what the allocator kept of them
            release_freed_memory()
        # run the generator to its end here, inside this no_grad: left suspended in its own no_grad block, closing it
        # later would restore the grad mode it found (off) wherever that happens
        if next(logps, None) is not None:
            raise ValueError("teacher_logp has more batches than the calibration ids")
    return total / count


def _kl_sum(s_logits: torch.Tensor, t_logp: torch.Tensor) -> float:
    """Sum over positions of KL(teacher || student) from the student's logits and the teacher's log-probs."""
    import torch

    s = torch.log_softmax(s_logits.float(), -1)
    return (t_logp.exp() * (t_logp - s)).sum().item()


def proxy_value(student, ids: torch.Tensor, proxy: str, *, teacher=None, teacher_logp=None,
                batch_size: int = PROXY_BATCH_SIZE) -> float:
    """The budget proxy of `student` on calibration `ids`: its calibration loss ("loss"), or the mean per-token
    KL(teacher || student) ("kl": `teacher_logp`, the teacher's cached per-batch log-probs, else `teacher` runs)."""
    if proxy == "loss":
        return float(calibration_loss(student, ids, batch_size=batch_size))
    logp = teacher_logp if teacher_logp is not None else _teacher_logprobs(teacher, ids, batch_size)
    return float(_kl(student, ids, logp, batch_size))


def _measure(model, scores: ImportanceScores, candidate: dict[str, Any], calibration: torch.Tensor, *,
             proxy: str, opts: dict[str, Any], teacher_logp, batch_size: int,
             repair_ids: torch.Tensor | None = None, stored: str = "float32") -> dict[str, Any]:
    """Prune `model` to one candidate's shape (and repair it on `repair_ids` when ``opts["repair"]`` is set) and
    measure the proxy: {**candidate, "proxy", "proxy_value"} (+ "repaired": True)."""
    import torch

    from compactlm.weights import computing_in

    cfg = PruneConfig(**candidate["shape"], **opts)
    student, _ = prune_model(model, scores, cfg, dtype=torch.float32)
    with computing_in(model):  # a teacher loaded as stored runs as its fp32 copy would (no-op for an fp32 one)
        if cfg.repair is not None:
            from compactlm.pruning.repair import reconstruct

            reconstruct(model, student, plan_pruning(model.config, scores, cfg),
                        calibration if repair_ids is None else repair_ids, damping=cfg.repair.damping,
                        max_memory_gb=cfg.repair.max_memory_gb)
        _as_published(student, stored)
        value = proxy_value(student, calibration, proxy, teacher=model, teacher_logp=teacher_logp,
                            batch_size=batch_size)
    del student
    return {**candidate, "proxy": proxy, "proxy_value": float(value),
            **({"repaired": True} if cfg.repair is not None else {})}


def _as_published(student, stored: str) -> None:
    """`student`'s weights (in place) rounded once to the teacher's stored dtype, as the prune stage publishes
    them, and kept in fp32 for measuring: a candidate pruned from the fp32 teacher and one pruned from the teacher
    loaded as stored (a fan-out task's, :func:`measure_candidate`) are then the same tensors. Parameters only:
    computed buffers (RoPE frequencies) stay exact."""
    import torch

    if stored != "float32":
        with torch.no_grad():
            for p in student.parameters():
                p.data = p.data.to(getattr(torch, stored)).float()


def repair_ids(calibration: torch.Tensor | str | os.PathLike, model_dir: str | os.PathLike, cfg: PruneConfig, *,
               seed: int = 0) -> torch.Tensor | None:
    """With ``cfg.repair``, the ids a student is repaired on: the repair's ``num_samples`` x ``seq_len`` from
    `calibration` drawn with `seed` (a tensor of ids is used as is). None without a repair. The published student
    is repaired on the draw of the stage's seed; its callers pass ``seed + 1`` for budget candidates, so that their
    fit is not scored on the proxy's own rows (drawn with the stage's seed)."""
    import torch

    if cfg.repair is None:
        return None
    if isinstance(calibration, torch.Tensor):
        return calibration
    from compactlm.calibration import calibration_ids
    from compactlm.models import load_tokenizer

    return calibration_ids(calibration, load_tokenizer(model_dir), num_samples=cfg.repair.num_samples,
                           seq_len=cfg.repair.seq_len, seed=seed)


def _check_proxy_inputs(proxy: str, calibration: torch.Tensor) -> None:
    if proxy not in PROXY_CHOICES:
        raise ValueError(f"prune.proxy must be 'loss' or 'kl', got {proxy!r}")
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration ids must be [num_samples, seq_len >= 2], got {tuple(calibration.shape)}")


def rank_measured(measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured candidates (each with "proxy_value"), in pool order, as a ranking: new dicts with "rank"
    (1 = best = lowest proxy), sorted best first; ties keep the given order. Candidates measured again after a
    short distillation ("distilled_value", :mod:`compactlm.candidates`) come first, by that value.
    This is the one ordering both :func:`score_candidates` and a fan-out over :func:`measure_candidate` use, so
    they pick the same shape."""
    missing = [i for i, c in enumerate(measured) if "proxy_value" not in c or "shape" not in c]
    if missing:
        raise ValueError(f"candidates {missing} have no 'shape'/'proxy_value': measure them first "
                         "(measure_candidate / score_candidates)")
    out = sorted(measured, key=lambda c: (0, c["distilled_value"]) if "distilled_value" in c
                 else (1, c["proxy_value"]))  # stable
    return [{**c, "rank": r} for r, c in enumerate(out, start=1)]


def score_candidates(model, scores: ImportanceScores, candidates: list[dict[str, Any]], calibration: torch.Tensor,
                     *, proxy: str = "loss", base: PruneConfig | None = None, batch_size: int = PROXY_BATCH_SIZE,
                     repair_calibration: torch.Tensor | None = None, stored: str = "float32") -> list[dict[str, Any]]:
    """Prune `model` to each candidate's shape and measure the proxy on `calibration` ids [N, T].

    proxy "loss": mean next-token cross-entropy of the pruned model; "kl": mean per-token KL(teacher ||
    student) (teacher log-probs are computed once and cached in fp32 when they fit in 1 GiB, else recomputed).
    `base` supplies layer_metric / rescale_norms / repair: with ``base.repair`` each candidate is repaired (on
    `repair_calibration`, default `calibration`) before it is measured, so the ranking is of what the prune stage
    publishes; each candidate's weights are rounded to `stored` (the teacher's stored dtype, as the stage publishes
    them) and measured in fp32. Returns new dicts with "proxy", "proxy_value" and "rank" (1 = best), sorted best
    first (ties keep the given order). `model` is not modified.
    """
    _check_proxy_inputs(proxy, calibration)
    base = base or PruneConfig()
    opts = {"layer_metric": base.layer_metric, "rescale_norms": base.rescale_norms, "repair": base.repair}
    teacher_logp: list | None = None
    if proxy == "kl":
        n, t = calibration.shape
        if n * t * model.config.vocab_size * 4 <= TEACHER_CACHE_BYTES:
            teacher_logp = list(_teacher_logprobs(model, calibration, batch_size))
    return rank_measured([_measure(model, scores, c, calibration, proxy=proxy, opts=opts, teacher_logp=teacher_logp,
                                   batch_size=batch_size, repair_ids=repair_calibration, stored=stored)
                          for c in candidates])


def calibration_tensor(calibration: torch.Tensor | str | os.PathLike, model_dir: str | os.PathLike,
                       cfg: PruneConfig, *, seed: int = 0) -> torch.Tensor:
    """`calibration` as ids [N, T]: a tensor is used as is; a generated dataset dir or .txt/.jsonl file is
    tokenized with `model_dir`'s tokenizer into ``cfg.budget.proxy_samples`` x ``cfg.budget.proxy_seq_len`` ids."""
    import torch

    if isinstance(calibration, torch.Tensor):
        return calibration
    from compactlm.calibration import calibration_ids
    from compactlm.models import load_tokenizer

    if not Path(calibration).exists():
        raise ValueError(f"calibration data not found: {str(calibration)!r} (give a generated dataset dir, a "
                         ".txt/.jsonl file or a tensor of token ids)")
    budget = _budget(cfg)
    return calibration_ids(calibration, load_tokenizer(model_dir), num_samples=budget.proxy_samples,
                           seq_len=budget.proxy_seq_len, seed=seed)


def _budget(cfg: PruneConfig):
    if cfg.budget is None:
        raise ValueError("prune.budget is not set: ranking candidates needs a parameter budget (e.g. "
                         "budget: {params: 0.5})")
    return cfg.budget


def candidate_pool(config: Any, scores: ImportanceScores | None, cfg: PruneConfig) -> list[dict[str, Any]]:
    """The first ``cfg.budget.search`` candidates for ``cfg.budget.params`` that are valid student configs
    (validated against `scores` too when given). Raises ValueError when the budget is unset or nothing fits."""
    budget = _budget(cfg)
    pool = []
    for c in candidate_shapes(config, budget.params, max_per_kind=budget.search):
        explicit = PruneConfig(**c["shape"], layer_metric=cfg.layer_metric, rescale_norms=cfg.rescale_norms)
        try:
            target_shape(config, explicit)
        except ValueError:
            continue  # not a valid config for this architecture (should not happen with the grids above)
        pool.append(c)
        if len(pool) == budget.search:
            break
    if not pool:
        raise ValueError(f"prune.budget.params={budget.params}: no candidate shape is a valid {config.model_type} "
                         "config")
    if scores is not None:  # scores match the model (shapes, layer_metric): fail fast
        plan_pruning(config, scores, PruneConfig(**pool[0]["shape"], layer_metric=cfg.layer_metric))
    return pool


def rank_candidates(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                    calibration: torch.Tensor | str | os.PathLike, *, device: str = "cpu",
                    seed: int = 0) -> list[dict[str, Any]]:
    """Rank the shapes that fit ``cfg.budget.params`` for the teacher in `model_dir`; return the best
    ``cfg.budget.candidates``.

    Up to ``budget.search`` candidates (depth-only, width-only and mixed; see :func:`candidate_shapes`) are each
    pruned with the scores in `scores_dir` and measured by ``budget.proxy`` on `calibration` (ids [N, T], or a
    generated dataset dir / text file, tokenized to ``budget.proxy_samples`` x ``budget.proxy_seq_len``). Each item:
    {"rank", "kind", "shape", "params", "param_ratio", "proxy", "proxy_value"}, best (lowest proxy) first;
    ``PruneConfig(**item["shape"])`` or ``prune_to_dir(..., shape=item["shape"])`` prunes to it. The teacher
    runs in fp32 on `device`. Raises ValueError (before loading the model) when params is unset or no shape
    fits.
    """
    return _rank_dir(model_dir, scores_dir, cfg, calibration, device=device, seed=seed)[:_budget(cfg).candidates]


def _rank_dir(model_dir, scores_dir, cfg: PruneConfig, calibration, *, device: str = "cpu", seed: int = 0,
              model=None) -> list[dict[str, Any]]:
    """All ranked pool candidates; loads the teacher unless `model` (fp32) is given."""
    from compactlm.formats.scores import load_scores
    from compactlm.models import load_model

    scores, config = load_scores(scores_dir), _config(model_dir)
    pool = candidate_pool(config, scores, cfg)
    ids = calibration_tensor(calibration, model_dir, cfg, seed=seed)
    if model is None:
        model = load_model(model_dir, dtype="float32", device=device)
    return score_candidates(model, scores, pool, ids, proxy=cfg.budget.proxy, base=cfg,
                            repair_calibration=repair_ids(calibration, model_dir, cfg, seed=seed + 1),
                            stored=stored_dtype(config))


def _config(model_dir) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=False)


def plan_candidates(model_dir: str | os.PathLike, scores_dir: str | os.PathLike,
                    cfg: PruneConfig) -> list[dict[str, Any]]:
    """The candidate pool :func:`rank_candidates` would measure for `model_dir` (config.json and the scores
    only, no weights): the units of a fan-out. Each item: {"kind", "shape", "params", "param_ratio"}.
    Raises ValueError when ``cfg.budget`` is unset, no shape fits or the scores do not match the model."""
    from compactlm.formats.scores import load_scores

    _budget(cfg)
    return candidate_pool(_config(model_dir), load_scores(scores_dir), cfg)


def measure_candidate(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                      calibration: torch.Tensor | str | os.PathLike, candidate: dict[str, Any], *,
                      device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """One fan-out unit: load the teacher (as stored, on `device`), prune it to ``candidate["shape"]`` and measure
    ``cfg.budget.proxy`` on `calibration` (tokenized exactly as :func:`rank_candidates` does, with `seed`).

    Returns ``{**candidate, "proxy", "proxy_value"}`` (JSON-serializable, no rank). Gathering the results for
    every item of :func:`plan_candidates`, in pool order, and passing them to :func:`rank_measured` gives the
    same ranking as :func:`rank_candidates` (``prune_to_dir(..., ranking=...)`` then prunes to its first).
    Each call loads the teacher itself, in the dtype it is stored in (parallel calls share its file's pages; only
    each candidate is fp32): the KL proxy's and a repair's teacher forwards run it as its fp32 copy would, one
    module's weights converted at a time (:func:`compactlm.weights.computing_in`), so the results are those of
    the sequential path's fp32 teacher.
    """
    from compactlm.formats.scores import load_scores
    from compactlm.models import load_model

    if not isinstance(candidate, dict) or not isinstance(candidate.get("shape"), dict):
        raise ValueError(f"candidate must be an item of plan_candidates() with a 'shape' dict, got {candidate!r}")
    unknown = set(candidate["shape"]) - set(SHAPE_FIELDS)
    if unknown:
        raise ValueError(f"candidate shape has unknown fields {sorted(unknown)}; allowed: {list(SHAPE_FIELDS)}")
    ids = calibration_tensor(calibration, model_dir, cfg, seed=seed)
    _check_proxy_inputs(_budget(cfg).proxy, ids)
    scores = load_scores(scores_dir)
    stored = stored_dtype(_config(model_dir))
    model = load_model(model_dir, dtype=stored, device=device)  # (MODEL_BUILD_LOCK: tasks load one at a time)
    opts = {"layer_metric": cfg.layer_metric, "rescale_norms": cfg.rescale_norms, "repair": cfg.repair}
    return _measure(model, scores, candidate, ids, proxy=cfg.budget.proxy, opts=opts, teacher_logp=None,
                    batch_size=PROXY_BATCH_SIZE, repair_ids=repair_ids(calibration, model_dir, cfg, seed=seed + 1),
                    stored=stored)
