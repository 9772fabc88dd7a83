"""Structured pruning of a decoder from importance scores (Minitron): depth, heads, MLP neurons, channels.

The student is built as a fresh model of the target shape whose weights are slices of the teacher's:

* depth — keep the ``num_hidden_layers`` layers with the highest ``layer_metric`` score, in teacher order;
* heads — within each KV group keep the group's best query heads (rows of ``q_proj``/bias, columns of
  ``o_proj``); K/V heads are all kept, so the GQA mapping head -> KV head stays correct;
* neurons — per layer the top ``intermediate_size`` neurons (rows of gate/up, columns of down);
* channels — the top ``hidden_size`` embedding channels everywhere: embeddings, lm_head, every RMSNorm,
  input columns of q/k/v/gate/up, output rows (and biases) of o/down.

RMSNorm and dropped channels: RMSNorm divides by sqrt(mean over channels of x^2), so removing D - D'
channels that carry (near) zero activation shrinks the denominator by sqrt(D'/D). With ``rescale_norms`` the
kept norm weights are multiplied by sqrt(D/D'), which makes removing exactly-zero channels exact (up to
eps: the student's norms behave as if eps were eps * D'/D, which is why it is "up to eps"; rms_norm_eps is left
unchanged because Qwen3's per-head q/k norms share it) and, for low-importance channels, keeps the normalized
scale the teacher's later layers expect. ``rescale_norms=False`` gives plain Minitron slicing.
Every kept index list is sorted, so the student keeps the teacher's ordering.
"""

from __future__ import annotations

import copy
import math
import re
from typing import TYPE_CHECKING, Any

from compactlm.config import PruneConfig
from compactlm.formats.scores import ImportanceScores
from compactlm.pruning.shapes import shape_of, student_config, target_shape

if TYPE_CHECKING:
    import torch


