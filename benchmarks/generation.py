"""vLLM vs HF generate on the same teacher, prompts, sampling and token budget, measured in one run.

    .venv/bin/python benchmarks/generation.py [--prompts 256 --max-tokens 128 --hf-batch-sizes 16,64]

HF runs first over a sweep of batch sizes (and dtypes) on the same requests; the best HF configuration is
the baseline. vLLM then runs at its best dtype (``auto``: float32 on CPUs without native bf16, bfloat16 on GPU
and bf16-capable CPUs) on the same requests. bf16 is reported separately on the first ``--bf16-prompts``
requests, beside the auto dtype on that same subset (on AVX2-only CPUs bf16 is several times slower, so the
full size would not fit a time box). Throughput counts generated completion tokens over generation time;
engine start-up (model load, for vLLM also its worker processes) is reported separately. The 1-minute load
average is recorded before and after (the benchmark machine may be shared). Prints one JSON object as its
last line and writes it to benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_result  # noqa: E402


def _requests(model_dir: Path, n: int, seed: int):
    from compactlm.config import GenerateConfig
    from compactlm.generation.dataset import request_seed
    from compactlm.generation.engines import Request
    from compactlm.generation.prompts import prompts_from_config
    from compactlm.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    prompts, _ = prompts_from_config(GenerateConfig(), tok)  # the 64 built-in seed prompts, chat-formatted
    reqs = [Request(i, 0, prompts[i % len(prompts)].prompt_token_ids, request_seed(seed, i, 0)) for i in range(n)]
    return tok, reqs


def _measure(engine, reqs, sampling) -> dict:
    t0 = time.perf_counter()
    outs = engine.generate(reqs, sampling)
    secs = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"start_s": round(engine.start_seconds, 2), "gen_s": round(secs, 2), "tokens": tokens,
            "tok_s": round(tokens / secs, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--hf-batch-sizes", default="16,64")
    ap.add_argument("--hf-dtypes", default="float32", help="comma list; bf16 is ~20x slower on AVX2-only CPUs")
    ap.add_argument("--vllm-dtype", default="auto", help="auto = compactlm's resolve_dtype (the best dtype)")
    ap.add_argument("--bf16-prompts", type=int, default=32,
                    help="also measure vLLM bf16 (and auto, same engine as above) on this many prompts; 0 = skip")
    ap.add_argument("--hf-threads", type=int, default=0,
                    help="torch threads for HF (0 = torch's default); on a loaded machine 1 avoids OpenMP "
                    "oversubscription stalls")
    ap.add_argument("--name", default="generation")
    args = ap.parse_args()

    from compactlm.generation.engines import HFEngine, SamplingSettings, VLLMEngine
    from compactlm.models import resolve_model

    load_before = os.getloadavg()
    model_dir = resolve_model(args.model)
    tok, reqs = _requests(model_dir, args.prompts, seed=0)
    sampling = SamplingSettings(args.temperature, args.top_p, args.max_tokens)

    if args.hf_threads:
        import torch

        torch.set_num_threads(args.hf_threads)
    hf_runs = []
    for dtype in args.hf_dtypes.split(","):
        for bs in (int(b) for b in args.hf_batch_sizes.split(",")):
            engine = HFEngine(model_dir, tok, dtype=dtype, device="cpu", batch_size=bs)
            hf_runs.append({"dtype": dtype, "batch_size": bs, **_measure(engine, reqs, sampling)})
            engine.close()
            print(json.dumps({"hf": hf_runs[-1]}), flush=True)
    best = max(hf_runs, key=lambda r: r["tok_s"])

    engine = VLLMEngine(model_dir, dtype=args.vllm_dtype, max_model_len=1024, seed=0)
    vllm = _measure(engine, reqs, sampling)
    vllm_dtype = engine.dtype
    print(json.dumps({"vllm": {"dtype": vllm_dtype, **vllm}}), flush=True)
    bf16 = None
    if args.bf16_prompts:
        sub = reqs[:args.bf16_prompts]
        bf16 = {"prompts": len(sub), vllm_dtype: _measure(engine, sub, sampling)}
        engine.close()
        if vllm_dtype != "bfloat16":
            engine = VLLMEngine(model_dir, dtype="bfloat16", max_model_len=1024, seed=0)
            bf16["bfloat16"] = _measure(engine, sub, sampling)
        print(json.dumps({"vllm_bf16_subset": bf16}), flush=True)
    engine.close()

    result = {
        "model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "temperature": args.temperature, "top_p": args.top_p,
        "vllm_dtype": vllm_dtype, "vllm_tok_s": vllm["tok_s"], "vllm_start_s": vllm["start_s"],
        "vllm_gen_s": vllm["gen_s"], "vllm_tokens": vllm["tokens"],
        "hf_tok_s": best["tok_s"], "hf_best": {"dtype": best["dtype"], "batch_size": best["batch_size"]},
        "hf_runs": hf_runs, "ratio": round(vllm["tok_s"] / best["tok_s"], 2),
        "vllm_bf16_subset": bf16,
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "hf_threads": args.hf_threads or None,
        "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_result(args.name, result, indent=2)


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    main()
