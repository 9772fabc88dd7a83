"""Multiple-choice evaluation: lm-eval's per-choice scoring vs one forward of each question's shared prefix.

    .venv/bin/python benchmarks/evaluation_speed.py [--limit 100 --repeats 3 --batch-size 16]

SmolLM2-135M-Instruct (fp32, CPU) is evaluated on the four standard tasks (compactlm_arc_easy, compactlm_piqa,
compactlm_hellaswag, compactlm_winogrande: compactlm's offline copies in ../shared/data) with ``--limit``
questions each, through :func:`compactlm.evaluation.evaluate_lm` twice per round on the same loaded model:

* ``before`` — ``eval.shared_prefix: false``: lm-eval's own ``HFLM`` (every choice is its own sequence);
* ``after``  — ``eval.shared_prefix: true`` (the default): :class:`compactlm.evaluation.prefix.SharedPrefixHFLM`.

A short untimed warm-up of both paths loads the datasets first. The two paths alternate (before, after, after,
before, ...) over ``--repeats`` rounds; each figure is the median over the rounds. Wall time is the whole
``evaluate_lm`` call (task building, data loading, scoring, metrics); ``scoring`` is the time inside
``lm.loglikelihood``; process CPU time (all threads) is beside the wall time, since on a shared machine wall time
also measures the neighbours. Every round's per-request log-likelihoods and greedy flags are recorded and
compared between the paths (max abs difference), and every task's acc / acc_norm must be identical. The 1-minute
load average is recorded before and after every run.

Prints one JSON object as its last line and writes it to benchmarks/results/evaluation_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data"
TASKS = ("compactlm_arc_easy", "compactlm_piqa", "compactlm_hellaswag", "compactlm_winogrande")
TARGET = 1.8


def _recording(lm) -> list:
    """Wrap lm.loglikelihood so that every answer (and its request) lands in the returned list, with the time."""
    record: list = []
    inner = lm.loglikelihood

    def loglikelihood(requests, disable_tqdm: bool = False):
        t0 = time.perf_counter()
        out = inner(requests, disable_tqdm=True)
        record.append({"seconds": time.perf_counter() - t0,
                       "answers": [(r.task_name, r.doc_id, r.idx, ll, greedy) for r, (ll, greedy) in
                                   zip(requests, out, strict=True)]})
        return out

    lm.loglikelihood = loglikelihood
    return record


def _run(lm, record: list, cfg) -> dict:
    from compactlm.evaluation import evaluate_lm

    record.clear()
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    out = evaluate_lm(lm, cfg, seed=0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    scores = {t: {k: out["tasks"][t][k] for k in ("acc", "acc_norm") if out["tasks"][t].get(k) is not None}
              for t in cfg.tasks}
    answers = sorted(a for call in record for a in call["answers"])
    return {"wall_s": wall, "cpu_s": cpu, "scoring_s": sum(c["seconds"] for c in record), "scores": scores,
            "answers": answers, "load_before": load, "load_after": os.getloadavg()[0]}


def _compare(before: list[dict], after: list[dict]) -> dict:
    """Max |log-likelihood difference|, greedy flags and acc / acc_norm equality over all rounds."""
    diff, greedy_same, n = 0.0, True, 0
    for b, a in zip(before, after, strict=True):
        for x, y in zip(b["answers"], a["answers"], strict=True):
            assert x[:3] == y[:3], (x, y)
            diff = max(diff, abs(x[3] - y[3]))
            greedy_same &= x[4] == y[4]
            n += 1
    scores = [r["scores"] for r in before + after]
    return {"loglikelihood_max_abs_diff": diff, "greedy_identical": greedy_same, "requests_compared": n,
            "scores_identical": all(s == scores[0] for s in scores)}


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=100, help="questions per task")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each runs both paths)")
    parser.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (sequences per forward)")
    parser.add_argument("--data-dir", default=str(DATA))
    parser.add_argument("--out", default=str(RESULTS / "evaluation_speed.json"))
    args = parser.parse_args(argv)

    from compactlm.evaluation.registry import offline_env

    offline_env()
    import torch

    from compactlm.config import EvalConfig
    from compactlm.evaluation.runner import hf_lm
    from compactlm.models import load_model, load_tokenizer, resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    cfg = EvalConfig(tasks=list(TASKS), limit=args.limit, batch_size=args.batch_size, perplexity=False,
                     speed=False, data_dir=args.data_dir)
    lms = {name: hf_lm(model, tok, cfg.model_copy(update={"shared_prefix": name == "after"}))
           for name in ("before", "after")}
    records = {name: _recording(lm) for name, lm in lms.items()}
    for name, lm in lms.items():  # warm-up: datasets loaded and cached, one-time initialisation
        _run(lm, records[name], cfg.model_copy(update={"limit": 2}))
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    load_start = os.getloadavg()
    for r in range(args.repeats):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            runs[name].append(_run(lms[name], records[name], cfg))
            print(f"round {r} {name}: {runs[name][-1]['wall_s']:.1f} s wall, load "
                  f"{runs[name][-1]['load_after']:.2f}", file=sys.stderr, flush=True)
    before_s, after_s = _median(runs["before"], "wall_s"), _median(runs["after"], "wall_s")
    result = {
        "model": "smollm2-135m-instruct", "dtype": "float32", "device": "cpu", "tasks": list(TASKS),
        "limit": args.limit, "batch_size": args.batch_size, "repeats": args.repeats,
        "before_s": before_s, "after_s": after_s, "ratio": round(before_s / after_s, 3), "target_ratio": TARGET,
        "before_cpu_s": _median(runs["before"], "cpu_s"), "after_cpu_s": _median(runs["after"], "cpu_s"),
        "cpu_ratio": round(_median(runs["before"], "cpu_s") / _median(runs["after"], "cpu_s"), 3),
        "scoring_before_s": _median(runs["before"], "scoring_s"),
        "scoring_after_s": _median(runs["after"], "scoring_s"),
        "runs_wall_s": {k: [round(r["wall_s"], 2) for r in v] for k, v in runs.items()},
        "scores": {k: v[0]["scores"] for k, v in runs.items()},
        **_compare(runs["before"], runs["after"]),
        "load_avg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()],
                     "max_1m_during": round(max(max(r["load_before"], r["load_after"]) for v in runs.values()
                                                for r in v), 2)},
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "command": "benchmarks/evaluation_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result["meets_target"] = result["ratio"] >= TARGET and result["scores_identical"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
