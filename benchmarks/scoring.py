"""Importance scoring vs a plain forward over the same calibration set: wall time and peak memory, one run.

    .venv/bin/python benchmarks/scoring.py [--samples 32 --seq-len 256 --batch-size 8 --repeats 3]

The calibration set is ``--samples`` x ``--seq-len`` tokens of WikiText-2 (raw test split) packed with the
model's tokenizer, exactly as the score stage packs a text file. Two passes are compared:

* ``plain`` — :func:`compactlm.importance.calibration_loss`: a forward over every batch plus the LM loss;
* ``score`` — :func:`compactlm.importance.compute_importance` with ``layer_loss=False``: the same forward and
  loss with the scoring hooks (heads, neurons, channels, block influence) accumulating on the fly.

(``layer_loss=True`` adds one more full pass per layer by design and is not part of the comparison.)
Every measurement runs in a fresh subprocess, so peaks do not mix: the child loads the model in fp32, runs a
tiny warm-up forward (one-time library initialisation), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), records VmRSS, runs the pass, and reports VmHWM - VmRSS as the peak increase.
Children run with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``) so that freed tensors leave
the RSS at once and the peak measures live tensors, not heap fragmentation.
The two modes alternate (plain, score, score, plain, ...) over ``--repeats`` rounds; wall time is the best
round, peak increase the largest. Process CPU time (all threads) is reported beside wall time: on a shared,
oversubscribed machine wall time mostly measures the neighbours, CPU time the work done. The 1-minute load
average is recorded before and after. Prints one JSON object as its last line and writes it to
benchmarks/results/scoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_result  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw" / "wiki.test.raw"
TARGET = 1.1


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(mode: str, model_dir: str, ids_path: str, batch_size: int, threads: int) -> dict:
    """One measured pass in this (fresh) process."""
    import gc

    import torch
    from safetensors.torch import load_file

    from compactlm.importance import calibration_loss, compute_importance
    from compactlm.models import load_model

    if threads:
        torch.set_num_threads(threads)
    ids = load_file(ids_path)["ids"]
    model = load_model(model_dir, dtype="float32", device="cpu")
    calibration_loss(model, ids[:1, :16], batch_size=1)  # warm-up: one-time kernel / allocator setup
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _status_kib("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "plain":
        loss = calibration_loss(model, ids, batch_size=batch_size)
    else:
        loss = compute_importance(model, ids, batch_size=batch_size, layer_loss=False).base_loss
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kib("VmHWM")
    return {"mode": mode, "seconds": secs, "cpu_seconds": cpu, "peak_increase_mib": (peak - rss0) / 1024,
            "rss_before_mib": rss0 / 1024, "loss": loss, "threads": torch.get_num_threads()}


def _run_child(mode: str, model_dir: Path, ids_path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir), "--ids", str(ids_path),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed, after which freed tensors stay
    # in the heap and the peak RSS depends on fragmentation (+-60 MiB between runs of the same pass, measured).
    # With it every large tensor is mapped and unmapped, so the peak follows the live tensors in both passes.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=str(WIKITEXT))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child; 0 = torch's default")
    ap.add_argument("--name", default="scoring")
    ap.add_argument("--child", choices=("plain", "score"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.ids, args.batch_size, args.threads)))
        return

    from safetensors.torch import save_file

    from compactlm.calibration import calibration_ids
    from compactlm.models import load_tokenizer, resolve_model

    load_before = os.getloadavg()
    model_dir = resolve_model(args.model)
    ids = calibration_ids(args.data, load_tokenizer(model_dir), num_samples=args.samples, seq_len=args.seq_len)
    if tuple(ids.shape) != (args.samples, args.seq_len):
        raise ValueError(f"--data gave only {tuple(ids.shape)} calibration ids; use a larger text file")
    runs: dict[str, list[dict]] = {"plain": [], "score": []}
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "ids.safetensors"
        save_file({"ids": ids.contiguous()}, str(ids_path))
        for r in range(args.repeats):
            order = ("plain", "score") if r % 2 == 0 else ("score", "plain")
            for mode in order:
                runs[mode].append(_run_child(mode, model_dir, ids_path, args))

    best = {m: min(x["seconds"] for x in v) for m, v in runs.items()}
    cpu = {m: min(x["cpu_seconds"] for x in v) for m, v in runs.items()}
    cpu_ratio = cpu["score"] / cpu["plain"]
    peak = {m: max(x["peak_increase_mib"] for x in v) for m, v in runs.items()}
    time_ratio, mem_ratio = best["score"] / best["plain"], peak["score"] / peak["plain"]
    result = {
        "benchmark": args.name,
        "model": args.model,
        "data": Path(args.data).name,
        "samples": args.samples, "seq_len": args.seq_len, "tokens": int(ids.numel()), "batch_size": args.batch_size,
        "repeats": args.repeats, "threads": runs["plain"][0]["threads"],
        "plain_seconds": round(best["plain"], 2), "score_seconds": round(best["score"], 2),
        "time_ratio": round(time_ratio, 3),
        "plain_cpu_seconds": round(cpu["plain"], 2), "score_cpu_seconds": round(cpu["score"], 2),
        "cpu_time_ratio": round(cpu_ratio, 3),
        "plain_peak_increase_mib": round(peak["plain"], 1), "score_peak_increase_mib": round(peak["score"], 1),
        "mem_ratio": round(mem_ratio, 3),
        "target_ratio": TARGET, "meets_target": bool(time_ratio <= TARGET and mem_ratio <= TARGET),
        "meets_target_cpu_time": bool(cpu_ratio <= TARGET and mem_ratio <= TARGET),
        "plain_seconds_all": [round(x["seconds"], 2) for x in runs["plain"]],
        "score_seconds_all": [round(x["seconds"], 2) for x in runs["score"]],
        "loss_plain": round(runs["plain"][0]["loss"], 5), "loss_score": round(runs["score"][0]["loss"], 5),
        "model_rss_mib": round(runs["plain"][0]["rss_before_mib"], 1),
        "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
    }
    write_result(args.name, result, indent=2)


if __name__ == "__main__":
    main()
