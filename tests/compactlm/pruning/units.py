"""Family-aware helpers of the pruning exactness checks (test_slicing.py, benchmarks/architectures.py): make units
provably unused in a teacher, and set the norms' eps."""

from __future__ import annotations

import torch

from compactlm.arch import FAMILIES


def zero_units(model, dead_heads: list[int], dead_neurons: list[int], dead_channels: list[int], dead_layer: int):
    """Make units provably unused, whatever the family's layout: heads' o_proj columns, neurons' up rows (the
    second half of Phi3's fused gate_up_proj), channels everywhere they enter the residual stream (embeddings,
    o_proj / down_proj rows and biases), and everything layer `dead_layer` writes.

    Family specifics: OLMo2's q_norm normalizes all query heads together, so a removed head must also have a
    zero query (its q_proj rows) for the others' normalization to be unchanged; where the sublayer outputs go
    through a norm (Gemma, OLMo2) a dead layer has zero post-norm factors instead of zero projections (an RMSNorm
    of an all-zero vector is 0/0 at eps=0)."""
    hd, I = model.config.head_dim, model.config.intermediate_size
    offset = 1.0 if model.config.model_type.startswith("gemma") else 0.0
    with torch.no_grad():
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            for h in dead_heads:
                att.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
                if model.config.model_type == "olmo2":
                    att.q_proj.weight[h * hd:(h + 1) * hd] = 0
            if hasattr(mlp, "gate_up_proj"):
                mlp.gate_up_proj.weight[[I + n for n in dead_neurons]] = 0
            else:
                mlp.up_proj.weight[dead_neurons] = 0
            att.o_proj.weight[dead_channels] = 0
            mlp.down_proj.weight[dead_channels] = 0
            if att.o_proj.bias is not None:
                att.o_proj.bias[dead_channels] = 0
        model.model.embed_tokens.weight[:, dead_channels] = 0
        dead = model.model.layers[dead_layer]
        if hasattr(dead, "post_feedforward_layernorm"):
            dead.post_attention_layernorm.weight.fill_(-offset)
            dead.post_feedforward_layernorm.weight.fill_(-offset)
        else:
            dead.self_attn.o_proj.weight.zero_()
            dead.mlp.down_proj.weight.zero_()


def set_norm_eps(modules, eps: float) -> None:
    """Set every RMSNorm's eps (``variance_epsilon``, or ``eps`` for Gemma's norms)."""
    for m in modules:
        if "RMSNorm" in type(m).__name__:
            setattr(m, "variance_epsilon" if hasattr(m, "variance_epsilon") else "eps", eps)


def set_effective_eps(model, eps: float, hidden_ratio: float, head_ratio: float) -> None:
    """Give the teacher's norms the eps a pruned student's rescaled norms amount to: eps * D'/D for the norms over
    the hidden size, eps * H'/H for OLMo2's q_norm over all query heads, eps elsewhere."""
    fam = FAMILIES[model.config.model_type]
    layers = list(model.model.layers)
    set_norm_eps(model.modules(), eps)
    set_norm_eps([model.model.norm] + [getattr(layer, n) for layer in layers for n in fam.hidden_norms],
                  eps * hidden_ratio)
    if fam.head_norms == "projection":
        set_norm_eps([layer.self_attn.q_norm for layer in layers], eps * head_ratio)
