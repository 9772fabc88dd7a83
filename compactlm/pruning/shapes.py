"""Student shapes: what a shape is, whether it fits a teacher, what it costs in parameters, and which shapes
fit a parameter budget. Arithmetic on configs only: no weights are loaded here.

* :func:`target_shape` — validate a prune config against the teacher and return the student shape;
* :func:`param_count` — a shape's parameters, analytically (equals ``count_params`` of the pruned model);
* :func:`fitting_shapes` — depth-only, width-only and mixed shapes whose parameter count is within ``slack``
  below a budget; per kind one representative per *profile* (which dimensions are cut, and for mixed shapes how
  much depth is cut), so the pool is small and diverse.

Width grids: hidden sizes are multiples of the student's head count (transformers' Llama requires
``hidden_size % num_attention_heads == 0``) and of 8; MLP sizes multiples of 8 (64 for large MLPs); heads
multiples of the KV heads. Each width dimension keeps at least a quarter of the teacher's size. For a given
width the deepest stack that fits is taken (fewer layers at the same width only lose capacity).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from compactlm.arch import (
    check_arch,
    check_writable,
    head_dim_of,
    layer_params,
    model_params,
    rewrite_config,
    written_as,
)
from compactlm.config import SHAPE_FIELDS, PruneConfig

KINDS = ("depth", "width", "mixed")
MIN_WIDTH_FRACTION = 0.25


def shape_of(config: Any) -> dict[str, int]:
    """The prunable shape of a model config (plus the fixed KV heads and head_dim)."""
    return {
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "num_attention_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(config.num_key_value_heads),
        "head_dim": head_dim_of(config),
    }


def target_shape(config: Any, cfg: PruneConfig) -> dict[str, int]:
    """Validate `cfg` against the teacher `config` and return the student shape. Raises ValueError.

    With ``cfg.budget`` (a parameter budget) the shape is chosen later by ranking candidates
    (:func:`compactlm.pruning.budget.rank_candidates`); here the budget is checked to be reachable and the first
    candidate's shape (closest to the budget among the depth-only ones, if any) is returned.
    """
    check_arch(config)
    teacher = shape_of(config)
    if getattr(cfg, "budget", None) is not None:
        given = [f"prune.{k}" for k in SHAPE_FIELDS if getattr(cfg, k) is not None]
        if given:
            raise ValueError(f"give either prune.budget or an explicit shape, not both: unset {', '.join(given)}")
        first = fitting_shapes(config, cfg.budget.params, max_per_kind=1)[0]
        return {**teacher, **first["shape"]}
    student = dict(teacher)
    for name in SHAPE_FIELDS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"prune.{name} must be a positive integer or null (= keep), got {value!r}")
        if value > teacher[name]:
            raise ValueError(f"prune.{name}={value} is larger than the teacher's {teacher[name]}; "
                             f"pruning can only shrink (give at most {teacher[name]} or null to keep)")
        student[name] = value
    kv = teacher["num_key_value_heads"]
    if student["num_attention_heads"] % kv:
        raise ValueError(f"prune.num_attention_heads={student['num_attention_heads']} must be a multiple of the "
                         f"teacher's num_key_value_heads={kv} (heads are removed within KV groups); try "
                         f"{max(kv, student['num_attention_heads'] // kv * kv)}")
    try:  # the architecture's own config validators (e.g. Llama: hidden_size % num_attention_heads == 0)
        student_config(config, {"student": student, "kept_layers": list(range(student["num_hidden_layers"]))})
    except Exception as e:  # noqa: BLE001 - transformers raises several types; re-raise as a clear ValueError
        cause = str(e).strip().splitlines()[-1].strip()
        hint = ""
        if student["hidden_size"] % student["num_attention_heads"]:
            h = student["num_attention_heads"]
            lower = student["hidden_size"] // h * h
            hint = (f"; choose prune.hidden_size as a multiple of num_attention_heads={h} "
                    f"(e.g. {lower or h} or {lower + h})")
        elif student["hidden_size"] != student["num_attention_heads"] * student["head_dim"]:
            hint = ("; this config's validation derives head_dim from hidden_size / num_attention_heads (e.g. Phi3's "
                    "longrope factors), so keep prune.hidden_size = num_attention_heads x head_dim = "
                    f"{student['num_attention_heads'] * student['head_dim']}")
        raise ValueError(f"prune target {student} is not a valid {config.model_type} config: {cause}{hint}") from None
    check_writable(config, student)
    return student


def student_config(config: Any, plan: dict[str, Any]) -> Any:
    """The HF config of the student `plan` describes (its shape; layer types of the kept layers), of the
    architecture it is written as (:func:`compactlm.arch.written_as`: a width-pruned Qwen2 may become Llama)."""
    student = plan["student"]
    d = config.to_dict()
    d.update({k: student[k] for k in SHAPE_FIELDS})
    d["head_dim"] = student["head_dim"]  # explicit: hidden_size / heads no longer gives it
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][i] for i in plan["kept_layers"]]
    for key in ("_name_or_path", "transformers_version"):
        d.pop(key, None)
    written = written_as(config, student)
    if written == config.model_type:
        return type(config).from_dict(d)
    from transformers import AutoConfig

    d = rewrite_config(d, written)
    return AutoConfig.for_model(written).from_dict(d)


def shape_kind(student: dict[str, int], teacher: dict[str, int]) -> str:
    """"depth" (only layers cut), "width" (only hidden / MLP / heads cut), "mixed" (both) or "none"."""
    deep = student["num_hidden_layers"] < teacher["num_hidden_layers"]
    wide = any(student[k] < teacher[k] for k in SHAPE_FIELDS if k != "num_hidden_layers")
    return "mixed" if deep and wide else "depth" if deep else "width" if wide else "none"


def _counter(config: Any) -> Callable[[int, int, int], tuple[int, int]]:
    """(hidden, intermediate, heads) -> (fixed params, params per layer) of the student as it is written, read
    from the same parameter tables slicing uses (:func:`compactlm.arch.layer_params`)."""
    check_arch(config)
    t = shape_of(config)
    kv, hd, V = t["num_key_value_heads"], t["head_dim"], config.vocab_size
    tables = {}
    fixed_axes = [p.axes for p in model_params(config).values()]

    def size(axes: tuple[str, ...], sizes: dict[str, int]) -> int:
        return math.prod(sizes[a] for a in axes)

    def count(D: int, I: int, H: int) -> tuple[int, int]:
        written = written_as(config, {"hidden_size": D, "num_attention_heads": H, "head_dim": hd})
        if written not in tables:
            tables[written] = [p.axes for p in layer_params(config, written).values()]
        sizes = {"vocab": V, "hidden": D, "q": H * hd, "kv": kv * hd, "head_dim": hd, "mlp": I,
                 "qkv": (H + 2 * kv) * hd, "gate_up": 2 * I}
        return (sum(size(a, sizes) for a in fixed_axes), sum(size(a, sizes) for a in tables[written]))

    return count


def param_split(config: Any, shape: dict[str, int] | None = None) -> tuple[int, int]:
    """(parameters outside the decoder layers, parameters of one layer) of `config`'s architecture at `shape`
    (default: its own) as it is written, tied embeddings counted once."""
    s = {**shape_of(config), **(shape or {})}
    return _counter(config)(s["hidden_size"], s["intermediate_size"], s["num_attention_heads"])


def param_count(config: Any, shape: dict[str, int] | None = None) -> int:
    """Parameters of `config`'s architecture at `shape` (default: its own), tied embeddings counted once."""
    fixed, per_layer = param_split(config, shape)
    return fixed + {**shape_of(config), **(shape or {})}["num_hidden_layers"] * per_layer


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


