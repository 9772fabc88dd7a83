"""The fixed choices a recipe offers, each defined once: the schema (config.py), the code that acts on them and
the Prefect forms all use these types, and the ``*_CHOICES`` tuples for checks and messages."""

from __future__ import annotations

from typing import Literal, get_args

#: Where torch runs: auto = CUDA when available, else CPU.
Device = Literal["auto", "cpu", "cuda"]
#: Prefect task runner for fan-outs (pruning candidates): threads, a local process pool, or Ray.
Runner = Literal["thread", "process", "ray"]
#: Logit-distillation divergences (compactlm/distillation/losses.py).
KDLoss = Literal["forward_kl", "reverse_kl", "jsd", "tv"]
#: Weights / compute dtype of an engine; auto = bf16 where the hardware has it, else fp32.
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
#: Generation engines.
Engine = Literal["vllm", "hf"]
#: Hidden-state distances (hidden-state KD).
HiddenLoss = Literal["cosine", "mse"]
#: How budget candidates are ranked right after pruning.
Proxy = Literal["loss", "kl"]
#: Importance aggregation over the sequence and over the batch (Minitron).
SeqAgg = Literal["mean", "l2", "var"]
BatchAgg = Literal["l2", "mean", "var"]

DEVICE_CHOICES: tuple[str, ...] = get_args(Device)
RUNNER_CHOICES: tuple[str, ...] = get_args(Runner)
KD_LOSS_CHOICES: tuple[str, ...] = get_args(KDLoss)
HIDDEN_LOSS_CHOICES: tuple[str, ...] = get_args(HiddenLoss)
PROXY_CHOICES: tuple[str, ...] = get_args(Proxy)
SEQ_AGG_CHOICES: tuple[str, ...] = get_args(SeqAgg)
BATCH_AGG_CHOICES: tuple[str, ...] = get_args(BatchAgg)

#: GGUF file types the export stage writes: float types come from llama.cpp's converter, the others from llama.cpp's
#: quantizer (types that need an importance matrix, e.g. iq2_xxs, are left out).
GgufType = Literal["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
                   "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_nl", "iq4_xs"]
#: Quantized HF directories for vLLM (compressed-tensors): int8 weights and activations, or int4 weights.
VllmScheme = Literal["w8a8", "w4a16"]

GGUF_TYPE_CHOICES: tuple[str, ...] = get_args(GgufType)
VLLM_SCHEME_CHOICES: tuple[str, ...] = get_args(VllmScheme)
