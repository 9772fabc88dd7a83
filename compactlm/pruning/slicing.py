"""Structured pruning of a decoder from importance scores (Minitron): depth, heads, MLP neurons, channels.

The student is built as a fresh model of the target shape whose weights are slices of the teacher's:

* depth — keep the ``num_hidden_layers`` layers with the highest ``layer_metric`` score, in teacher order;
* heads — within each KV group keep the group's best query heads (rows of ``q_proj``/bias or of the query part
  of a fused ``qkv_proj``, columns of ``o_proj``); K/V heads are all kept, so the GQA mapping head -> KV head
  stays correct;
* neurons — per layer the top ``intermediate_size`` neurons (rows of gate/up, or of both halves of a fused
  ``gate_up_proj``, columns of down);
* channels — the top ``hidden_size`` embedding channels everywhere: embeddings, lm_head, every RMSNorm over the
  hidden size, input columns of q/k/v/gate/up, output rows (and biases) of o/down.

Which tensor axis holds which unit is :func:`compactlm.arch.layer_params` (per family); this module only applies
the kept indices axis by axis.

RMSNorm and dropped channels: RMSNorm divides by sqrt(mean over channels of x^2), so removing D - D'
channels that carry (near) zero activation shrinks the denominator by sqrt(D'/D). With ``rescale_norms`` the
kept norm weights are multiplied by sqrt(D/D') (for Gemma's ``(1 + w)`` norms: ``1 + w`` is), which makes
removing exactly-zero channels exact (up to eps: the student's norms behave as if eps were eps * D'/D, which is
why it is "up to eps"; rms_norm_eps is left unchanged because per-head q/k norms share it) and, for
low-importance channels, keeps the normalized scale the teacher's later layers expect. This covers pre-norms and
the post-sublayer norms of Gemma and OLMo2 alike (their input, the sublayer output, has zero dropped channels).
Two more compensations follow the same rule, also only with ``rescale_norms``:

* OLMo2's q_norm spans all query heads (num_heads x head_dim), so keeping H' of H heads scales the kept q_norm
  weights by sqrt(H/H'): exact when the removed heads' queries are zero, the nearest equivalent otherwise;
* Gemma multiplies the embeddings by sqrt(config.hidden_size), which the student recomputes from its own
  hidden size; the kept embedding columns are multiplied by sqrt(D/D') so the residual stream starts exactly
  as the teacher's. With tied embeddings the same matrix is the output head, so the final norm's factor is
  divided by the same number (sqrt(D/D') / sqrt(D/D') = 1) and the logits are unchanged too. Exact up to float
  rounding of the rescaled embeddings (one rounding per weight: ~1e-7 relative in fp32, ~4e-3 in bf16).

``rescale_norms=False`` gives plain Minitron slicing (weights are only sliced). Every kept index list is
sorted, so the student keeps the teacher's ordering.

A student is written as the teacher's architecture unless vLLM could not load that (a width-pruned Qwen2 is
written as the numerically identical Llama: :func:`compactlm.arch.written_as`); the record's ``written_as`` says
which.
"""

from __future__ import annotations

import copy
import math
import re
from typing import TYPE_CHECKING, Any

from compactlm.arch import family, layer_params, model_params, zero_params
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


