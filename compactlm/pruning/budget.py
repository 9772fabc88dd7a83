"""Parameter budgets: count a shape's parameters analytically and enumerate shapes that fit a budget.

:func:`candidate_shapes` lists width-only, depth-only and mixed student shapes whose parameter count is at most
``budget`` x the teacher's (and close to it), and, given a model, its scores and calibration ids, ranks them by
a cheap proxy: the calibration loss right after pruning (before any distillation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compactlm.config import PruneConfig
from compactlm.importance.arch import check_arch
from compactlm.pruning.prune import SHAPE_FIELDS, shape_of

if TYPE_CHECKING:
    import torch

    from compactlm.importance.scores import ImportanceScores


def param_count(config: Any, shape: dict[str, int] | None = None) -> int:
    """Parameters of `config`'s architecture at `shape` (default: its own), tied embeddings counted once."""
    arch = check_arch(config)
    s = {**shape_of(config), **(shape or {})}
    L, D, I, H = s["num_hidden_layers"], s["hidden_size"], s["intermediate_size"], s["num_attention_heads"]
    kv, hd, V = s["num_key_value_heads"], s["head_dim"], config.vocab_size
    attn = D * H * hd + 2 * D * kv * hd + H * hd * D
    if arch == "qwen2" or getattr(config, "attention_bias", False):
        attn += H * hd + 2 * kv * hd + (D if arch != "qwen2" else 0)
    if arch == "qwen3":
        attn += 2 * hd
    mlp = 3 * D * I + ((2 * I + D) if getattr(config, "mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * D
    embed = V * D * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return embed + L * per_layer + D


def _grid(full: int, step: int, lo_frac: float = 0.25) -> list[int]:
    vals = {v for v in range(step, full + 1, step) if v >= lo_frac * full}
    return sorted(vals | {full})


def candidate_shapes(config: Any, budget: float, *, scores: ImportanceScores | None = None, model=None,
                     calibration: torch.Tensor | None = None, max_per_kind: int = 3, batch_size: int = 8,
                     slack: float = 0.1) -> list[dict[str, Any]]:
    """Shapes with params in [budget - slack, budget] x teacher params, best `max_per_kind` of each kind.

    kinds: "depth" (layers only), "width" (hidden / heads / MLP), "mixed" (both). Without a model, candidates
    closest to the budget come first; with `model`, `scores` and `calibration` ids each is pruned and ranked
    by calibration loss (key "proxy_loss", lower first). Each item: {"kind", "shape" (PruneConfig fields),
    "params", "fraction"}.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"prune.params must be a fraction of the teacher's parameters in (0, 1], got {budget}")
    t = shape_of(config)
    total = param_count(config)
    lo, hi = (budget - slack) * total, budget * total
    kv = t["num_key_value_heads"]
    layers = list(range(1, t["num_hidden_layers"] + 1))
    hiddens = _grid(t["hidden_size"], 64 if t["hidden_size"] >= 256 else 8)
    mlps = _grid(t["intermediate_size"], 64 if t["intermediate_size"] >= 256 else 8)
    heads = [h for h in range(kv, t["num_attention_heads"] + 1, kv)]
    found: dict[str, list[dict[str, Any]]] = {"depth": [], "width": [], "mixed": []}
    for n_layers in layers:
        for d in hiddens:
            for i in mlps:
                for h in heads:
                    shape = {"num_hidden_layers": n_layers, "hidden_size": d, "intermediate_size": i,
                             "num_attention_heads": h}
                    p = param_count(config, shape)
                    if not lo <= p <= hi:
                        continue
                    deep = n_layers < t["num_hidden_layers"]
                    wide = (d, i, h) != (t["hidden_size"], t["intermediate_size"], t["num_attention_heads"])
                    kind = "mixed" if deep and wide else "depth" if deep else "width"
                    found[kind].append({"kind": kind, "shape": shape, "params": p, "fraction": p / total})
    out = []
    for kind, items in found.items():
        # closest to the budget first; among equals prefer balanced shapes (fewer cuts of any one dimension)
        items.sort(key=lambda c: (-c["params"], -min(c["shape"][k] / t[k] for k in SHAPE_FIELDS)))
        out += items[:max_per_kind]
    if model is not None and scores is not None and calibration is not None:
        from compactlm.importance.compute import calibration_loss
        from compactlm.pruning.prune import prune_model

        for c in out:
            student, _ = prune_model(model, scores, PruneConfig(**c["shape"]))
            c["proxy_loss"] = calibration_loss(student, calibration, batch_size=batch_size)
            del student
        out.sort(key=lambda c: c["proxy_loss"])
    return out
