"""The README demo as a fresh user runs it: clone HEAD, `make install`, `make demo`, with an empty compactlm cache.

    .venv/bin/python benchmarks/demo.py [--keep]

Reports install and demo wall times, the lines `make demo` printed (``console_lines``: what a user reads without
``-v``), each stage's seconds (from the MLflow child runs the demo logged), the teacher / pruned / student figures
of its comparison (quality and decode tok/s at batch 1 and at a batch) and the export stage's rows (GGUF files:
size, perplexity, decode tok/s), and whether the student beats the pruned model on every quality column. pip's
own download cache is not cleared (on a machine with the package index on local disk that changes little). Prints
one JSON object as its last line and writes it to benchmarks/results/demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_result  # noqa: E402


def _timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, int]:
    """(wall seconds, lines printed) of `cmd`, its stdout and stderr appended to `log`."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        start = f.tell()
        subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    with open(log, "rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").count("\n")
    return round(time.perf_counter() - t0, 1), lines


def _beats(models: dict[str, dict]) -> bool | None:
    """Whether the student is better than the pruned model on every quality column (higher accuracies, lower word
    perplexity); None without a pruned row."""
    student, pruned = models.get("student"), models.get("pruned")
    if not student or not pruned:
        return None
    acc = [k for k in pruned if k.endswith(("/acc", "/acc_norm"))]
    return (all(student[k] > pruned[k] for k in acc)
            and (pruned["word_perplexity"] is None or student["word_perplexity"] < pruned["word_perplexity"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the clone (default: delete it)")
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    # The clone sits beside the repo so ../shared stays in reach, as in CI.
    clone = Path(tempfile.mkdtemp(prefix="compactlm-demo-", dir=REPO.parent))
    cache = Path(tempfile.mkdtemp(prefix="compactlm-cache-"))
    log = clone.parent / f"{clone.name}.log"
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True,
                                text=True, check=True).stdout.strip()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_", "PREFECT_API", "VIRTUAL_ENV"))}
        env["COMPACTLM_CACHE"] = str(cache)
        install_s, _ = _timed(["make", "install"], clone, env, log)
        demo_s, console_lines = _timed(["make", "demo"], clone, env, log)

        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{clone / 'runs' / 'mlflow.db'}")
        exp = client.get_experiment_by_name("compactlm-demo")
        runs = client.search_runs([exp.experiment_id])
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        stages = {r.info.run_name: round(r.data.metrics["stage_seconds"], 1) for r in runs
                  if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        results = json.loads(next((clone / "runs" / "evaluate").glob("*/results.json")).read_text())
        models = {label: {"params": r["params"],
                          **{f"{t}/{k}": v for t, m in r["tasks"].items() for k, v in m.items()
                             if k in ("acc", "acc_norm")},
                          "word_perplexity": (r.get("perplexity") or {}).get("word_perplexity"),
                          "tok_s_b1": (r.get("speed") or {}).get("tok_s_b1"),
                          "tok_s_batch": (r.get("speed") or {}).get("tok_s_batch")}
                  for label, r in results.items()}
        export_rows = [json.loads(f.read_text()) for f in (clone / "runs" / "export").glob("*/rows.json")]
        # The student is a normal HF directory: transformers loads it, vLLM serves it.
        student = next(p for p in (clone / "runs" / "distill").iterdir() if not p.name.startswith("."))
        from transformers import AutoModelForCausalLM

        hf_loads = AutoModelForCausalLM.from_pretrained(student).config.num_hidden_layers > 0
        gen_cfg = json.dumps({"engine": "vllm", "max_prompts": 4, "max_tokens": 16})
        subprocess.run([str(clone / ".venv" / "bin" / "python"), "-m", "compactlm.generation", "--model",
                        str(student), "--out", str(clone / "student-gen"), "--config", gen_cfg], cwd=clone, env=env,
                       check=True, capture_output=True)
        vllm_tokens = json.loads((clone / "student-gen" / "manifest.json").read_text())["stats"]["completion_tokens"]
        result = {"commit": commit, "student_loads_in_transformers": hf_loads,
                  "student_vllm_completion_tokens": vllm_tokens, "install_s": install_s, "demo_s": demo_s,
                  "console_lines": console_lines,
                  "total_s": round(install_s + demo_s, 1), "stage_s": stages,
                  "flow_s": round((parent.info.end_time - parent.info.start_time) / 1000, 1),
                  "models": models, "student_beats_pruned": _beats(models),
                  "student_faster_than_teacher_b1": (models["student"]["tok_s_b1"] or 0)
                  > (models["teacher"]["tok_s_b1"] or float("inf")),
                  "export": export_rows[0] if export_rows else None, "cpu_count": os.cpu_count(),
                  "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}
    finally:
        if not args.keep:
            shutil.rmtree(clone, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    write_result("demo", result, indent=2)


if __name__ == "__main__":
    main()
