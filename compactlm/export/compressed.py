"""Quantized HF directories for vLLM in the compressed-tensors format (the format llm-compressor writes and vLLM's
``compressed-tensors`` quantization loads), made with the compressed-tensors library vLLM itself depends on.

Schemes (compressed-tensors' presets, every ``Linear`` but ``lm_head``):

* ``w8a8``: int8 weights, one symmetric scale per output channel; activations quantized to int8 per token at run
  time (dynamic). vLLM CPU: oneDNN int8 GEMM (``CPUInt8ScaledMMLinearKernel``); runs in fp32 and bf16.
* ``w4a16``: int4 weights, one symmetric scale per `group_size` inputs, packed 8 per int32; 16-bit activations.
  vLLM CPU: ``CPUWNA16LinearKernel`` (needs a 16-bit dtype: fp32 fails with "cpu_gemm_wna16 not implemented for
  'Float'") and every linear's input and output sizes a multiple of 32.

Scales are round-to-nearest from each weight's own min/max (what llm-compressor's ``QuantizationModifier`` does
without GPTQ; llm-compressor itself cannot be installed here: 0.14 pins transformers <= 5.17 and
compressed-tensors 0.19, vLLM 0.32 pins 0.17). The other tensors (embeddings, norms) are stored in bfloat16.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compactlm.export.toolchain import ExportError
from compactlm.models import copy_model_side_files, load_model, load_tokenizer

#: compressed-tensors preset per scheme.
PRESETS = {"w8a8": "W8A8", "w4a16": "W4A16"}
#: vLLM's CPU int4 kernel wants input and output sizes that are multiples of this.
W4A16_ALIGN = 32
#: Files besides weights and tokenizer that travel with an export.
SIDE_FILES = ("pruning.json", "generation_config.json")


def _linears(model) -> list[tuple[str, Any]]:
    import torch

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"]


def check_shapes(model, scheme: str, group_size: int) -> None:
    """ExportError naming the first layer whose shape `scheme` (with `group_size`) cannot take in vLLM's CPU
    kernels, and the fix. w8a8 takes any shape."""
    if scheme != "w4a16":
        return
    for name, m in _linears(model):
        if m.in_features % group_size:
            divisors = [g for g in (32, 64, 128) if all(x.in_features % g == 0 for _, x in _linears(model))]
            fix = f"set export.group_size to {divisors[-1]}" if divisors else "use w8a8"
            raise ExportError(f"export.vllm: w4a16 with export.group_size {group_size} does not fit {name} "
                              f"({m.in_features} inputs is not a multiple of {group_size}): {fix}")
        if m.in_features % W4A16_ALIGN or m.out_features % W4A16_ALIGN:
            raise ExportError(f"export.vllm: w4a16 cannot run {name} ({m.in_features} x {m.out_features}) in vLLM's "
                              f"CPU int4 kernel, which needs sizes that are multiples of {W4A16_ALIGN}: use w8a8")


def _fit_scales(model, config) -> None:
    """Each quantized layer's scale (and zero point) from its weight's min / max (round to nearest)."""
    import torch
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    with torch.no_grad():
        for _, m in model.named_modules():
            scheme = getattr(m, "quantization_scheme", None)
            if scheme is None:
                continue
            w, args = m.weight.float(), scheme.weights
            if args.strategy == QuantizationStrategy.GROUP:
                groups = w.unflatten(-1, (w.shape[1] // args.group_size, args.group_size))
                lo, hi = groups.amin(-1), groups.amax(-1)
            else:
                lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
            scale, zero = calculate_qparams(lo, hi, args)
            m.weight_scale.copy_(scale.to(m.weight_scale.dtype))
            m.weight_zero_point.copy_(zero.to(m.weight_zero_point.dtype))


def write_compressed(model_dir: str | os.PathLike, dest: str | os.PathLike, scheme: str,
                     group_size: int = 64) -> dict[str, Any]:
    """Write `model_dir` quantized with `scheme` as the HF directory ``dest/vllm-<scheme>/`` (config.json with
    its ``quantization_config``, model.safetensors, tokenizer, pruning record) and return its record: name,
    format, type, path (relative to `dest`), size_bytes, quantized_layers, group_size."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if scheme not in PRESETS:
        raise ExportError(f"export.vllm: unknown scheme {scheme!r}; known: {', '.join(PRESETS)}")
    model_dir = Path(model_dir)
    out = Path(dest) / f"vllm-{scheme}"
    model = load_model(model_dir, dtype="float32")
    tokenizer = load_tokenizer(model_dir)
    check_shapes(model, scheme, group_size)
    qscheme = preset_name_to_scheme(PRESETS[scheme], ["Linear"])
    if qscheme.weights.group_size is not None:
        qscheme.weights.group_size = group_size
    config = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    _fit_scales(model, config)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.to(torch.bfloat16)  # floating tensors only: the int8 / packed int4 weights keep their dtype
    model.config.dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    compressor.update_config(str(out))
    tokenizer.save_pretrained(out)
    copy_model_side_files(model_dir, out, SIDE_FILES)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"name": f"vllm-{scheme}", "format": "vllm", "type": scheme, "path": out.name, "size_bytes": size,
            "quantized_layers": len(_linears(model)), "group_size": group_size if scheme == "w4a16" else None,
            "dtype": "bfloat16"}
