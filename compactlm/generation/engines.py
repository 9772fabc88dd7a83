"""Inference engines behind one tiny interface: vLLM offline batch (fast) and an HF fallback.

Both take a list of :class:`Request` (prompt token ids + a per-request seed) and return one
:class:`Completion` per request, in order. Per-request seeds make every sample independent of how requests are
batched or scheduled, which is what lets generation resume shard by shard and reproduce the uninterrupted run.

Log-probs are *raw*: log-softmax of the model's logits before temperature / top-p, matching vLLM's default
``logprobs_mode="raw_logprobs"`` and what a distillation loss against the teacher needs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from compactlm.runtime import start_vllm, stop_vllm


@dataclass(frozen=True)
class Request:
    prompt_id: int
    sample: int
    prompt_token_ids: tuple[int, ...]
    seed: int


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    topk_ids: list[list[int]] | None = None  # [T][k], aligned with token_ids (top-k ids, or k sampled draws)
    topk_logprobs: list[list[float]] | None = None  # the teacher's raw log-probs of those ids


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float
    top_p: float
    max_tokens: int
    topk_logprobs: int = 0
    #: What the k slots per token hold: "topk" = the k most likely ids; "sampled" = k ids drawn with replacement
    #: from the teacher's raw (T = 1) distribution, their own seeded generator per request (the text is the same
    #: either way); see compactlm.distillation.losses.sampled_kd_loss.
    logit_targets: str = "topk"


class Engine(Protocol):
    name: str
    start_seconds: float

    def generate(self, requests: list[Request], sampling: SamplingSettings, *,
                 progress: bool = False) -> list[Completion]: ...

    def close(self) -> None: ...


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it, bf16 matmuls fall back to
    slow paths: on an AVX2-only CPU vLLM generated 14 tok/s in bf16 and 79 tok/s in fp32 (SmolLM2-135M)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, engine: str, device: str) -> str:
    """'auto' -> bfloat16 on GPU; on CPU bfloat16 only where the CPU has native bf16, else float32.

    `engine` is accepted for symmetry; both engines follow the same rule.
    """
    if dtype != "auto":
        return dtype
    if device != "cpu":
        return "bfloat16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


# --------------------------------------------------------------------------------------------- HF engine


class HFEngine:
    """Batched left-padded decoding with a KV cache and one torch.Generator per request.

    Same sampling rule as vLLM (temperature, then nucleus top-p; temperature 0 = greedy) but written out
    rather than calling ``model.generate``, because ``generate`` draws from one global RNG for the whole batch
    and per-request seeds are what make resume exact.
    """

    name = "hf"

    def __init__(self, model_dir: str | os.PathLike, tokenizer, *, dtype: str = "auto", device: str = "auto",
                 batch_size: int = 64):
        from compactlm.models import eos_token_ids, load_model, pick_device

        t0 = time.perf_counter()
        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, "hf", self.device)
        self.model = load_model(model_dir, dtype=self.dtype, device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = eos_token_ids(model_dir, tokenizer)
        self.batch_size = batch_size
        self.start_seconds = time.perf_counter() - t0

    def generate(self, requests: list[Request], sampling: SamplingSettings, *,
                 progress: bool = False) -> list[Completion]:
        """One Completion per request, in order; `progress` shows requests done and generated tok/s."""
        import sys

        from tqdm.auto import tqdm

        out: list[Completion] = []
        t0, tokens = time.perf_counter(), 0
        with tqdm(total=len(requests), desc="hf generate", unit="req", disable=not progress, leave=False,
                  file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 15.0) as bar:
            for i in range(0, len(requests), self.batch_size):
                batch = self._generate_batch(requests[i:i + self.batch_size], sampling)
                out.extend(batch)
                tokens += sum(len(c.token_ids) for c in batch)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f}", refresh=False)
        return out

    def _generate_batch(self, reqs: list[Request], s: SamplingSettings) -> list[Completion]:
        import torch

        dev = self.device
        B = len(reqs)
        P = max(len(r.prompt_token_ids) for r in reqs)
        ids = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P), dtype=torch.long)
        for b, r in enumerate(reqs):  # left padding: every prompt ends at column P-1
            ids[b, P - len(r.prompt_token_ids):] = torch.tensor(r.prompt_token_ids)
            mask[b, P - len(r.prompt_token_ids):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gens = [torch.Generator(device=dev).manual_seed(r.seed) for r in reqs]
        target_gens = [torch.Generator(device=dev).manual_seed(r.seed + TARGET_SEED_OFFSET) for r in reqs]
        eos = torch.tensor(sorted(self.eos), device=dev)

        tokens: list[list[int]] = [[] for _ in reqs]
        top_ids: list[list[list[int]]] = [[] for _ in reqs]
        top_lp: list[list[list[float]]] = [[] for _ in reqs]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        reason = ["length"] * B
        past = None
        with torch.inference_mode():
            for _ in range(s.max_tokens):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True, logits_to_keep=1)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                nxt = self._sample(logits, s, gens)
                if s.topk_logprobs:
                    li, lp = logit_targets(logits, s, target_gens)
                live = (~done).nonzero().flatten().tolist()
                nxt_list = nxt.cpu().tolist()
                for b in live:
                    tokens[b].append(nxt_list[b])
                    if s.topk_logprobs:
                        top_ids[b].append(li[b])
                        top_lp[b].append(lp[b])
                stopped = torch.isin(nxt, eos) & ~done
                for b in stopped.nonzero().flatten().tolist():
                    reason[b] = "stop"
                done |= stopped
                if bool(done.all()):
                    break
                ids = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)[:, None]
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
                pos = pos[:, -1:] + 1
        return [
            Completion(tokens[b], reason[b], top_ids[b] if s.topk_logprobs else None,
                       top_lp[b] if s.topk_logprobs else None)
            for b in range(B)
        ]

    @staticmethod
    def _sample(logits, s: SamplingSettings, gens):
        """Greedy at temperature 0; else temperature, nucleus filter, and an inverse-CDF draw per row.

        Each row takes one uniform number from its own generator, so a sample never depends on its batch.
        """
        import torch

        if s.temperature == 0.0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if s.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            probs = probs.masked_fill(probs.cumsum(-1) - probs > s.top_p, 0.0)  # smallest prefix reaching top_p
        else:
            order = None
        cdf = probs.cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g, device=probs.device, dtype=cdf.dtype) for g in gens])
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        while True:  # never land on a zero-probability token (u * total can equal the last cdf value)
            bad = probs.gather(1, idx) == 0
            if not bool(bad.any()):
                break
            idx = torch.where(bad, idx - 1, idx).clamp(min=0)
        return (order.gather(1, idx) if order is not None else idx)[:, 0]

    def close(self) -> None:
        self.model = None


#: Offset of the per-request seed for the generator that draws sampled logit targets (the text keeps its own).
TARGET_SEED_OFFSET = 0x5EED


def logit_targets(logits, s: SamplingSettings, gens) -> tuple[list[list[int]], list[list[float]]]:
    """Per row of ``logits [B, V]``: k ids and the raw log-probs of them. ``topk``: the k most likely ids;
    ``sampled``: k draws with replacement from softmax(logits) (row b from ``gens[b]``), sorted by id so a row's
    layout never depends on draw order."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    k = s.topk_logprobs
    if s.logit_targets == "topk":
        lp, ids = logp.topk(k, dim=-1)
    else:
        probs = logp.exp()
        ids = torch.stack([torch.multinomial(probs[b], k, replacement=True, generator=g)
                           for b, g in enumerate(gens)]).sort(dim=-1).values
        lp = logp.gather(-1, ids)
    return ids.cpu().tolist(), lp.cpu().tolist()


