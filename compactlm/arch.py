"""Which decoder architectures the importance and pruning stages understand, and how to walk them.

Every supported family keeps its decoder blocks at ``model.layers``, embeddings at ``model.embed_tokens``, the
final norm at ``model.norm`` and the output head at ``lm_head``; attention ends in ``self_attn.o_proj`` and the
MLP in ``mlp.down_proj``. What differs is described by one :class:`Family` per ``model_type``:

* llama, mistral — separate q/k/v, gate/up; two pre-RMSNorms per layer (biases where the config asks);
* qwen2 — q/k/v biases always; vLLM's Qwen2 derives head_dim from hidden_size / heads (see :func:`written_as`);
* qwen3 — per-head q/k RMSNorms over ``head_dim`` (untouched by pruning: head_dim is never cut);
* gemma2 — four RMSNorms per layer (pre and post attention, pre and post MLP) whose weight acts as ``1 + w``,
  embeddings multiplied by ``sqrt(config.hidden_size)``, soft-capping and ``query_pre_attn_scalar`` (neither
  depends on a prunable size), alternating sliding / full ``layer_types``;
* gemma3_text — gemma2's layout plus per-head q/k norms (``1 + w``, over head_dim);
* phi3 — fused ``qkv_proj`` (rows: the query heads, then the key heads, then the value heads) and fused
  ``gate_up_proj`` (rows: gate, then up);
* olmo2 — no pre-norms: ``post_attention_layernorm`` / ``post_feedforward_layernorm`` normalize the sublayer
  outputs, and q/k RMSNorms span the whole projection (``num_heads * head_dim``), so removing query heads
  changes the query norm's RMS.

Weights are described axis by axis (:func:`layer_params`, :func:`model_params`): each axis names the unit it
indexes, so slicing (which rows/columns survive) and parameter counting (how big each tensor is) read the same
table and cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

#: Axis names: "vocab", "hidden" (channels), "q" (query heads x head_dim), "kv" (key/value heads x head_dim),
#: "head_dim", "mlp" (neurons), "qkv" (fused q, k, v rows), "gate_up" (fused gate and up rows).
AXES = ("vocab", "hidden", "q", "kv", "head_dim", "mlp", "qkv", "gate_up")


@dataclass(frozen=True)
class Family:
    """How one model_type lays out a decoder layer (names are relative to ``model.layers[i]``)."""

    attn_in: str = "self_attn.q_proj"  # the first projection reading the attention input
    mlp_in: str = "mlp.gate_proj"  # the first projection reading the MLP input
    hidden_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    head_norms: str | None = None  # "head": per-head over head_dim; "projection": over heads x head_dim
    norm_offset: float = 0.0  # the RMSNorm multiplies by (norm_offset + weight)
    embed_normalizer: bool = False  # embeddings are multiplied by sqrt(config.hidden_size)
    qkv_bias: bool = False  # q/k/v biases whatever config.attention_bias says
    vllm_derives_head_dim: bool = False  # vLLM's model takes head_dim = hidden_size // num_attention_heads

    @property
    def fused(self) -> bool:
        return self.attn_in.endswith("qkv_proj")


_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True, vllm_derives_head_dim=True),
    "qwen3": Family(head_norms="head"),
    "gemma2": Family(hidden_norms=_GEMMA_NORMS, norm_offset=1.0, embed_normalizer=True),
    "gemma3_text": Family(hidden_norms=_GEMMA_NORMS, head_norms="head", norm_offset=1.0, embed_normalizer=True),
    "phi3": Family(attn_in="self_attn.qkv_proj", mlp_in="mlp.gate_up_proj"),
    "olmo2": Family(hidden_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
                    head_norms="projection"),
}
SUPPORTED_ARCHS = tuple(FAMILIES)


class Param(NamedTuple):
    """One weight: the unit each of its axes indexes, and whether it is an RMSNorm weight."""

    axes: tuple[str, ...]
    norm: bool = False


def check_arch(config: Any) -> str:
    """Return ``config.model_type`` or raise ValueError naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(
            f"model_type {model_type!r} is not supported for importance scoring / pruning; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHS)}"
        )
    return model_type


def family(config: Any) -> Family:
    return FAMILIES[check_arch(config)]


def head_dim_of(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def decoder_layers(model: Any) -> list:
    """The decoder blocks of a supported causal LM, in order."""
    check_arch(model.config)
    return list(model.model.layers)


class Probes(NamedTuple):
    """Where importance is read in one decoder layer."""

    layer: Any
    o_proj: Any  # its input: the concatenated heads
    down_proj: Any  # its input: the MLP neurons
    channel_inputs: tuple  # their inputs: what the attention and the MLP read from the residual stream


def layer_probes(model: Any) -> list[Probes]:
    """Per decoder layer, the modules whose inputs the importance hooks read.

    Channels are scored on the input of the attention's and the MLP's first projection: for pre-norm families
    that is exactly the RMSNorm output Minitron scores; for OLMo2 (no pre-norm) it is the residual stream itself.
    """
    fam = family(model.config)
    return [Probes(layer, layer.self_attn.o_proj, layer.mlp.down_proj,
                   (layer.get_submodule(fam.attn_in), layer.get_submodule(fam.mlp_in)))
            for layer in decoder_layers(model)]


def _biases(config: Any) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias) of `config`'s layers."""
    attention_bias = bool(getattr(config, "attention_bias", False))
    return attention_bias or family(config).qkv_bias, attention_bias, bool(getattr(config, "mlp_bias", False))


