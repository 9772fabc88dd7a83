"""Which engine should sample the student in on-policy distillation on this machine (issue #18): HF ``generate``
inside the training process (the weights are always current) or a vLLM engine beside it (started once, its weights
re-synced from the training student every `refresh` steps)?

    .venv/bin/python benchmarks/onpolicy_sampler.py [--model smollm2-135m-instruct --steps 6]

One on-policy step samples `batch` prompts (AlpacaEval instructions, chat formatted) x up to `max_new_tokens`
tokens at T = 1, as ``distill.on_policy`` does (defaults: the on-policy benchmark's batch 4 x 64). Measured, float32
(the training student's dtype), both engines in this process, one after the other:

    hf_step_s       HF generate of one step's batch (median of `steps`)
    vllm_start_s    the trainer's vLLM sampler starting (compactlm.distillation.sampler.VLLMSampler: an
                    in-process engine core)
    vllm_step_s     its seeded samples of one step's batch (median)
    vllm_sync_s     its copy of the student's weights into the running engine (``VLLMSampler.load``: the worker's
                    in-place ``reload_weights``; median)
    sync_matches_hf after perturbing the student's weights and syncing, vLLM's greedy tokens are HF's on the
                    perturbed model (the sync really changes what vLLM samples from)
    break_even_steps on-policy steps after which vLLM (start + steps x (step + sync / refresh)) would cost less
                    than HF, per refresh period; null = never

Prints one JSON object as its last line and writes it to benchmarks/results/onpolicy_sampler.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED, write_result  # noqa: E402

INSTRUCTIONS = SHARED / "alpaca_eval" / "alpaca_eval_instructions.jsonl"


def _prompts(model_dir: Path, n: int) -> list[list[int]]:
    from compactlm.generation.prompts import format_prompts, load_prompts
    from compactlm.models import load_tokenizer

    rows = load_prompts(str(INSTRUCTIONS), "instruction")[:n]
    return [list(f.prompt_token_ids) for f in format_prompts(rows, load_tokenizer(model_dir), chat=True)]


def _hf_sample(model, prompts: list[list[int]], max_new: int, seed: int, greedy: bool = False) -> list[list[int]]:
    import torch

    pad = model.generation_config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=not greedy, temperature=None if greedy else 1.0,
                             top_p=None if greedy else 1.0, top_k=0 if not greedy else None, max_new_tokens=max_new,
                             pad_token_id=pad)
    return out[:, width:].tolist()


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def measure(args) -> dict:
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from compactlm.config import OnPolicyConfig
    from compactlm.distillation.sampler import VLLMSampler
    from compactlm.models import eos_token_ids, load_model, load_tokenizer, resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = resolve_model(args.model)
    prompts = _prompts(model_dir, args.batch * args.steps)
    steps = [prompts[i * args.batch:(i + 1) * args.batch] for i in range(args.steps)]
    model = load_model(model_dir, dtype="float32", device="cpu").eval()
    hf = [_timed(_hf_sample, model, batch, args.max_new_tokens, i) for i, batch in enumerate(steps)]

    # the trainer's sampler (distill.on_policy.engine: vllm): its engine, its weight copy, its seeded requests
    sampler = VLLMSampler(model_dir, cuda=False, seq_len=1024, seed=0)
    op = OnPolicyConfig(fraction=1.0, max_new_tokens=args.max_new_tokens, engine="vllm")
    eos = eos_token_ids(model_dir, load_tokenizer(model_dir))
    vl, sync = [], []
    for i, batch in enumerate(steps):
        vl.append(_timed(sampler.sample, batch, op, eos, i))
        sync.append(_timed(sampler.load, model))

    with torch.no_grad():  # a stand-in for training: move every weight, copy it in, then both decode greedily
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std())
    sampler.load(model)
    check = steps[0][:2]
    want = _hf_sample(model, check, 16, seed=0, greedy=True)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, detokenize=False)
    got = [list(o.outputs[0].token_ids)
           for o in sampler.llm.generate([TokensPrompt(prompt_token_ids=p) for p in check], greedy, use_tqdm=False)]
    start_s = sampler.start_seconds
    sampler.close()
    hf_s, vllm_s, sync_s = statistics.median(hf), statistics.median(vl), statistics.median(sync)
    return {"model": str(args.model), "batch": args.batch, "max_new_tokens": args.max_new_tokens,
            "steps": args.steps, "hf_step_s": round(hf_s, 3), "vllm_start_s": round(start_s, 2),
            "vllm_step_s": round(vllm_s, 3), "vllm_sync_s": round(sync_s, 3),
            "sync_matches_hf": [w[:len(t)] for w, t in zip(want, got)] == got and all(len(t) for t in got),
            "break_even_steps": {str(r): _break_even(hf_s, start_s, vllm_s, sync_s / r)
                                 for r in (1, 8, 32)},
            "hf_steps_s": [round(t, 3) for t in hf], "vllm_steps_s": [round(t, 3) for t in vl]}


def _break_even(hf_s: float, start_s: float, step_s: float, sync_per_step_s: float) -> int | None:
    saving = hf_s - step_s - sync_per_step_s
    return None if saving <= 0 else int(start_s / saving) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    load0 = os.getloadavg()
    result = {**measure(args), "load_avg": {"start": load0, "end": os.getloadavg()}, "cpu_count": os.cpu_count(),
              "command": "benchmarks/onpolicy_sampler.py " + " ".join(sys.argv[1:])}
    write_result("onpolicy_sampler", result)


if __name__ == "__main__":
    main()
