"""Synthetic data generation: the teacher answers seed prompts (vLLM offline batch; HF fallback).

Public API::

    generate_dataset(model_dir, cfg: GenerateConfig, out_dir, *, seed=0, progress=True) -> manifest dict
    python -m compactlm.generation --model DIR --out DIR --config JSON_OR_PATH [--seed N]

Output (one row per kept completion, parquet shards ``data/shard-NNNNN.parquet`` + ``manifest.json`` last):
``id`` str "<prompt_id>-<sample>", ``prompt_id`` int64, ``sample`` int64, ``prompt`` str (raw user prompt),
``prompt_text`` str (exact formatted prompt, chat template included), ``completion`` str (decoded with the
teacher's tokenizer, special tokens skipped), ``prompt_token_ids`` list<int32> (exactly what the engine saw),
``completion_token_ids`` list<int32> (EOS included when generation stopped on it), ``finish_reason``
"stop"|"length"; with ``topk_logprobs: k > 0`` also ``topk_ids`` list<list<int32>> [T][k] and
``topk_logprobs`` list<list<float16>> [T][k], aligned with completion_token_ids, sorted by rank. Log-probs
are raw (log-softmax of the logits, before temperature/top-p). float16 is written natively: pyarrow >= 15
stores it as parquet's FLOAT16 logical type and ``datasets`` reads it back as ``float16``.

Inputs (``GenerateConfig.prompts``): the built-in seed set, a local .jsonl/.json/.csv/.parquet file, a
``save_to_disk`` directory, or ``hf:<dataset id>`` (offline without a cached copy: a ValueError naming the local
alternatives); each prompt is the row's ``prompt_field`` or ``template`` (``"{instruction}\n\n{input}"``) over
its fields; the chat template (and ``system_prompt``) is applied when the teacher has one.

Self-Instruct (``GenerateConfig.self_instruct``, :mod:`compactlm.generation.self_instruct`): the teacher first
writes new instructions from seeded random few-shot subsets of the prompts (pass 1, ``self_instruct/``); they are
parsed, filtered and deduplicated against the seeds and each other, then answered with the seeds (pass 2).

Filters (:mod:`compactlm.generation.filters`; drop counts in ``manifest.stats.dropped``): empty, truncated
(``drop_truncated``), min/max completion tokens, degenerate n-gram repetition, exact duplicates, MinHash
near-duplicates (``near_dup_threshold``, datasketch LSH). All deterministic under resume.

Determinism: each completion is sampled with its own seed derived from (seed, prompt_id, sample), and each
shard (a fixed prompt range) is generated as one engine call, so re-running after a crash skips finished
shards and yields the uninterrupted result. Exact dedup state is rebuilt from the finished shards.

vLLM on CPU: ``enforce_eager=True`` already turns off vLLM's model compilation, but a helper stays wrapped in
``torch.compile`` with the inductor backend (on CPU ``simple_compile_backend`` is "inductor"):
``vllm.v1.sample.ops.logprobs.batched_count_greater_than``, which ranks tokens whenever log-probs are asked for.
Its first calls (the warm-up dummy run, then a dynamic-shape recompile in the first real step) make inductor
generate and gcc-compile C++ (cached under ``$TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``),
which a fresh machine pays once. Without log-probs nothing is compiled. While the engine starts we set
``TORCH_COMPILE_DISABLE=1`` (unless the user set it), and the engine core runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, :func:`compactlm.runtime.vllm_cpu_env`) with dynamo turned off, so the
helper runs eagerly; outputs are identical.
Measured (2 shared, loaded cores; 64 prompts x 64 tokens, top-5 log-probs; start s + generate s): tiny model
cold inductor cache 101.7 + 61.1, warm cache 55.1 + 34.1, compile disabled 41.9 + 31.1; SmolLM2-135M cold
62.5 + 169.1, compile disabled 39.5 + 128.4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import os

    from compactlm.config import GenerateConfig

__all__ = ["generate_dataset"]


def generate_dataset(model_dir: str | os.PathLike, cfg: GenerateConfig, out_dir: str | os.PathLike, *,
                     seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Generate the dataset into `out_dir` and return its manifest (see :mod:`compactlm.generation.dataset`)."""
    from compactlm.generation.dataset import generate_dataset as _generate

    return _generate(model_dir, cfg, out_dir, seed=seed, progress=progress)
