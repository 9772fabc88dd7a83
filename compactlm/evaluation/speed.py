"""Short, fixed greedy-generation benchmarks: the decode-speed columns of the comparison table.

:func:`compare_speeds` (what the evaluate stage runs) measures several models side by side: decode tok/s at batch 1
and at batch 8, the models interleaved round after round and the median of the rounds reported, so that a
neighbour's burst of work on a shared machine lands on every model alike. :func:`generation_speed` times one model
alone (``evaluate_model`` with ``eval.speed``).

Every model gets the same work: :data:`SPEED_PROMPTS` (8 short plain-text prompts, no chat template, so
pruned and random models are measured the same way), left-padded into one batch of 8, and exactly
``new_tokens`` greedy tokens each (``min_new_tokens`` = ``max_new_tokens``, so an early EOS cannot make a
model look faster). One small warm-up call runs first; of ``repeats`` timed calls the fastest counts, which
damps noise from other processes on a shared CPU. Throughput = generated tokens / wall seconds of the call
(prefill included), with the model as it was loaded for scoring (float32 on CPU).
"""

from __future__ import annotations

import time
from typing import Any

SPEED_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Water boils at a temperature of",
    "A good way to learn a new language is",
    "The largest planet in our solar system is",
    "In 1969, the first humans to walk on the Moon",
    "To make a cup of tea, first",
    "Photosynthesis is the process by which plants",
    "The three primary colors are",
)


def generation_speed(model, tokenizer, *, prompts: int = 8, new_tokens: int = 32, batch_size: int = 8,
                     repeats: int = 2) -> dict[str, Any]:
    """Greedy-generate `new_tokens` tokens for each of `prompts` fixed prompts, `batch_size` at a time.

    `model` is a loaded HF causal LM (on any device), `tokenizer` its tokenizer; neither is modified
    (padding side and pad token are set on a shallow copy of the call's settings only). Returns
    ``{"tok_s": float, "seconds": float, "tokens": int, "prompts", "new_tokens", "batch_size", "repeats"}``
    where ``tokens = prompts * new_tokens`` and ``seconds`` is the fastest of `repeats` timed runs.
    """
    import torch

    for name, value in (("prompts", prompts), ("new_tokens", new_tokens), ("batch_size", batch_size),
                        ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"generation_speed: {name} must be >= 1, got {value}")
    texts = [SPEED_PROMPTS[i % len(SPEED_PROMPTS)] for i in range(prompts)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device

    def encode(batch: list[str]) -> dict[str, torch.Tensor]:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids], device=device)  # left pad
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        return {"input_ids": input_ids, "attention_mask": mask}

    batches = [encode(texts[i:i + batch_size]) for i in range(0, prompts, batch_size)]

    def run(n_tokens: int, inputs: list[dict[str, torch.Tensor]]) -> int:
        produced = 0
        for b in inputs:
            out = model.generate(**b, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=pad_id)
            produced += (out.shape[1] - b["input_ids"].shape[1]) * out.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return produced

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            run(2, batches[:1])  # warm-up: first-call allocations and kernel selection
            best = float("inf")
            tokens = 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                tokens = run(new_tokens, batches)
                best = min(best, time.perf_counter() - t0)
    finally:
        model.train(was_training)
    if tokens != prompts * new_tokens:
        raise RuntimeError(f"generation_speed: expected {prompts * new_tokens} new tokens, got {tokens}")
    return {"tok_s": tokens / best, "seconds": best, "tokens": tokens, "prompts": prompts,
            "new_tokens": new_tokens, "batch_size": batch_size, "repeats": repeats}


def _decode_tok_s(model, tokenizer, batch: int, new_tokens: int) -> float:
    """Tokens per second of one greedy generate call: `batch` prompts x `new_tokens` tokens (prefill included)."""
    return generation_speed(model, tokenizer, prompts=batch, new_tokens=new_tokens, batch_size=batch,
                            repeats=1)["tok_s"]


def compare_speeds(model_dirs: dict[str, str], *, device: str = "cpu", dtype: str = "float32", repeats: int = 3,
                   batch: int = 8, new_tokens: int = 16) -> dict[str, dict[str, Any]]:
    """Decode speed of each labelled model at batch 1 and at `batch`, medians over `repeats` interleaved rounds.

    On CPU every model is loaded first and each round times every model once (the order rotates each round); on a
    GPU (where one model may fill the device) each model is loaded in turn and timed `repeats` times. Returns
    ``{label: {"tok_s": median batch-1 tok/s, "tok_s_b1", "tok_s_batch", "batch_size", "new_tokens", "repeats",
    "runs_b1", "runs_batch"}}`` (``tok_s`` is the headline: batch-1 decode is what one user of the model waits on).
    """
    import statistics

    from compactlm.models import load_model, load_tokenizer

    if repeats < 1 or batch < 1 or new_tokens < 1:
        raise ValueError(f"compare_speeds: repeats, batch and new_tokens must be >= 1, got {repeats}, {batch}, "
                         f"{new_tokens}")
    labels = list(model_dirs)
    runs: dict[str, dict[str, list[float]]] = {label: {"b1": [], "batch": []} for label in labels}

    def time_once(label: str, model, tok) -> None:
        runs[label]["b1"].append(_decode_tok_s(model, tok, 1, new_tokens))
        runs[label]["batch"].append(_decode_tok_s(model, tok, batch, new_tokens))

    def load(label: str):
        model = load_model(model_dirs[label], dtype=dtype, device=device)
        tok = load_tokenizer(model_dirs[label])
        _decode_tok_s(model, tok, 1, 2)  # warm-up
        return model, tok

    if device.startswith("cuda"):
        for label in labels:
            model, tok = load(label)
            for _ in range(repeats):
                time_once(label, model, tok)
            del model
    else:
        loaded = {label: load(label) for label in labels}
        for r in range(repeats):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                time_once(label, *loaded[label])
    out = {}
    for label, got in runs.items():
        b1, bb = statistics.median(got["b1"]), statistics.median(got["batch"])
        out[label] = {"tok_s": b1, "tok_s_b1": b1, "tok_s_batch": bb, "batch_size": batch, "new_tokens": new_tokens,
                      "repeats": repeats, "runs_b1": got["b1"], "runs_batch": got["batch"]}
    return out