def fitting_shapes(config: Any, budget: float, *, max_per_kind: int = 3, slack: float = 0.05) -> list[dict[str, Any]]:
    """Student shapes with at most ``budget`` x the teacher's parameters, at most `max_per_kind` per kind.

    Kinds: "depth" (layers only), "width" (hidden / heads / MLP), "mixed" (both). A shape qualifies when its
    parameter ratio is in [r - slack, r], r = the largest ratio <= budget any shape reaches. Within a kind one
    representative per profile (the set of cut dimensions, and for mixed shapes the quarter of depth cut) is
    kept, the one maximizing (smallest kept fraction of any dimension) + (parameter ratio); profiles are then
    ordered by the same key. The result interleaves the kinds (depth, width, mixed, width, mixed, ...), so any
    prefix covers every kind that fits.

    Each item: {"kind", "shape" (the four PruneConfig shape fields), "params", "param_ratio"}. Raises ValueError
    when no shape fits.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"prune.budget.params must be a fraction of the teacher's parameters in (0, 1), got "
                         f"{budget}")
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
        raise ValueError(f"prune.budget.params={budget}: no student shape fits this budget; the smallest shape pruning "
                         f"can reach ({smallest}) keeps {floor:.3f} of the teacher's {total:,} parameters "
                         f"(at full width the embeddings alone are {count(t['hidden_size'], 0, 0)[0] / total:.1%}); "
                         f"set prune.budget.params to at least {math.ceil(floor * 1000) / 1000}")
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
    return [c for row in _interleave(per_kind) for c in row]


def _interleave(lists: list[list[Any]]) -> list[list[Any]]:
    return [[lst[i] for lst in lists if i < len(lst)] for i in range(max(map(len, lists), default=0))]
