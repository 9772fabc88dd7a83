"""vLLM on CPU: the engine core in a process of its own (vLLM's default) vs in the calling process (compactlm's).

    .venv/bin/python benchmarks/vllm_inprocess.py [--prompts 64 --max-tokens 128 --repeats 2]

SmolLM2-135M-Instruct through :func:`compactlm.runtime.start_vllm` (compactlm's CPU environment: every core bound,
a modest KV cache), ``--prompts`` seeded sampled completions of exactly ``--max-tokens`` tokens. Each round starts
one engine per mode, each in a fresh Python process (so neither finds vLLM imported or its caches warm from the
other), alternating the order: ``subprocess`` (``VLLM_ENABLE_V1_MULTIPROCESSING=1``: vLLM spawns its engine core)
and ``in_process`` (``=0``, what :func:`compactlm.runtime.vllm_cpu_env` sets). Per run: engine start s, generation s
and tokens/s, shutdown s; and how many completions are token for token the same between the two rounds of each
mode and across the modes (``completions_identical``).

Prints one JSON object as its last line and writes it to benchmarks/results/vllm_inprocess.json.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_result  # noqa: E402

WORDS = ["cat", "dog", "robot", "king", "child", "river", "tree", "ship"]


def _child(prompts: int, max_tokens: int) -> None:
    """One engine in this process: print its timings and tokens as JSON."""
    import vllm

    from compactlm.models import resolve_model
    from compactlm.runtime import start_vllm, stop_vllm

    model = resolve_model("smollm2-135m-instruct")
    t0 = time.perf_counter()
    llm = start_vllm(model, dtype="auto", max_model_len=512, seed=0)
    start = time.perf_counter() - t0
    texts = [f"Write a short story about a {WORDS[i % len(WORDS)]} number {i}." for i in range(prompts)]
    params = vllm.SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.8, seed=1)
    t1 = time.perf_counter()
    out = llm.generate(texts, params, use_tqdm=False)
    gen = time.perf_counter() - t1
    t2 = time.perf_counter()
    stop_vllm(llm)
    stop = time.perf_counter() - t2
    tokens = [list(o.outputs[0].token_ids) for o in out]
    print(json.dumps({"start_s": start, "generate_s": gen, "tok_s": sum(map(len, tokens)) / gen, "stop_s": stop,
                      "tokens": tokens}))


def _run(mode: str, prompts: int, max_tokens: int) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0" if mode == "in_process" else "1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", "--prompts", str(prompts), "--max-tokens",
                           str(max_tokens)], env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = wall
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.prompts, args.max_tokens)
        return
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {"subprocess": [], "in_process": []}
    for r in range(args.repeats):
        for mode in ("subprocess", "in_process") if r % 2 == 0 else ("in_process", "subprocess"):
            runs[mode].append(_run(mode, args.prompts, args.max_tokens))
            print(f"round {r} {mode}: start {runs[mode][-1]['start_s']:.1f} s, {runs[mode][-1]['tok_s']:.0f} tok/s",
                  file=sys.stderr, flush=True)

    def agree(a: dict, b: dict) -> float:  # share of completions that are token for token the same
        return sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=True)) / len(a["tokens"])

    agreement = {"within_subprocess": agree(*runs["subprocess"][:2]) if args.repeats > 1 else None,
                 "within_in_process": agree(*runs["in_process"][:2]) if args.repeats > 1 else None,
                 "across_modes": agree(runs["subprocess"][0], runs["in_process"][0])}

    def med(mode: str, key: str) -> float:
        return round(statistics.median(run[key] for run in runs[mode]), 2)

    keys = ("start_s", "generate_s", "tok_s", "stop_s", "process_wall_s")
    result = {
        "model": "smollm2-135m-instruct", "prompts": args.prompts, "max_tokens": args.max_tokens,
        "repeats": args.repeats, **{f"{mode}_{k}": med(mode, k) for mode in runs for k in keys},
        "runs": {mode: [{k: round(run[k], 2) for k in keys} for run in v] for mode, v in runs.items()},
        "start_ratio": round(med("subprocess", "start_s") / med("in_process", "start_s"), 2),
        "tok_s_ratio": round(med("in_process", "tok_s") / med("subprocess", "tok_s"), 3),
        "completions_identical": agreement,
        "load_avg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "command": "benchmarks/vllm_inprocess.py " + " ".join(sys.argv[1:]),
    }
    write_result("vllm_inprocess", result, indent=2)


if __name__ == "__main__":
    main()
