"""Parameter budgets: count a shape's parameters, enumerate student shapes that fit, rank them by a proxy.

* :func:`param_count` — a shape's parameters, analytically (equals ``count_params`` of the pruned model).
* :func:`candidate_shapes` — depth-only, width-only and mixed shapes whose parameter count is within
  ``slack`` below the budget; per kind one representative per *profile* (which dimensions are cut, and for
  mixed shapes how much depth is cut), so the pool is small and diverse.
* :func:`rank_candidates` — prune the teacher to each candidate and rank them by a cheap proxy measured right
  after pruning (before any distillation): the calibration loss, or KL(teacher || student).
* Fan-out (one unit of work per candidate, e.g. one Prefect task each): :func:`plan_candidates` lists the pool
  from the directories (no weights loaded), :func:`measure_candidate` prunes and measures one candidate on its
  own, :func:`rank_measured` orders the gathered results. Together they give exactly what
  :func:`rank_candidates` gives (same pool, same per-candidate computation, same stable sort).

Width grids: hidden sizes are multiples of the student's head count (transformers' Llama requires
``hidden_size % num_attention_heads == 0``) and of 8; MLP sizes multiples of 8 (64 for large MLPs); heads
multiples of the KV heads. Each width dimension keeps at least a quarter of the teacher's size. For a given
width the deepest stack that fits is taken (fewer layers at the same width only lose capacity).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from compactlm.config import PruneConfig
from compactlm.importance.arch import check_arch
from compactlm.pruning.prune import SHAPE_FIELDS, shape_kind, shape_of

if TYPE_CHECKING:
    import torch

    from compactlm.importance.scores import ImportanceScores

KINDS = ("depth", "width", "mixed")
MIN_WIDTH_FRACTION = 0.25
PROXY_BATCH_SIZE = 4
TEACHER_CACHE_BYTES = 1 << 30  # KL proxy: cache the teacher's fp32 log-probs up to this size, else recompute
_LOAD_LOCK = threading.Lock()  # one model load at a time per process (measure_candidate in threads)


def _counter(config: Any) -> Callable[[int, int, int, int], tuple[int, int]]:
    """(hidden, intermediate, heads) -> (fixed params, params per layer), for `config`'s architecture."""
    arch = check_arch(config)
    t = shape_of(config)
    kv, hd, V = t["num_key_value_heads"], t["head_dim"], config.vocab_size
    attn_bias = arch == "qwen2" or bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def count(D: int, I: int, H: int) -> tuple[int, int]:
        attn = D * H * hd + 2 * D * kv * hd + H * hd * D
        if attn_bias:
            attn += H * hd + 2 * kv * hd + (D if arch != "qwen2" else 0)
        if arch == "qwen3":
            attn += 2 * hd
        mlp = 3 * D * I + ((2 * I + D) if mlp_bias else 0)
        return V * D * (1 if tied else 2) + D, attn + mlp + 2 * D

    return count


def param_count(config: Any, shape: dict[str, int] | None = None) -> int:
    """Parameters of `config`'s architecture at `shape` (default: its own), tied embeddings counted once."""
    s = {**shape_of(config), **(shape or {})}
    fixed, per_layer = _counter(config)(s["hidden_size"], s["intermediate_size"], s["num_attention_heads"])
    return fixed + s["num_hidden_layers"] * per_layer


def _multiples(full: int, step: int) -> list[int]:
    """Multiples of `step` in [MIN_WIDTH_FRACTION * full, full], plus `full` itself (descending)."""
    lo = math.ceil(MIN_WIDTH_FRACTION * full)
    vals = {v for v in range(step, full + 1, step) if v >= lo} | {full}
    return sorted(vals, reverse=True)


def _mlp_step(full: int) -> int:
    return 64 if full >= 1024 else 8 if full >= 64 else 1


def _hidden_grid(full: int, heads: int) -> list[int]:
    align = 8 if full >= 64 else 1
    step = heads * align // math.gcd(heads, align)
    step = max(step, math.ceil(full / 64 / step) * step)  # at most ~48 sizes for very wide models
    return [d for d in _multiples(full, step) if d % heads == 0]


