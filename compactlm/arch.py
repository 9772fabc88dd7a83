"""Which decoder architectures the importance and pruning stages understand, and how to walk them.

All supported models share one layout (``model.embed_tokens``, ``model.layers[i].self_attn.{q,k,v,o}_proj``,
``model.layers[i].mlp.{gate,up,down}_proj``, two RMSNorms per layer, ``model.norm``, ``lm_head``); Qwen2 adds
q/k/v biases and Qwen3 per-head q/k RMSNorms over ``head_dim``, neither of which changes how scores are taken.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def check_arch(config: Any) -> str:
    """Return ``config.model_type`` or raise ValueError naming the supported architectures."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(
            f"model_type {model_type!r} is not supported for importance scoring / pruning; "
            f"supported architectures: {', '.join(SUPPORTED_ARCHS)}"
        )
    return model_type


def head_dim_of(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def decoder_layers(model: Any) -> list:
    """The decoder blocks of a supported causal LM, in order."""
    check_arch(model.config)
    return list(model.model.layers)
