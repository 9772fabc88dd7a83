"""Load several model directories in vLLM, one after another in this one process, and print one line per model:
``VLLM_OK <index> {"ids": [...], "logprobs": [...]}`` (the greedy tokens after a fixed prompt and vLLM's log-prob
of each) or ``VLLM_FAIL <index> <error>``.

    python tests/scripts/vllm_greedy.py [--max-tokens N] [--dtype D] MODEL_DIR [MODEL_DIR ...]

vLLM is imported once and each engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the
``uni`` executor: no engine-core or worker process to spawn, which is what costs ~30 s per engine on two cores);
each is shut down before the next starts, so N models cost one import (~15 s) plus ~5 s per model. A model
that fails to load or generate is reported and the next one still runs.
"""

import argparse
import gc
import json
import os

PROMPT = "The capital of France is"


def greedy(model_dir: str, max_tokens: int, dtype: str = "float32") -> dict:
    from vllm import LLM, SamplingParams

    # the CPU backend reserves gpu_memory_utilization x RAM for the KV cache: keep it small on a shared box
    llm = LLM(model=model_dir, dtype=dtype, enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.1,
              distributed_executor_backend="uni", trust_remote_code=False)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=0)  # 0: the chosen token's only
        out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
        ids = list(out.token_ids)
        return {"ids": ids, "logprobs": [step[t].logprob for t, step in zip(ids, out.logprobs)]}
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32", help="bfloat16 for int4 weights (vLLM's CPU kernel has no fp32)")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    for i, model in enumerate(args.models):
        try:
            result = greedy(model, args.max_tokens, args.dtype)
        except Exception as e:  # noqa: BLE001 - report the failure and go on with the next model
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:2000]
            print(f"VLLM_FAIL {i} {msg}", flush=True)
        else:
            print(f"VLLM_OK {i} {json.dumps(result)}", flush=True)
