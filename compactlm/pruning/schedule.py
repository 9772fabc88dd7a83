"""Iterative pruning (Minitron, Nemotron): reach the student's shape in rounds of prune -> distill, each round
scoring the model the previous round healed, instead of one cut from the teacher.

Arithmetic only (no weights): :func:`round_shapes` gives the intermediate shapes, :func:`round_steps` splits the
distillation steps between the rounds so the total stays what the recipe asked. The flow runs the rounds
(``flows/compress.py``, ``tasks/schedule.py``).

Intermediate shapes shrink every cut dimension geometrically, ``teacher * (final / teacher) ** (r / rounds)``, so
each round removes the same fraction of what it cuts (two rounds to 60 % width: 1536 -> 1190 -> 922 MLP
neurons), snapped to the grids the budget search uses (MLP sizes multiples of 8 / 64, hidden sizes multiples of
the round's heads and of 8, heads multiples of the KV heads). Dimensions the student keeps are never cut.
"""

from __future__ import annotations

import math
from typing import Any

from compactlm.config import SHAPE_FIELDS
from compactlm.pruning.shapes import _mlp_step, param_count, shape_of


def _between(value: float, step: int, lo: int, hi: int) -> int:
    """`value` rounded to the nearest multiple of `step`, kept within [lo, hi] (lo, hi themselves allowed)."""
    snapped = max(step, round(value / step) * step)
    return min(hi, max(lo, snapped))


def _hidden(value: float, heads: int, head_dim: int, lo: int, hi: int, fixed_head_dim: bool) -> int:
    if fixed_head_dim:  # configs that derive head_dim from hidden_size / heads (e.g. Phi3) keep the product
        return heads * head_dim
    align = heads * 8 // math.gcd(heads, 8)
    return _between(value, align, lo, hi)


def round_shapes(config: Any, final: dict[str, int], rounds: int) -> list[dict[str, int]]:
    """The shape after each round, the last being `final` (a full shape of the four SHAPE_FIELDS, e.g. from
    :func:`~compactlm.pruning.shapes.target_shape`): ``rounds`` shapes, each no larger than the one before.

    Raises ValueError when `rounds` < 1 or `final` is larger than the teacher somewhere.
    """
    if rounds < 1:
        raise ValueError(f"schedule.rounds must be at least 1, got {rounds}")
    t = shape_of(config)
    final = {k: int(final[k]) for k in SHAPE_FIELDS}
    bigger = [k for k in SHAPE_FIELDS if final[k] > t[k]]
    if bigger:
        raise ValueError(f"the final shape is larger than the teacher in {bigger}: {final} vs {t}")
    fixed_head_dim = t["hidden_size"] == t["num_attention_heads"] * t["head_dim"] and \
        final["hidden_size"] == final["num_attention_heads"] * t["head_dim"] and final["hidden_size"] < t["hidden_size"]
    out = []
    for r in range(1, rounds):
        f = r / rounds
        geo = {k: t[k] * (final[k] / t[k]) ** f for k in SHAPE_FIELDS}
        prev = out[-1] if out else {k: t[k] for k in SHAPE_FIELDS}
        heads = _between(geo["num_attention_heads"], t["num_key_value_heads"], final["num_attention_heads"],
                       prev["num_attention_heads"])
        shape = {
            "num_hidden_layers": min(prev["num_hidden_layers"],
                                     max(final["num_hidden_layers"], round(geo["num_hidden_layers"]))),
            "intermediate_size": _between(geo["intermediate_size"], _mlp_step(t["intermediate_size"]),
                                          final["intermediate_size"], prev["intermediate_size"]),
            "num_attention_heads": heads,
            "hidden_size": _hidden(geo["hidden_size"], heads, t["head_dim"], final["hidden_size"],
                                   prev["hidden_size"], fixed_head_dim),
        }
        out.append({k: shape[k] for k in SHAPE_FIELDS})
    return [*out, final]


def round_steps(steps: int, rounds: int, share: float) -> list[int]:
    """Distillation steps per round, summing to `steps`: the rounds before the last share ``share * steps``
    equally (at least one step each), the last round (the final student) gets the rest (at least one).

    Raises ValueError when `steps` cannot give every round a step.
    """
    if rounds < 1:
        raise ValueError(f"schedule.rounds must be at least 1, got {rounds}")
    if steps < rounds:
        raise ValueError(f"distill.steps={steps} cannot be split between schedule.rounds={rounds} rounds (each "
                         f"round distills at least one step): raise distill.steps to at least {rounds} or lower "
                         "schedule.rounds")
    if rounds == 1:
        return [steps]
    each = max(1, round(share * steps / (rounds - 1)))
    each = min(each, (steps - 1) // (rounds - 1))
    return [each] * (rounds - 1) + [steps - each * (rounds - 1)]


def describe(config: Any, shapes: list[dict[str, int]], steps: list[int]) -> list[dict[str, Any]]:
    """One row per round (what the flow logs and the plan shows): the round, its shape, its parameter count and
    ratio to the teacher, and the steps it distills."""
    total = param_count(config)
    return [{"round": r, "shape": s, "params": param_count(config, s),
             "param_ratio": round(param_count(config, s) / total, 4), "steps": n}
            for r, (s, n) in enumerate(zip(shapes, steps, strict=True), start=1)]