def _balance(shape: dict[str, int], teacher: dict[str, int]) -> float:
    return min(shape[k] / teacher[k] for k in SHAPE_FIELDS)


def candidate_shapes(config: Any, budget: float, *, max_per_kind: int = 3, slack: float = 0.05,
                     scores: ImportanceScores | None = None, model=None, calibration: torch.Tensor | None = None,
                     batch_size: int = PROXY_BATCH_SIZE) -> list[dict[str, Any]]:
    """Student shapes with at most ``budget`` x the teacher's parameters, at most `max_per_kind` per kind.

    Kinds: "depth" (layers only), "width" (hidden / heads / MLP), "mixed" (both). A shape qualifies when its
    parameter ratio is in [r - slack, r], r = the largest ratio <= budget any shape reaches. Within a kind one
    representative per profile (the set of cut dimensions, and for mixed shapes the quarter of depth cut) is
    kept, the one maximizing (smallest kept fraction of any dimension) + (parameter ratio); profiles are then
    ordered by the same key. The result interleaves the kinds (depth, width, mixed, width, mixed, ...), so any
    prefix covers every kind that fits.

    Each item: {"kind", "shape" (the four PruneConfig shape fields), "params", "param_ratio"}. With `model`,
    `scores` and `calibration` ids each is also pruned and scored (key "proxy_value", proxy "loss") and the
    list is sorted best first (see :func:`score_candidates`). Raises ValueError when no shape fits.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"prune.params must be a fraction of the teacher's parameters in (0, 1), got {budget}")
    t = shape_of(config)
    count = _counter(config)
    total = param_count(config)
    hi = budget * total
    L_t, kv = t["num_hidden_layers"], t["num_key_value_heads"]
    teacher_width = (t["hidden_size"], t["intermediate_size"], t["num_attention_heads"])
    found: list[tuple[int, dict[str, int]]] = []
    for h in range(t["num_attention_heads"], kv - 1, -kv):
        for d in _hidden_grid(t["hidden_size"], h):
            for i in _multiples(t["intermediate_size"], _mlp_step(t["intermediate_size"])):
                fixed, per_layer = count(d, i, h)
                n_layers = min(L_t, int((hi - fixed) // per_layer))
                if n_layers < 1 or (n_layers == L_t and (d, i, h) == teacher_width):
                    continue
                found.append((fixed + n_layers * per_layer, {"num_hidden_layers": n_layers, "hidden_size": d,
                                                             "intermediate_size": i, "num_attention_heads": h}))
    if not found:
        smallest = {"num_hidden_layers": 1, "hidden_size": _hidden_grid(t["hidden_size"], kv)[-1],
                    "intermediate_size": _multiples(t["intermediate_size"], _mlp_step(t["intermediate_size"]))[-1],
                    "num_attention_heads": kv}
        floor = param_count(config, smallest) / total
        raise ValueError(f"prune.params={budget}: no student shape fits this budget; the smallest shape pruning "
                         f"can reach ({smallest}) keeps {floor:.3f} of the teacher's {total:,} parameters "
                         f"(at full width the embeddings alone are {count(t['hidden_size'], 0, 0)[0] / total:.1%}); "
                         f"set prune.params to at least {math.ceil(floor * 1000) / 1000}")
    lo = max(p for p, _ in found) - slack * total
    groups: dict[str, dict[tuple, tuple[float, dict[str, Any]]]] = {k: {} for k in KINDS}
    for p, shape in found:
        if p < lo:
            continue
        cut = tuple(k for k in SHAPE_FIELDS if shape[k] < t[k])
        kind = shape_kind(shape, t)
        profile = cut + ((int(4 * (1 - shape["num_hidden_layers"] / L_t)),) if kind == "mixed" else ())
        key = _balance(shape, t) + p / total
        best = groups[kind].get(profile)
        if best is None or key > best[0]:
            groups[kind][profile] = (key, {"kind": kind, "shape": shape, "params": p, "param_ratio": p / total})
    per_kind = [[c for _, c in sorted(g.values(), key=lambda kc: -kc[0])][:max_per_kind] for g in groups.values()]
    out = [c for row in _interleave(per_kind) for c in row]
    if model is not None and scores is not None and calibration is not None:
        out = score_candidates(model, scores, out, calibration, proxy="loss", batch_size=batch_size)
        for c in out:
            c["proxy_loss"] = c["proxy_value"]
    return out


def _interleave(lists: list[list[Any]]) -> list[list[Any]]:
    return [[lst[i] for lst in lists if i < len(lst)] for i in range(max(map(len, lists), default=0))]


def _batches(ids: torch.Tensor, batch_size: int):
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i:i + batch_size]


def _teacher_logprobs(teacher, ids: torch.Tensor, batch_size: int):
    """Per batch, the teacher's fp32 log-probs [B, T-1, V] at the predicted positions."""
    import torch

    device = next(teacher.parameters()).device
    with torch.no_grad():
        for batch in _batches(ids, batch_size):
            logits = teacher(input_ids=batch.to(device), use_cache=False).logits[:, :-1]
            yield torch.log_softmax(logits.float(), -1)


