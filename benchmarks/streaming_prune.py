"""Pruning straight from the teacher's safetensors files (``prune.streaming``) vs loading the teacher (issue #16).

    .venv/bin/python benchmarks/streaming_prune.py [--teacher smollm2-135m-instruct --shape width-60]

Each mode prunes the same teacher with the same importance scores (benchmarks/repair.py's Gutenberg scores, cached
under runs/repair) to the same shape, in its own child process, so ``peak_rss_mib`` is that process's own high-water
mark (``ru_maxrss``, imports included); the baseline ``import_rss_mib`` is a child that only imports what both
import (torch, transformers' auto classes). Reports the teacher's fp32 size, each mode's peak RSS and wall time,
and whether the two student directories hold the same bytes (weights, config.json, generation_config.json,
tokenizer files). Prints one JSON object as its last line and writes it to
benchmarks/results/streaming_prune.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(teacher: str, scores: str, shape: str, out: str, streaming: bool) -> None:
    """One prune in this process (or only the imports when `out` is empty); prints its peak RSS."""
    import resource

    import torch  # noqa: F401  (what both modes import: the baseline child stops here)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from compactlm.config import PruneConfig
    from compactlm.pruning import prune_to_dir

    t0 = time.perf_counter()
    if out:
        prune_to_dir(teacher, scores, PruneConfig(**json.loads(shape), streaming=streaming), out)
    print("RESULT " + json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "wall_s": round(time.perf_counter() - t0, 2)}), flush=True)


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          timeout=1800, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--shape", default="width-60")
    ap.add_argument("--scores", default=str(REPO / "runs" / "repair"), help="benchmarks/repair.py's cache")
    ap.add_argument("--child", nargs=5, metavar=("TEACHER", "SCORES", "SHAPE", "OUT", "STREAMING"))
    args = ap.parse_args()
    if args.child:
        t, s, shape, out, streaming = args.child
        return child(t, s, shape, out, streaming == "1")
    from quality import SHARED, write_result
    from repair import SHAPES, cached_scores

    from compactlm.models import count_params_on_disk, resolve_model

    teacher = resolve_model(args.teacher)
    scores = cached_scores(teacher, SHARED / "gutenberg" / "gutenberg_14books_clean.txt", Path(args.scores),
                           {"calib_samples": 32, "calib_seq_len": 256})
    shape = json.dumps(SHAPES[args.shape])
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = _run(str(teacher), str(scores), shape, "", "0")
        rows = {mode: _run(str(teacher), str(scores), shape, f"{tmp}/{mode}", str(int(mode == "streaming")))
                for mode in ("in_memory", "streaming")}
        a, b = Path(tmp, "in_memory"), Path(tmp, "streaming")
        names = sorted(p.name for p in a.iterdir() if p.name not in ("pruning.json", "manifest.json"))
        identical = all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
        student_mib = (b / "model.safetensors").stat().st_size / 2**20
    result = {"teacher": args.teacher, "shape": args.shape, "model_fp32_mib": round(count_params_on_disk(teacher)
                                                                                    * 4 / 2**20, 1),
              "student_file_mib": round(student_mib, 1), "import_rss_mib": round(base["peak_rss_mib"], 1),
              "peak_rss_mib": round(rows["streaming"]["peak_rss_mib"], 1),
              "peak_rss_mib_in_memory": round(rows["in_memory"]["peak_rss_mib"], 1),
              "wall_s": rows["streaming"]["wall_s"], "wall_s_in_memory": rows["in_memory"]["wall_s"],
              "byte_identical": identical, "files_compared": names, "load_avg": {"start": load0,
                                                                                 "end": os.getloadavg()},
              "command": "benchmarks/streaming_prune.py " + " ".join(sys.argv[1:])}
    write_result("streaming_prune", result)


if __name__ == "__main__":
    main()
