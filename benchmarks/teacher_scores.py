"""Teacher reference scores: SmolLM2-135M-Instruct on ARC-Easy, PIQA, HellaSwag and WinoGrande (0-shot).

    .venv/bin/python benchmarks/teacher_scores.py [--limit 200 --batch-size 16 --backend hf]

Uses the shipped local tasks over local copies of the benchmarks (``compactlm_<task>`` with ``eval.data_dir``
= ``--data-dir``, default ../shared/data beside the repository), the first ``--limit`` examples of each, through
:func:`compactlm.evaluation.evaluate_model` exactly as the pipeline's evaluate stage does (float32 on CPU,
bootstrap off), plus held-out perplexity and the greedy tok/s benchmark. ``cpu_seconds`` (process CPU time,
all threads) next to the wall time tells how much of the wall time is other load on a shared machine. Prints one JSON
object as its last line and writes it to benchmarks/results/teacher_scores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("compactlm_arc_easy", "compactlm_piqa", "compactlm_hellaswag", "compactlm_winogrande")


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default=str(SHARED), help="folder with the benchmark copies (eval.data_dir)")
    ap.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--name", default="teacher_scores")
    args = ap.parse_args()

    from compactlm.config import EvalConfig
    from compactlm.evaluation import evaluate_model, main_metric
    from compactlm.models import resolve_model

    model_dir = resolve_model(args.model)
    cfg = EvalConfig(tasks=args.tasks.split(","), limit=args.limit, batch_size=args.batch_size,
                     backend=args.backend, perplexity=True, speed=True, data_dir=args.data_dir)
    load_before = _load()
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate_model(model_dir, cfg, device="cpu", seed=0)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0  # cpu: all threads of this process

    scores = {}
    for task, metrics in res["tasks"].items():
        scores[task.removeprefix("compactlm_")] = {k: round(v, 4) for k, v in metrics.items()
                                                   if k in ("acc", "acc_norm") and v is not None}
        scores[task.removeprefix("compactlm_")]["main"] = main_metric(metrics)
    result = {
        "model": args.model, "model_dir": str(model_dir), "backend": args.backend, "limit": args.limit,
        "num_fewshot": cfg.num_fewshot, "batch_size": args.batch_size, "dtype": "float32",
        "scores": scores,
        "samples": {t.removeprefix("compactlm_"): n["effective"] for t, n in res["lm_eval"]["n-samples"].items()},
        "word_perplexity": round(res["perplexity"]["word_perplexity"], 3),
        "tok_s": round(res["speed"]["tok_s"], 1),
        "params": res["params"], "size_mb": round(res["size_bytes"] / 1e6, 1),
        "total_seconds": round(total, 1),
        "cpu_seconds": round(cpu, 1) if args.backend == "hf" else None,  # vllm works in child processes
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load_before,
                    "load_after": _load()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