def layer_params(config: Any, written: str | None = None) -> dict[str, Param]:
    """Every parameter of one decoder layer of `config`'s architecture, by name relative to the layer; with
    `written` (see :func:`written_as`), of its student written as that model_type."""
    teacher = check_arch(config)
    fam = FAMILIES[written or teacher]
    qkv_bias, o_bias, mlp_bias = _biases(config)
    o_bias = o_bias or "self_attn.o_proj.bias" in zero_params(teacher, written or teacher)
    out: dict[str, Param] = {}
    if fam.fused:
        out["self_attn.qkv_proj.weight"] = Param(("qkv", "hidden"))
    else:
        for name, rows in (("q", "q"), ("k", "kv"), ("v", "kv")):
            out[f"self_attn.{name}_proj.weight"] = Param((rows, "hidden"))
            if qkv_bias:
                out[f"self_attn.{name}_proj.bias"] = Param((rows,))
    out["self_attn.o_proj.weight"] = Param(("hidden", "q"))
    if o_bias:
        out["self_attn.o_proj.bias"] = Param(("hidden",))
    if fam.head_norms is not None:
        per_head = fam.head_norms == "head"
        out["self_attn.q_norm.weight"] = Param(("head_dim" if per_head else "q",), norm=True)
        out["self_attn.k_norm.weight"] = Param(("head_dim" if per_head else "kv",), norm=True)
    if fam.fused:
        out["mlp.gate_up_proj.weight"] = Param(("gate_up", "hidden"))
    else:
        out["mlp.gate_proj.weight"] = Param(("mlp", "hidden"))
        out["mlp.up_proj.weight"] = Param(("mlp", "hidden"))
        if mlp_bias:
            out["mlp.gate_proj.bias"] = Param(("mlp",))
            out["mlp.up_proj.bias"] = Param(("mlp",))
    out["mlp.down_proj.weight"] = Param(("hidden", "mlp"))
    if mlp_bias:
        out["mlp.down_proj.bias"] = Param(("hidden",))
    for norm in fam.hidden_norms:
        out[f"{norm}.weight"] = Param(("hidden",), norm=True)
    return out


def model_params(config: Any) -> dict[str, Param]:
    """The parameters outside the decoder layers (``lm_head.weight`` only when not tied to the embeddings)."""
    out = {"model.embed_tokens.weight": Param(("vocab", "hidden")), "model.norm.weight": Param(("hidden",), True)}
    if not getattr(config, "tie_word_embeddings", False):
        out["lm_head.weight"] = Param(("vocab", "hidden"))
    return out


def written_as(config: Any, student: dict[str, int]) -> str:
    """The model_type a student of shape `student` (hidden_size, num_attention_heads, head_dim) is written as.

    vLLM 0.32's Qwen2 ignores ``config.head_dim`` and derives it as hidden_size // num_attention_heads, so a
    width-pruned Qwen2 whose hidden size is no longer heads x head_dim loads in transformers but not in vLLM.
    Such a student is written as Llama (``attention_bias=True``, a zero ``o_proj`` bias): transformers' Llama
    computes exactly Qwen2's function (same RMSNorm, RoPE, attention and SwiGLU; adding a zero bias changes no
    bit, so the logits are bit-identical), and vLLM's Llama reads ``config.head_dim``. This keeps every pruning
    axis available for Qwen2 teachers, which refusing such shapes (or tying hidden_size to the head count)
    would take away; the price is ``hidden_size`` zero parameters per layer. A student whose hidden size and
    head count are the teacher's stays Qwen2 (it loads wherever the teacher does; pruning nothing returns the
    teacher itself), and so does one whose shape vLLM's Qwen2 reads correctly.
    """
    model_type = check_arch(config)
    hidden, heads = student["hidden_size"], student["num_attention_heads"]
    if FAMILIES[model_type].vllm_derives_head_dim and hidden != heads * student["head_dim"] and \
            (hidden, heads) != (config.hidden_size, config.num_attention_heads):
        return "llama"
    return model_type


def check_writable(config: Any, student: dict[str, int]) -> None:
    """Raise ValueError when the student cannot be written in a form vLLM loads (see :func:`written_as`)."""
    if written_as(config, student) == "llama" and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        h, hd = student["num_attention_heads"], student["head_dim"]
        raise ValueError(f"prune target {student}: vLLM's {config.model_type} derives head_dim from hidden_size / "
                         f"num_attention_heads, and this teacher's sliding-window layers have no equivalent "
                         f"architecture that reads head_dim; keep prune.hidden_size = num_attention_heads x head_dim "
                         f"(here {h * hd}) or disable use_sliding_window")


def rewrite_config(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Config dict `d` (of the teacher's family, already at the student's shape) rewritten as `model_type`."""
    if model_type != "llama" or d.get("model_type") != "qwen2":
        raise ValueError(f"cannot write a {d.get('model_type')} student as {model_type}")
    d = {k: v for k, v in d.items() if k not in ("layer_types", "max_window_layers", "sliding_window",
                                                  "use_sliding_window")}
    d.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=False)
    return d


def zero_params(teacher_type: str, model_type: str) -> tuple[str, ...]:
    """Per-layer parameters (relative names) the student written as `model_type` has and the teacher lacks;
    they are written as zeros (:func:`written_as`)."""
    return ("self_attn.o_proj.bias",) if (teacher_type, model_type) == ("qwen2", "llama") else ()
