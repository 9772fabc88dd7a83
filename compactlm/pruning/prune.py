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
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.config import PruneConfig
from compactlm.importance.arch import check_arch, head_dim_of
from compactlm.importance.scores import ImportanceScores
from compactlm.models import copy_model_side_files

if TYPE_CHECKING:
    import torch

RECORD_FILE = "pruning.json"
SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")


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

    With ``cfg.params`` (a parameter budget) the shape is chosen later by ranking candidates
    (:func:`compactlm.pruning.rank_candidates`); here the budget is checked to be reachable and the first
    candidate's shape (closest to the budget among the depth-only ones, if any) is returned.
    """
    check_arch(config)
    teacher = shape_of(config)
    if getattr(cfg, "params", None) is not None:
        given = [f"prune.{k}" for k in SHAPE_FIELDS if getattr(cfg, k) is not None]
        if given:
            raise ValueError(f"give either prune.params or an explicit shape, not both: unset {', '.join(given)}")
        from compactlm.pruning.budget import candidate_shapes

        first = candidate_shapes(config, cfg.params, max_per_kind=1)[0]
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
        _student_config(config, {"student": student, "kept_layers": list(range(student["num_hidden_layers"]))})
    except Exception as e:  # noqa: BLE001 - transformers raises several types; re-raise as a clear ValueError
        cause = str(e).strip().splitlines()[-1].strip()
        hint = ""
        if student["hidden_size"] % student["num_attention_heads"]:
            h = student["num_attention_heads"]
            lower = student["hidden_size"] // h * h
            hint = (f"; choose prune.hidden_size as a multiple of num_attention_heads={h} "
                    f"(e.g. {lower or h} or {lower + h})")
        raise ValueError(f"prune target {student} is not a valid {config.model_type} config: {cause}{hint}") from None
    return student


def _top_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties: lower index first), in increasing index order."""
    import torch

    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def plan_pruning(config: Any, scores: ImportanceScores, cfg: PruneConfig) -> dict[str, Any]:
    """Which layers, heads, neurons and channels survive. Validates everything; touches no weights.

    Needs an explicit shape: with ``cfg.params`` set, pick one with :func:`compactlm.pruning.rank_candidates`
    (or let :func:`prune_to_dir` do it) and pass ``PruneConfig(**candidate["shape"])``.
    """
    if getattr(cfg, "params", None) is not None:
        raise ValueError(f"prune.params={cfg.params} is a budget, not a shape: rank the candidate shapes first "
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


def _student_config(config: Any, plan: dict[str, Any]) -> Any:
    student = plan["student"]
    d = config.to_dict()
    d.update({k: student[k] for k in SHAPE_FIELDS})
    d["head_dim"] = student["head_dim"]  # explicit: hidden_size / heads no longer gives it
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][i] for i in plan["kept_layers"]]
    for key in ("_name_or_path", "transformers_version"):
        d.pop(key, None)
    return type(config).from_dict(d)


def prune_model(model, scores: ImportanceScores, cfg: PruneConfig) -> tuple[Any, dict[str, Any]]:
    """Return (student, record): a new model of the target shape, weights sliced from `model`.

    `model` is not modified. The record holds the teacher and student shapes, ``kept_layers`` (teacher
    index of each student layer), ``kept_heads`` (teacher query-head indices per student layer),
    ``kept_neurons`` (count per student layer), ``kept_channels`` and parameter counts.
    """
    from transformers import AutoModelForCausalLM

    from compactlm.models import count_params

    plan = plan_pruning(model.config, scores, cfg)
    teacher, student = plan["teacher"], plan["student"]
    norm_scale = math.sqrt(teacher["hidden_size"] / student["hidden_size"]) if cfg.rescale_norms else 1.0
    sd = _slice_state_dict(model.state_dict(), plan, teacher["head_dim"], norm_scale)
    new_cfg = _student_config(model.config, plan)
    dtype = next(model.parameters()).dtype
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
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


def shape_kind(student: dict[str, int], teacher: dict[str, int]) -> str:
    """"depth" (only layers cut), "width" (only hidden / MLP / heads cut), "mixed" (both) or "none"."""
    deep = student["num_hidden_layers"] < teacher["num_hidden_layers"]
    wide = any(student[k] < teacher[k] for k in SHAPE_FIELDS if k != "num_hidden_layers")
    return "mixed" if deep and wide else "depth" if deep else "width" if wide else "none"


def _with_shape(cfg: PruneConfig, shape: dict[str, Any]) -> PruneConfig:
    """`cfg` with its shape replaced by `shape` (a dict of SHAPE_FIELDS; missing = keep) and no budget."""
    if not isinstance(shape, dict):
        raise ValueError(f"shape must be a dict of {', '.join(SHAPE_FIELDS)}, got {type(shape).__name__}")
    unknown = sorted(set(shape) - set(SHAPE_FIELDS))
    if unknown:
        raise ValueError(f"shape has unknown keys {unknown}; allowed: {', '.join(SHAPE_FIELDS)} "
                         "(e.g. a candidate's 'shape' from rank_candidates)")
    return PruneConfig(**shape, layer_metric=cfg.layer_metric, rescale_norms=cfg.rescale_norms)


def _shape_key(candidate: dict[str, Any]) -> tuple:
    shape = candidate.get("shape") if isinstance(candidate, dict) else None
    if not isinstance(shape, dict):
        raise ValueError(f"ranking items need a 'shape' dict (items of rank_measured / rank_candidates), got "
                         f"{candidate!r}")
    return tuple(sorted(shape.items()))


