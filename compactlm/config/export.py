"""The export section: deployable files made from the distilled student (GGUF for llama.cpp, quantized HF
directories for vLLM), each evaluated and timed like a deployment would run it."""

from __future__ import annotations

import difflib
from typing import Any, ClassVar

from pydantic import Field, field_validator

from compactlm.choices import GGUF_TYPE_CHOICES, VLLM_SCHEME_CHOICES, GgufType, VllmScheme
from compactlm.config.base import _Strict


def _known(values: Any, choices: tuple[str, ...], what: str, fix: str) -> Any:
    """Lower-case each value; an unknown one fails naming it, the closest known value and the fix."""
    if not isinstance(values, list):
        return values  # pydantic reports the wrong type
    out = []
    for v in values:
        name = v.strip().lower() if isinstance(v, str) else v
        if isinstance(name, str) and name not in choices:
            close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{v!r} is not {what}; {hint}known: {', '.join(choices)} ({fix})")
        out.append(name)
    if len(set(out)) != len(out):
        raise ValueError(f"{out} lists a type twice: give each once")
    return out


class ExportConfig(_Strict):
    """Deployable exports of the distilled student: GGUF files for llama.cpp / Ollama and quantized HF directories
    for vLLM. Each one is evaluated with the eval section's tasks and perplexity and timed (decode and prompt
    tokens/s at batch 1, peak memory, file size). Nothing is exported while both lists are empty."""

    gguf: list[GgufType] = Field(
        default_factory=list,
        description="GGUF types for llama.cpp, written by llama.cpp's own converter (f32, f16, bf16) and quantizer "
        "(q8_0, q4_k_m, ...), tokenizer and chat template inside; e.g. [f16, q8_0, q4_k_m]; empty = no GGUF",
    )
    vllm: list[VllmScheme] = Field(
        default_factory=list,
        description="Quantized HF directories for vLLM (compressed-tensors, round-to-nearest): w8a8 = int8 weights "
        "per channel and int8 activations per token; w4a16 = int4 weights in groups of group_size with 16-bit "
        "activations; empty = none",
    )
    group_size: int = Field(
        64, ge=8, le=1024,
        description="w4a16: weights per int4 group; must divide every linear layer's input size (SmolLM2: 64)")
    teacher: bool = Field(
        False, description="Also export, evaluate and time the teacher in the same formats (the table's reference)")
    evaluate: bool = Field(
        True, description="Score every export with the eval section's tasks and perplexity (GGUF through llama.cpp, "
        "vLLM directories through vLLM)")
    speed: bool = Field(
        True, description="Time every export as deployed: decode tokens/s at batch 1 and at decode_batch, prompt "
        "tokens/s, peak memory (RSS)")
    prompt_tokens: int = Field(256, ge=8, le=8192, description="Speed: prompt length for the prompt tokens/s")
    decode_tokens: int = Field(64, ge=4, le=4096, description="Speed: tokens generated one at a time per sequence")
    decode_batch: int = Field(
        8, ge=1, le=256, description="Speed: sequences decoded together for the batch decode tok/s (1 = batch 1 only)")
    threads: int | None = Field(
        None, ge=1, description="Speed and llama.cpp scoring: CPU threads; empty = every core of the machine")
    register_models: bool = Field(
        True, description="Register the student and each export as MLflow model versions (recipe, pruning record "
        "and metrics attached)")
    registered_model: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Registered model name of the student (exports get -<format> appended); empty = "
        "<recipe name>-student")

    #: Fields that do not change the exported files or their measurements: left out of the stage key.
    NOT_IN_KEY: ClassVar[frozenset[str]] = frozenset({"teacher", "register_models", "registered_model"})

    @field_validator("gguf", mode="before")
    @classmethod
    def _gguf_known(cls, v: Any) -> Any:
        return _known(v, GGUF_TYPE_CHOICES, "a GGUF type llama.cpp's quantizer knows",
                      "types needing an importance matrix are not offered")

    @field_validator("vllm", mode="before")
    @classmethod
    def _vllm_known(cls, v: Any) -> Any:
        return _known(v, VLLM_SCHEME_CHOICES, "a vLLM export scheme", "both run in vLLM's CPU build")

    @property
    def enabled(self) -> bool:
        return bool(self.gguf or self.vllm)