def _rescale(w: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """`w` whose effective factor ``offset + w`` is multiplied by `scale`: exactly `w` at 1, else computed in fp32
    and rounded once to `w`'s dtype (``1 + w`` in bf16 would drop the low bits of a small `w`)."""
    if scale == 1.0:
        return w
    return ((w.float() + offset) * scale - offset).to(w.dtype)


def _take(w: torch.Tensor, axes: tuple[str, ...], index: dict[str, torch.Tensor | None]) -> torch.Tensor:
    for dim, axis in enumerate(axes):
        if index[axis] is not None:
            w = w.index_select(dim, index[axis])
    return w


def _layer_index(plan: dict[str, Any], s_idx: int, ch: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Kept indices along every axis of student layer `s_idx` (None: all kept)."""
    import torch

    t = plan["teacher"]
    hd, q_rows, kv_rows, n_mlp = t["head_dim"], t["num_attention_heads"] * t["head_dim"], \
        t["num_key_value_heads"] * t["head_dim"], t["intermediate_size"]
    heads = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in plan["kept_heads"][s_idx]])
    neu = torch.tensor(plan["kept_neurons"][s_idx], dtype=torch.long)
    return {"vocab": None, "hidden": ch, "q": heads, "kv": None, "head_dim": None, "mlp": neu,
            "qkv": torch.cat([heads, q_rows + torch.arange(2 * kv_rows)]), "gate_up": torch.cat([neu, n_mlp + neu])}


def _scales(config: Any, plan: dict[str, Any], rescale: bool) -> dict[str, float]:
    """The compensating factors (module docstring): hidden norms, OLMo2's q_norm, Gemma's embeddings, and the
    final norm (the hidden one divided by the embedding one when the output head is the embedding matrix)."""
    t, s = plan["teacher"], plan["student"]
    hidden = math.sqrt(t["hidden_size"] / s["hidden_size"]) if rescale else 1.0
    heads = math.sqrt(t["num_attention_heads"] / s["num_attention_heads"]) if rescale else 1.0
    fam = family(config)
    embed = hidden if fam.embed_normalizer else 1.0
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return {"hidden": hidden, "q": heads if fam.head_norms == "projection" else 1.0, "embed": embed,
            "final": hidden / embed if tied else hidden}


def sliced_items(items, plan: dict[str, Any], config: Any, scales: dict[str, float]):
    """Yield (student key, tensor) for each teacher (key, tensor) of `items` that the student keeps, sliced and
    rescaled; one tensor at a time, so `items` may read them lazily (:mod:`compactlm.pruning.streaming`)."""
    import torch

    ch = torch.tensor(plan["kept_channels"], dtype=torch.long)
    offset = family(config).norm_offset
    top = model_params(config)
    top.setdefault("lm_head.weight", top["model.embed_tokens.weight"])  # a tied head may be in state_dict too
    per_layer = layer_params(config)
    new_index = {t: s for s, t in enumerate(plan["kept_layers"])}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for key, w in items:
        m = _LAYER_KEY.match(key)
        name = key if m is None else m.group(2)
        param = (top if m is None else per_layer).get(name)
        if param is None:
            raise ValueError(f"unexpected parameter {key!r}: don't know how to prune it")
        if m is None:
            v = _take(w, param.axes, {"vocab": None, "hidden": ch})
            if key == "model.norm.weight":
                v = _rescale(v, scales["final"], offset)
            elif key == "model.embed_tokens.weight" or (key == "lm_head.weight" and tied):
                v = _rescale(v, scales["embed"], 0.0)
            yield key, v.contiguous()
            continue
        if int(m.group(1)) not in new_index:
            continue
        s_idx = new_index[int(m.group(1))]
        v = _take(w, param.axes, _layer_index(plan, s_idx, ch))
        if param.norm:  # over the hidden size, or OLMo2's over all query heads; per-head norms keep their scale
            v = _rescale(v, scales.get(param.axes[0], 1.0), offset)
        yield f"model.layers.{s_idx}.{name}", v.contiguous()


def _slice_state_dict(sd: dict[str, torch.Tensor], plan: dict[str, Any], config: Any,
                      scales: dict[str, float]) -> dict[str, torch.Tensor]:
    return dict(sliced_items(sd.items(), plan, config, scales))


def zero_items(config: Any, new_cfg: Any, dtype):
    """(key, zeros) of the parameters a student written as another model_type needs
    (:func:`compactlm.arch.zero_params`)."""
    import torch

    for name in zero_params(config.model_type, new_cfg.model_type):
        param = layer_params(config, new_cfg.model_type)[name]
        size = {"hidden": new_cfg.hidden_size}
        for i in range(new_cfg.num_hidden_layers):
            yield f"model.layers.{i}.{name}", torch.zeros([size[a] for a in param.axes], dtype=dtype)


def _zero_fill(sd: dict[str, torch.Tensor], config: Any, new_cfg: Any) -> None:
    """Add the zero parameters a student written as another model_type needs (:func:`compactlm.arch.zero_params`)."""
    sd.update(zero_items(config, new_cfg, sd["model.embed_tokens.weight"].dtype))


def prune_model(model, scores: ImportanceScores, cfg: PruneConfig, *,
                dtype: torch.dtype | None = None) -> tuple[Any, dict[str, Any]]:
    """Return (student, record): a new model of the target shape, weights sliced from `model`, in `dtype` (default:
    the model's; the student is built in it, so its computed buffers such as RoPE frequencies are that precise).

    `model` is not modified. The record holds the teacher and student shapes, ``kept_layers`` (teacher
    index of each student layer), ``kept_heads`` (teacher query-head indices per student layer),
    ``kept_neurons`` (count per student layer), ``kept_channels``, parameter counts, the compensating factors
    (``norm_scale``, ``q_norm_scale``, ``embed_scale``: 1.0 where none applies) and ``written_as``, the
    student's model_type (the teacher's ``architecture`` unless vLLM needs another: :func:`compactlm.arch.written_as`).
    """
    from transformers import AutoModelForCausalLM

    from compactlm.models import MODEL_BUILD_LOCK, count_params

    plan = plan_pruning(model.config, scores, cfg)
    scales = _scales(model.config, plan, cfg.rescale_norms)
    sd = _slice_state_dict(model.state_dict(), plan, model.config, scales)
    new_cfg = student_config(model.config, plan)
    _zero_fill(sd, model.config, new_cfg)
    dtype = dtype or next(model.parameters()).dtype
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
    return new, pruning_record(model.config, new_cfg, plan, cfg, scales, count_params(model), count_params(new))


def pruning_record(config: Any, new_cfg: Any, plan: dict[str, Any], cfg: PruneConfig, scales: dict[str, float],
                   before: int, after: int) -> dict[str, Any]:
    """The pruning record of a student (see :func:`prune_model`)."""
    teacher, student = plan["teacher"], plan["student"]
    return {
        "architecture": config.model_type,
        "written_as": new_cfg.model_type,
        "teacher": teacher,
        "student": student,
        "kept_layers": plan["kept_layers"],
        "kept_heads": plan["kept_heads"],
        "kept_neurons": [len(n) for n in plan["kept_neurons"]],
        "kept_channels": plan["kept_channels"],
        "layer_metric": cfg.layer_metric,
        "rescale_norms": cfg.rescale_norms,
        "norm_scale": scales["hidden"],
        "q_norm_scale": scales["q"],
        "embed_scale": scales["embed"],
        "params_before": before,
        "params_after": after,
        "param_ratio": after / before,
    }