def _top_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties: lower index first), in increasing index order."""
    import torch

    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def plan_pruning(config: Any, scores: ImportanceScores, cfg: PruneConfig) -> dict[str, Any]:
    """Which layers, heads, neurons and channels survive. Validates everything; touches no weights.

    Needs an explicit shape: with ``cfg.budget`` set, pick one with :func:`compactlm.pruning.rank_candidates`
    (or let :func:`prune_to_dir` do it) and pass ``PruneConfig(**candidate["shape"])``.
    """
    if getattr(cfg, "budget", None) is not None:
        raise ValueError(f"prune.budget.params={cfg.budget.params} is a budget, not a shape: rank the candidate "
                         "shapes first "
                         "(compactlm.pruning.rank_candidates, or prune_to_dir(..., calibration=...)) and prune to "
                         "the chosen candidate's shape")
    student = target_shape(config, cfg)
    teacher = shape_of(config)
    L, H, I, D = (teacher[k] for k in ("num_hidden_layers", "num_attention_heads", "intermediate_size",
                                        "hidden_size"))
    expected = {"heads": (L, H), "neurons": (L, I), "channels": (D,), "layer_block_influence": (L,)}
    for name, shape in expected.items():
        got = tuple(getattr(scores, name).shape)
        if got != shape:
            raise ValueError(f"scores.{name} has shape {got} but the model needs {shape}: the scores were "
                             "computed for a different model (re-run the score stage on this teacher)")
    if cfg.layer_metric == "loss":
        if scores.layer_loss_increase is None:
            raise ValueError("prune.layer_metric='loss' needs layer loss scores; re-score with "
                             "score.layer_loss=true or use layer_metric='block_influence'")
        layer_scores = scores.layer_loss_increase
    else:
        layer_scores = scores.layer_block_influence

    kept_layers = _top_sorted(layer_scores, student["num_hidden_layers"])
    kv = teacher["num_key_value_heads"]
    g, g_new = H // kv, student["num_attention_heads"] // kv
    kept_heads = []
    for layer in kept_layers:
        heads = []
        for group in range(kv):
            members = scores.heads[layer, group * g:(group + 1) * g]
            heads += [group * g + j for j in _top_sorted(members, g_new)]
        kept_heads.append(heads)
    kept_neurons = [_top_sorted(scores.neurons[layer], student["intermediate_size"]) for layer in kept_layers]
    kept_channels = _top_sorted(scores.channels, student["hidden_size"])
    return {"teacher": teacher, "student": student, "kept_layers": kept_layers, "kept_heads": kept_heads,
            "kept_neurons": kept_neurons, "kept_channels": kept_channels}


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _slice_state_dict(sd: dict[str, torch.Tensor], plan: dict[str, Any], head_dim: int,
                      norm_scale: float) -> dict[str, torch.Tensor]:
    import torch

    ch = torch.tensor(plan["kept_channels"], dtype=torch.long)
    new_index = {t: s for s, t in enumerate(plan["kept_layers"])}
    out: dict[str, torch.Tensor] = {}
    for key, w in sd.items():
        m = _LAYER_KEY.match(key)
        if m is None:
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                out[key] = w[:, ch]
            elif key == "model.norm.weight":
                out[key] = w[ch] * norm_scale
            else:
                raise ValueError(f"unexpected parameter {key!r}: don't know how to prune it")
            continue
        t_idx, rest = int(m.group(1)), m.group(2)
        if t_idx not in new_index:
            continue
        s_idx = new_index[t_idx]
        heads = plan["kept_heads"][s_idx]
        hrows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
        neu = torch.tensor(plan["kept_neurons"][s_idx], dtype=torch.long)
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            v = w[ch] * norm_scale
        elif rest == "self_attn.q_proj.weight":
            v = w[hrows][:, ch]
        elif rest == "self_attn.q_proj.bias":
            v = w[hrows]
        elif rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            v = w[:, ch]
        elif rest in ("self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.q_norm.weight",
                      "self_attn.k_norm.weight"):
            v = w
        elif rest == "self_attn.o_proj.weight":
            v = w[ch][:, hrows]
        elif rest in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            v = w[ch]
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            v = w[neu][:, ch]
        elif rest in ("mlp.gate_proj.bias", "mlp.up_proj.bias"):
            v = w[neu]
        elif rest == "mlp.down_proj.weight":
            v = w[ch][:, neu]
        else:
            raise ValueError(f"unexpected parameter {key!r}: don't know how to prune it")
        out[f"model.layers.{s_idx}.{rest}"] = v.contiguous()
    return out


def prune_model(model, scores: ImportanceScores, cfg: PruneConfig) -> tuple[Any, dict[str, Any]]:
    """Return (student, record): a new model of the target shape, weights sliced from `model`.

    `model` is not modified. The record holds the teacher and student shapes, ``kept_layers`` (teacher
    index of each student layer), ``kept_heads`` (teacher query-head indices per student layer),
    ``kept_neurons`` (count per student layer), ``kept_channels`` and parameter counts.
    """
    from transformers import AutoModelForCausalLM

    from compactlm.models import MODEL_BUILD_LOCK, count_params

    plan = plan_pruning(model.config, scores, cfg)
    teacher, student = plan["teacher"], plan["student"]
    norm_scale = math.sqrt(teacher["hidden_size"] / student["hidden_size"]) if cfg.rescale_norms else 1.0
    sd = _slice_state_dict(model.state_dict(), plan, teacher["head_dim"], norm_scale)
    new_cfg = student_config(model.config, plan)
    dtype = next(model.parameters()).dtype
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with MODEL_BUILD_LOCK, no_init_weights():  # the lock: no_init_weights is process-global (models.py)
        new = AutoModelForCausalLM.from_config(new_cfg, dtype=dtype)
    missing, unexpected = new.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and new_cfg.tie_word_embeddings)]:
        raise RuntimeError(f"pruned weights do not match the student: missing {missing}, unexpected {unexpected}")
    if new_cfg.tie_word_embeddings:
        new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    new.to(next(model.parameters()).device).eval()
    before, after = count_params(model), count_params(new)
    record = {
        "architecture": new_cfg.model_type,
        "teacher": teacher,
        "student": student,
        "kept_layers": plan["kept_layers"],
        "kept_heads": plan["kept_heads"],
        "kept_neurons": [len(n) for n in plan["kept_neurons"]],
        "kept_channels": plan["kept_channels"],
        "layer_metric": cfg.layer_metric,
        "rescale_norms": cfg.rescale_norms,
        "norm_scale": norm_scale,
        "params_before": before,
        "params_after": after,
        "param_ratio": after / before,
    }
    return new, record