# ------------------------------------------------------------------------------------------- vLLM engine

class VLLMEngine:
    """vLLM offline batch inference on token-id prompts (``TokensPrompt``), one seeded request per sample."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, *, dtype: str = "auto", max_model_len: int = 1024,
                 seed: int = 0, topk_logprobs: int = 0, tensor_parallel_size: int = 1):
        import torch

        t0 = time.perf_counter()
        self.dtype = resolve_dtype(dtype, "vllm", "cuda" if torch.cuda.is_available() else "cpu")
        self.llm = start_vllm(model_dir, dtype=self.dtype, max_model_len=max_model_len, seed=seed,
                              max_logprobs=max(20, topk_logprobs), tensor_parallel_size=tensor_parallel_size)
        self.start_seconds = time.perf_counter() - t0

    def generate(self, requests: list[Request], sampling: SamplingSettings, *,
                 progress: bool = False) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        k = sampling.topk_logprobs
        if k and sampling.logit_targets != "topk":  # the config refuses this first (GenerateConfig)
            raise ValueError("vLLM returns only its top log-probs: logit_targets 'sampled' needs the hf engine")
        params = [
            SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                           max_tokens=sampling.max_tokens, seed=r.seed, logprobs=k or None,
                           detokenize=False)  # text is decoded once, by the caller, with the HF tokenizer
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_token_ids)) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=progress)
        result = []
        for out in outputs:
            o = out.outputs[0]
            c = Completion(list(o.token_ids), "stop" if o.finish_reason == "stop" else "length")
            if k:
                c.topk_ids, c.topk_logprobs = _topk_from_vllm(o.logprobs, k)
                if len(c.topk_ids) != len(c.token_ids):
                    raise RuntimeError(f"vLLM returned {len(c.topk_ids)} log-prob rows for "
                                       f"{len(c.token_ids)} tokens")
            result.append(c)
        return result

    def close(self) -> None:
        llm, self.llm = self.llm, None
        stop_vllm(llm)


def _topk_from_vllm(logprobs, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM gives per position {token_id: Logprob(rank=...)} with the top-k plus the sampled token."""
    ids: list[list[int]] = []
    lps: list[list[float]] = []
    for pos in logprobs:
        items = sorted(pos.items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))
        top = [(t, lp) for t, lp in items if lp.rank is not None and lp.rank <= k][:k]
        if len(top) < k:  # ties or a missing rank: fall back to ordering by value
            top = sorted(pos.items(), key=lambda kv: -kv[1].logprob)[:k]
        ids.append([int(t) for t, _ in top])
        lps.append([float(lp.logprob) for _, lp in top])
    return ids, lps
