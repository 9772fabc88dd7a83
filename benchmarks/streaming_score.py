"""Scoring a teacher one decoder layer at a time (``score.streaming``) vs loading it (issue #16).

    .venv/bin/python benchmarks/streaming_score.py [--teacher smollm2-135m-instruct]

Each mode scores the same teacher on the same calibration text (32 x 256 tokens of Gutenberg prose,
../shared/data; ``layer_loss: false``, batch 8; tokenizing, scoring, saving the tensors: the score stage less its
plots) in its own child process, so ``peak_rss_mib`` is that process's high-water mark (``ru_maxrss``, imports
included); ``import_rss_mib`` is a child that only imports what both import.
Then both modes run again inside a memory cgroup (v1, created here; needs root) whose limit leaves less than the
teacher's fp32 size above the imports (``limit_mib`` = what the group is charged for the imports alone,
``import_group_mib``, + 0.9 x model fp32): the in-memory pass cannot hold the model there, the streaming pass must
finish with the same scores. ``max_abs_score_diff`` is the largest
difference of any head, neuron, channel or layer score between the two unlimited runs. Prints one JSON object as its
last line and writes it to benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(teacher: str, calib: str, out: str, streaming: bool, cgroup: str) -> None:
    """One scoring in this process (only the imports when `out` is empty); prints its peak RSS."""
    if cgroup:  # join the limited group before anything is allocated, so every byte counts against it
        Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
    import resource

    import torch  # noqa: F401  (what both modes import: the baseline child stops here)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    from compactlm.calibration import calibration_ids
    from compactlm.importance.compute import compute_importance
    from compactlm.importance.streaming import stream_importance
    from compactlm.models import load_model, load_tokenizer

    t0 = time.perf_counter()
    if out:  # what the score stage computes (its plots and summary, the same in both modes, are left out)
        ids = calibration_ids(calib, load_tokenizer(teacher), num_samples=32, seq_len=256, seed=0)
        if streaming:
            scores = stream_importance(teacher, ids, batch_size=8)
        else:
            scores = compute_importance(load_model(teacher, dtype="float32"), ids, batch_size=8, layer_loss=False)
        Path(out).mkdir()
        scores.save_tensors(Path(out))
    print("RESULT " + json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "wall_s": round(time.perf_counter() - t0, 2)}), flush=True)


def _run(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"ok": False, "returncode": proc.returncode, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"ok": True, **json.loads(line.removeprefix("RESULT "))}


def _limited(limit_mib: float, *args: str) -> dict:
    """`_run` inside a fresh memory cgroup of `limit_mib` (swap off for it); {"skipped": why} without one."""
    group = CGROUP_ROOT / f"compactlm-bench-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(int(limit_mib * 2**20)))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(int(limit_mib * 2**20)))
    except OSError as e:
        return {"skipped": f"no memory cgroup: {e}"}
    try:
        out = _run(*args[:-1], str(group))
        out["oom_kills"] = int(next((ln.split()[1] for ln in (group / "memory.oom_control").read_text().splitlines()
                                     if ln.startswith("oom_kill ")), 0))
        out["group_peak_mib"] = round(int((group / "memory.max_usage_in_bytes").read_text()) / 2**20, 1)
        return out
    finally:
        group.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--child", nargs=5, metavar=("TEACHER", "CALIB", "OUT", "STREAMING", "CGROUP"))
    args = ap.parse_args()
    if args.child:
        t, c, out, streaming, cgroup = args.child
        return child(t, c, out, streaming == "1", cgroup)
    from quality import SHARED, write_result

    from compactlm.formats.scores import load_scores
    from compactlm.models import count_params_on_disk, resolve_model

    teacher, calib = resolve_model(args.teacher), SHARED / "gutenberg" / "gutenberg_14books_clean.txt"
    fp32 = count_params_on_disk(teacher) * 4 / 2**20
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = _run(str(teacher), str(calib), "", "0", "")
        rows = {m: _run(str(teacher), str(calib), f"{tmp}/{m}", str(int(m == "streaming")), "")
                for m in ("in_memory", "streaming")}
        a, b = load_scores(f"{tmp}/in_memory"), load_scores(f"{tmp}/streaming")
        diff = max(float((getattr(a, f) - getattr(b, f)).abs().max())
                   for f in ("heads", "neurons", "channels", "layer_block_influence"))
        # what the group is charged for the imports alone (shared library pages already cached elsewhere are not
        # charged to it, so this is below the import RSS): the limit leaves 0.9 x the fp32 model above that
        base_group = _limited(1 << 20, str(teacher), str(calib), "", "0", "")
        limit = base_group.get("group_peak_mib", base["peak_rss_mib"]) + 0.9 * fp32
        limited = {m: _limited(limit, str(teacher), str(calib), f"{tmp}/{m}-limited", str(int(m == "streaming")), "")
                   for m in ("in_memory", "streaming")}
        if limited["streaming"].get("ok"):
            c = load_scores(f"{tmp}/streaming-limited")
            limited["streaming"]["max_abs_score_diff_vs_in_memory"] = max(
                float((getattr(a, f) - getattr(c, f)).abs().max())
                for f in ("heads", "neurons", "channels", "layer_block_influence"))
    result = {"teacher": args.teacher, "model_fp32_mib": round(fp32, 1),
              "import_rss_mib": round(base["peak_rss_mib"], 1),
              "peak_rss_mib": round(rows["streaming"]["peak_rss_mib"], 1),
              "peak_rss_mib_in_memory": round(rows["in_memory"]["peak_rss_mib"], 1),
              "above_imports_mib": round(rows["streaming"]["peak_rss_mib"] - base["peak_rss_mib"], 1),
              "above_imports_mib_in_memory": round(rows["in_memory"]["peak_rss_mib"] - base["peak_rss_mib"], 1),
              "wall_s": rows["streaming"]["wall_s"], "wall_s_in_memory": rows["in_memory"]["wall_s"],
              "max_abs_score_diff": diff, "import_group_mib": base_group.get("group_peak_mib"),
              "limit_mib": round(limit, 1), "under_limit": limited,
              "load_avg": {"start": load0, "end": os.getloadavg()},
              "command": "benchmarks/streaming_score.py " + " ".join(sys.argv[1:])}
    write_result("streaming", result)


if __name__ == "__main__":
    main()
