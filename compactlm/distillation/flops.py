"""Model FLOPs per trained token and model FLOPs utilisation (MFU), from an HF ``config.json``.

Counts follow the PaLM appendix (Chowdhery et al., 2022): a forward pass costs 2 FLOPs per multiply-accumulate
of every weight matrix a token passes through (attention projections, MLP, LM head; embedding lookups are free)
plus the attention scores, 2 x 2 x n_heads x head_dim x context per layer (QK^T and AV, causal mask ignored, as
in PaLM). Training costs 3x the forward (backward = 2 forwards). Online KD adds one teacher forward per token; its
FLOPs are useful model FLOPs and count towards MFU too. Recomputation (gradient checkpointing) is not counted,
as MFU (unlike hardware FLOPs utilisation) excludes it.

MFU = tokens/s x model FLOPs per token / peak dense FLOP/s of the device in the training dtype.
"""

from __future__ import annotations

from typing import Any

#: Dense bf16 tensor-core peak, TFLOP/s, by substring of ``torch.cuda.get_device_name()`` (first match wins).
#: From the vendors' data sheets (dense, not the 2:4-sparsity figures).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0),
)


def _get(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    return value if value is not None else config.get("text_config", {}).get(key)


def forward_flops_per_token(config: dict[str, Any], context: int) -> float:
    """Forward FLOPs for one token with `context` tokens of attention context (HF ``config.json`` dict)."""
    d, layers = int(_get(config, "hidden_size")), int(_get(config, "num_hidden_layers"))
    heads = int(_get(config, "num_attention_heads"))
    kv = int(_get(config, "num_key_value_heads") or heads)
    head_dim = int(_get(config, "head_dim") or d // heads)
    inter, vocab = int(_get(config, "intermediate_size")), int(_get(config, "vocab_size"))
    attn_proj = d * head_dim * (2 * heads + 2 * kv)  # q, o: heads; k, v: kv heads
    mlp = 3 * d * inter  # gate, up, down
    per_layer = 2 * (attn_proj + mlp) + 2 * 2 * heads * head_dim * context
    return float(layers * per_layer + 2 * d * vocab)


def train_flops_per_token(student: dict[str, Any], seq_len: int, teacher: dict[str, Any] | None = None) -> float:
    """Model FLOPs per training token: 3 x the student's forward, plus the teacher's forward when given."""
    flops = 3 * forward_flops_per_token(student, seq_len)
    if teacher is not None:
        flops += forward_flops_per_token(teacher, seq_len)
    return flops


def peak_flops(device: str, configured_tflops: float | None = None) -> float | None:
    """Peak dense FLOP/s for MFU: `configured_tflops` when given, else the bf16 peak of a known CUDA device,
    else None (CPUs and unknown GPUs: MFU is not reported unless the user gives the peak)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(device))
    return next((t * 1e12 for key, t in PEAK_BF16_TFLOPS if key in name), None)