def _kl(student, ids: torch.Tensor, teacher_logp, batch_size: int) -> float:
    """Mean per predicted token of KL(teacher || student); `teacher_logp` yields per-batch fp32 log-probs."""
    import torch

    device = next(student.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, t_logp in zip(_batches(ids, batch_size), teacher_logp, strict=True):
            logits = student(input_ids=batch.to(device), use_cache=False).logits[:, :-1]
            for s_row, t_row in zip(logits, t_logp):
                s, t = torch.log_softmax(s_row.float(), -1), t_row
                total += (t.exp() * (t - s)).sum().item()
                count += s_row.shape[0]
    return total / count


def _measure(model, scores: ImportanceScores, candidate: dict[str, Any], calibration: torch.Tensor, *,
             proxy: str, opts: dict[str, Any], teacher_logp, batch_size: int) -> dict[str, Any]:
    """Prune `model` to one candidate's shape and measure the proxy: {**candidate, "proxy", "proxy_value"}."""
    from compactlm.importance.compute import calibration_loss
    from compactlm.pruning.prune import prune_model

    student, _ = prune_model(model, scores, PruneConfig(**candidate["shape"], **opts))
    if proxy == "loss":
        value = calibration_loss(student, calibration, batch_size=batch_size)
    else:
        logp = teacher_logp if teacher_logp is not None else _teacher_logprobs(model, calibration, batch_size)
        value = _kl(student, calibration, logp, batch_size)
    del student
    return {**candidate, "proxy": proxy, "proxy_value": float(value)}


def _check_proxy_inputs(proxy: str, calibration: torch.Tensor) -> None:
    if proxy not in ("loss", "kl"):
        raise ValueError(f"prune.proxy must be 'loss' or 'kl', got {proxy!r}")
    if calibration.ndim != 2 or calibration.shape[1] < 2:
        raise ValueError(f"calibration ids must be [num_samples, seq_len >= 2], got {tuple(calibration.shape)}")


def rank_measured(measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured candidates (each with "proxy_value"), in pool order, as a ranking: new dicts with "rank"
    (1 = best = lowest proxy), sorted best first; ties keep the given order. This is the one ordering both
    :func:`score_candidates` and a fan-out over :func:`measure_candidate` use, so they pick the same shape."""
    missing = [i for i, c in enumerate(measured) if "proxy_value" not in c or "shape" not in c]
    if missing:
        raise ValueError(f"candidates {missing} have no 'shape'/'proxy_value': measure them first "
                         "(measure_candidate / score_candidates)")
    out = sorted(measured, key=lambda c: c["proxy_value"])  # stable
    return [{**c, "rank": r} for r, c in enumerate(out, start=1)]


def score_candidates(model, scores: ImportanceScores, candidates: list[dict[str, Any]], calibration: torch.Tensor,
                     *, proxy: str = "loss", base: PruneConfig | None = None,
                     batch_size: int = PROXY_BATCH_SIZE) -> list[dict[str, Any]]:
    """Prune `model` to each candidate's shape and measure the proxy on `calibration` ids [N, T].

    proxy "loss": mean next-token cross-entropy of the pruned model; "kl": mean per-token KL(teacher ||
    student) (teacher log-probs are computed once and cached in fp32 when they fit in 1 GiB, else recomputed).
    `base` supplies layer_metric / rescale_norms. Returns new dicts with "proxy", "proxy_value" and "rank"
    (1 = best), sorted best first (ties keep the given order). `model` is not modified.
    """
    _check_proxy_inputs(proxy, calibration)
    base = base or PruneConfig()
    opts = {"layer_metric": base.layer_metric, "rescale_norms": base.rescale_norms}
    teacher_logp: list | None = None
    if proxy == "kl":
        n, t = calibration.shape
        if n * (t - 1) * model.config.vocab_size * 4 <= TEACHER_CACHE_BYTES:
            teacher_logp = list(_teacher_logprobs(model, calibration, batch_size))
    return rank_measured([_measure(model, scores, c, calibration, proxy=proxy, opts=opts,
                                   teacher_logp=teacher_logp, batch_size=batch_size) for c in candidates])


def calibration_tensor(calibration: torch.Tensor | str | os.PathLike, model_dir: str | os.PathLike,
                       cfg: PruneConfig, *, seed: int = 0) -> torch.Tensor:
    """`calibration` as ids [N, T]: a tensor is used as is; a generated dataset dir or .txt/.jsonl file is
    tokenized with `model_dir`'s tokenizer into ``cfg.proxy_samples`` x ``cfg.proxy_seq_len`` ids."""
    import torch

    if isinstance(calibration, torch.Tensor):
        return calibration
    from compactlm.datasets import calibration_ids
    from compactlm.models import load_tokenizer

    if not Path(calibration).exists():
        raise ValueError(f"calibration data not found: {str(calibration)!r} (give a generated dataset dir, a "
                         ".txt/.jsonl file or a tensor of token ids)")
    return calibration_ids(calibration, load_tokenizer(model_dir), num_samples=cfg.proxy_samples,
                           seq_len=cfg.proxy_seq_len, seed=seed)


def candidate_pool(config: Any, scores: ImportanceScores | None, cfg: PruneConfig) -> list[dict[str, Any]]:
    """The first ``cfg.search`` candidates for ``cfg.params`` that are valid student configs (validated
    against `scores` too when given). Raises ValueError when params is unset or nothing fits."""
    from compactlm.pruning.prune import plan_pruning, target_shape

    if cfg.params is None:
        raise ValueError("prune.params is not set: ranking candidates needs a parameter budget (e.g. 0.5)")
    pool = []
    for c in candidate_shapes(config, cfg.params, max_per_kind=cfg.search):
        explicit = PruneConfig(**c["shape"], layer_metric=cfg.layer_metric, rescale_norms=cfg.rescale_norms)
        try:
            target_shape(config, explicit)
        except ValueError:
            continue  # not a valid config for this architecture (should not happen with the grids above)
        pool.append(c)
        if len(pool) == cfg.search:
            break
    if not pool:
        raise ValueError(f"prune.params={cfg.params}: no candidate shape is a valid {config.model_type} config")
    if scores is not None:  # scores match the model (shapes, layer_metric): fail fast
        plan_pruning(config, scores, PruneConfig(**pool[0]["shape"], layer_metric=cfg.layer_metric))
    return pool


def rank_candidates(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                    calibration: torch.Tensor | str | os.PathLike, *, device: str = "cpu",
                    seed: int = 0) -> list[dict[str, Any]]:
    """Rank the shapes that fit ``cfg.params`` for the teacher in `model_dir`; return the best ``cfg.candidates``.

    Up to ``cfg.search`` candidates (depth-only, width-only and mixed; see :func:`candidate_shapes`) are each
    pruned with the scores in `scores_dir` and measured by ``cfg.proxy`` on `calibration` (ids [N, T], or a
    generated dataset dir / text file, tokenized to ``cfg.proxy_samples`` x ``cfg.proxy_seq_len``). Each item:
    {"rank", "kind", "shape", "params", "param_ratio", "proxy", "proxy_value"}, best (lowest proxy) first;
    ``PruneConfig(**item["shape"])`` or ``prune_to_dir(..., shape=item["shape"])`` prunes to it. The teacher
    runs in fp32 on `device`. Raises ValueError (before loading the model) when params is unset or no shape
    fits.
    """
    return _rank_dir(model_dir, scores_dir, cfg, calibration, device=device, seed=seed)[:cfg.candidates]


def _rank_dir(model_dir, scores_dir, cfg: PruneConfig, calibration, *, device: str = "cpu", seed: int = 0,
              model=None) -> list[dict[str, Any]]:
    """All ranked pool candidates; loads the teacher unless `model` (fp32) is given."""
    from compactlm.importance.scores import load_scores
    from compactlm.models import load_model

    scores = load_scores(scores_dir)
    pool = _pool_from_dirs(model_dir, scores, cfg)
    ids = calibration_tensor(calibration, model_dir, cfg, seed=seed)
    if model is None:
        model = load_model(model_dir, dtype="float32", device=device)
    return score_candidates(model, scores, pool, ids, proxy=cfg.proxy, base=cfg)


def _pool_from_dirs(model_dir, scores: ImportanceScores, cfg: PruneConfig) -> list[dict[str, Any]]:
    from transformers import AutoConfig

    return candidate_pool(AutoConfig.from_pretrained(model_dir, trust_remote_code=False), scores, cfg)


def plan_candidates(model_dir: str | os.PathLike, scores_dir: str | os.PathLike,
                    cfg: PruneConfig) -> list[dict[str, Any]]:
    """The candidate pool :func:`rank_candidates` would measure for `model_dir` (config.json and the scores
    only, no weights): the units of a fan-out. Each item: {"kind", "shape", "params", "param_ratio"}.
    Raises ValueError when ``cfg.params`` is unset, no shape fits or the scores do not match the model."""
    from compactlm.importance.scores import load_scores

    if cfg.params is None:
        raise ValueError("prune.params is not set: ranking candidates needs a parameter budget (e.g. 0.5)")
    return _pool_from_dirs(model_dir, load_scores(scores_dir), cfg)


def measure_candidate(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                      calibration: torch.Tensor | str | os.PathLike, candidate: dict[str, Any], *,
                      device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """One fan-out unit: load the teacher (fp32, on `device`), prune it to ``candidate["shape"]`` and measure
    ``cfg.proxy`` on `calibration` (tokenized exactly as :func:`rank_candidates` does, with `seed`).

    Returns ``{**candidate, "proxy", "proxy_value"}`` (JSON-serializable, no rank). Gathering the results for
    every item of :func:`plan_candidates`, in pool order, and passing them to :func:`rank_measured` gives the
    same ranking as :func:`rank_candidates` (``prune_to_dir(..., ranking=...)`` then prunes to its first).
    Each call loads the teacher itself: parallel calls hold one teacher copy each.
    """
    from compactlm.importance.scores import load_scores
    from compactlm.models import load_model

    if not isinstance(candidate, dict) or not isinstance(candidate.get("shape"), dict):
        raise ValueError(f"candidate must be an item of plan_candidates() with a 'shape' dict, got {candidate!r}")
    unknown = set(candidate["shape"]) - set(SHAPE_FIELDS)
    if unknown:
        raise ValueError(f"candidate shape has unknown fields {sorted(unknown)}; allowed: {list(SHAPE_FIELDS)}")
    ids = calibration_tensor(calibration, model_dir, cfg, seed=seed)
    _check_proxy_inputs(cfg.proxy, ids)
    scores = load_scores(scores_dir)
    with _LOAD_LOCK:  # transformers' from_pretrained is not thread-safe (process-global meta-device init)
        model = load_model(model_dir, dtype="float32", device=device)
    opts = {"layer_metric": cfg.layer_metric, "rescale_norms": cfg.rescale_norms}
    return _measure(model, scores, candidate, ids, proxy=cfg.proxy, opts=opts, teacher_logp=None,
                    batch_size=PROXY_BATCH_SIZE)
