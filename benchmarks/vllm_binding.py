"""vLLM on CPU: vLLM's default thread binding vs compactlm's (every core, none reserved), in each dtype.

    .venv/bin/python benchmarks/vllm_binding.py [--prompts 96 --max-tokens 128 --repeats 2]

vLLM's CPU backend binds its worker's OpenMP threads to one core and reserves the rest for its scheduler
(``VLLM_CPU_OMP_THREADS_BIND=auto``); compactlm's :func:`compactlm.runtime.cpu_binding` binds every core of the
process and reserves none. Each configuration (binding x dtype) runs in its own process (the binding is read when
the engine starts), on the same requests and sampling as the generation stage (the built-in prompts, chat
formatted); configurations alternate, `--repeats` rounds, and the median generation throughput (completion tokens
over generation seconds; engine start reported apart) counts. bfloat16 only where the CPU has native bf16
(elsewhere it is several times slower, see benchmarks/generation.py). Prints one JSON object as its last line
and writes it to benchmarks/results/vllm_binding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_result  # noqa: E402


def child(model: str, dtype: str, prompts: int, max_tokens: int) -> None:
    """One measurement in this process: start vLLM with the environment as given, generate, print JSON."""
    from generation import _measure, _requests

    from compactlm.generation.engines import SamplingSettings, VLLMEngine
    from compactlm.models import resolve_model

    model_dir = resolve_model(model)
    _, reqs = _requests(model_dir, prompts, 0)
    engine = VLLMEngine(model_dir, dtype=dtype, max_model_len=1024, seed=0)
    out = _measure(engine, reqs, SamplingSettings(max_tokens=max_tokens, temperature=0.8, top_p=0.95))
    engine.close()
    print("RESULT " + json.dumps(out), flush=True)


def run(binding: str, dtype: str, args) -> dict:
    from compactlm.runtime import cpu_binding

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_CPU_OMP", "VLLM_CPU_NUM_OF"))}
    env.update(cpu_binding() if binding == "all_cores" else {"VLLM_CPU_OMP_THREADS_BIND": "auto"})
    proc = subprocess.run([sys.executable, __file__, "--child", dtype, "--prompts", str(args.prompts),
                           "--max-tokens", str(args.max_tokens), "--model", args.model],
                          capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{binding}/{dtype} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.model, args.child, args.prompts, args.max_tokens)

    from compactlm.generation.engines import cpu_has_native_bf16

    dtypes = ["float32"] + (["bfloat16"] if cpu_has_native_bf16() else [])
    configs = [(b, d) for d in dtypes for b in ("vllm_default", "all_cores")]
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {f"{b}/{d}": [] for b, d in configs}
    for r in range(args.repeats):
        for b, d in configs if r % 2 == 0 else configs[::-1]:  # alternate the order between rounds
            runs[f"{b}/{d}"].append(run(b, d, args))
            print(json.dumps({"config": f"{b}/{d}", **runs[f"{b}/{d}"][-1]}), flush=True)
    median = {k: statistics.median(x["tok_s"] for x in v) for k, v in runs.items()}
    best = max(median, key=median.get)
    result = {
        "model": args.model, "prompts": args.prompts, "max_tokens": args.max_tokens, "repeats": args.repeats,
        "tok_s_median": median, "best": best,
        "speedup_all_cores": {d: round(median[f"all_cores/{d}"] / median[f"vllm_default/{d}"], 2) for d in dtypes},
        "runs": runs, "native_bf16": cpu_has_native_bf16(), "cpus": sorted(os.sched_getaffinity(0)),
        "machine": platform.machine(), "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_result("vllm_binding", result, indent=2)


if __name__ == "__main__":  # vLLM spawns worker processes that re-import this module
    main()