def prune_to_dir(model_dir: str | os.PathLike, scores_dir: str | os.PathLike, cfg: PruneConfig,
                 out_dir: str | os.PathLike, *, calibration: torch.Tensor | str | os.PathLike | None = None,
                 shape: dict[str, int] | None = None, device: str = "cpu", seed: int = 0,
                 ranking: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Prune the HF model in `model_dir` with the scores in `scores_dir` and publish the student to `out_dir`.

    The student's shape comes from, in order:

    1. `shape` (a dict of ``num_hidden_layers`` / ``hidden_size`` / ``intermediate_size`` /
       ``num_attention_heads``; missing keys keep the teacher's value), e.g. one candidate's ``"shape"`` from
       :func:`compactlm.pruning.rank_candidates` in a fan-out over the top-k; ``cfg``'s shape fields and
       ``cfg.params`` are then ignored (``layer_metric`` and ``rescale_norms`` still apply);
    2. ``cfg.params``: the candidates that fit the budget are ranked by ``cfg.proxy`` on `calibration` (ids
       [N, T], or a generated dataset dir / text file; required) with the teacher in fp32 on `device`, and the
       best is pruned; with `ranking` (the same pool already measured elsewhere, e.g. by a fan-out of
       :func:`compactlm.pruning.budget.measure_candidate` tasks ordered by ``rank_measured``) nothing is
       measured again and ``ranking[0]`` is pruned (`calibration` is then not needed); its shapes must be
       exactly the pool's;
    3. ``cfg``'s explicit shape fields.

    `out_dir` becomes a normal HF directory (config.json, model.safetensors in the teacher's dtype, tokenizer
    files and chat template copied from `model_dir`) plus ``pruning.json`` (the record, with ``selection``
    ("shape" | "params" | "config"), ``budget``, the chosen ``candidate`` and, for params, the full
    ``ranking``) and ``manifest.json`` last. Every target is validated before any model loads; on bad input
    nothing is written.
    """
    import torch
    from transformers import AutoConfig

    from compactlm.artifacts import publish_dir, write_json_atomic
    from compactlm.importance.scores import load_scores
    from compactlm.models import load_model
    from compactlm.pruning.budget import calibration_tensor, candidate_pool, rank_measured, score_candidates

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    scores = load_scores(scores_dir)
    pool: list[dict[str, Any]] = []
    if shape is not None:
        selection, explicit = "shape", _with_shape(cfg, shape)
    elif cfg.params is not None:
        if calibration is None and ranking is None:
            raise ValueError(f"prune.params={cfg.params} ranks candidate shapes on calibration data: pass "
                             "calibration= (token ids, a generated dataset dir or a text file), or an explicit "
                             "shape= / shape fields instead of params")
        selection, explicit = "params", None
        pool = candidate_pool(config, scores, cfg)  # fail fast: budget reachable, scores match
        if ranking is not None and sorted(map(_shape_key, ranking)) != sorted(map(_shape_key, pool)):
            raise ValueError(f"ranking= does not measure this config's candidate pool ({len(ranking)} ranked vs "
                             f"{len(pool)} in the pool for prune.params={cfg.params}); rank the pool of the same "
                             "teacher, scores and prune config (budget.plan_candidates)")
    else:
        selection, explicit = "config", cfg
    if explicit is not None:
        plan_pruning(config, scores, explicit)  # fail fast, before loading weights
    dtype = getattr(config, "dtype", None) or "float32"
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "float32"
    if selection != "params":
        ranking = None  # a given ranking only applies to a budget
        model = load_model(model_dir, dtype=dtype, device="cpu")
    elif ranking is not None:  # measured elsewhere (a fan-out): prune its best, exactly as below
        ranking = rank_measured([{k: v for k, v in c.items() if k != "rank"} for c in ranking])
        model = load_model(model_dir, dtype="float32", device="cpu")
        explicit = _with_shape(cfg, ranking[0]["shape"])
    else:
        ids = calibration_tensor(calibration, model_dir, cfg, seed=seed)
        model = load_model(model_dir, dtype="float32", device=device)  # fp32: bf16 matmuls are slow on CPU
        ranking = score_candidates(model, scores, pool, ids, proxy=cfg.proxy, base=cfg)
        explicit = _with_shape(cfg, ranking[0]["shape"])
    student, record = prune_model(model, scores, explicit)
    student.to(device="cpu", dtype=getattr(torch, dtype))  # slicing is exact, so fp32 -> teacher dtype is too
    del model
    if ranking is not None:
        candidate = ranking[0]
    else:
        s = {k: record["student"][k] for k in SHAPE_FIELDS}
        candidate = {"kind": shape_kind(s, record["teacher"]), "shape": s, "params": record["params_after"],
                     "param_ratio": record["param_ratio"]}
    record = {**record, "teacher_dir": str(model_dir), "scores_dir": str(scores_dir), "dtype": dtype,
              "config": cfg.model_dump(mode="json"), "selection": selection, "budget": cfg.params,
              "candidate": candidate, "ranking": ranking}
    manifest = {"stage": "prune", "model_dir": str(model_dir), "scores_dir": str(scores_dir),
                "config": cfg.model_dump(mode="json"), "selection": selection, "student": record["student"],
                "params_before": record["params_before"], "params_after": record["params_after"]}
    with publish_dir(out_dir, manifest) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        copy_model_side_files(model_dir, tmp, extra=("generation_config.json",))
        write_json_atomic(tmp / RECORD_FILE, record)
    return record
