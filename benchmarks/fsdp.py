"""Fully sharded distillation (``distill.strategy: fsdp``) vs one process (issue #16), side by side in one run.

    .venv/bin/python benchmarks/fsdp.py [--set steps=10 --set nproc=2]     # 2-core CPU, ~6 min

Teacher SmolLM2-135M-Instruct (online logit KD, forward KL), student the teacher cut to width-60 by plain slicing
(Gutenberg importance scores, cached under runs/repair), the same Gutenberg token stream, the same global batch
(``batch_size`` x ``seq_len``), ``steps`` steps, seed 0: once in one process (both cores), once as ``nproc`` FSDP
processes on gloo (compactlm starts them; the cores split between them). Reports the per-step loss difference
(``loss_max_rel_diff``), each run's trained state per process (parameters + gradients + AdamW moments, from the
summary's ``state_mib_per_rank``), tokens/s, and whether the published students agree. On CPU the point is the
memory split and the equal result, not speed: gloo reduce-scatters cost time two processes on two cores cannot
hide. Prints one JSON object as its last line and writes it to benchmarks/results/fsdp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED, with_overrides, write_result  # noqa: E402
from repair import SHAPES, cached_scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULTS: dict[str, Any] = {"steps": 10, "batch_size": 4, "seq_len": 128, "nproc": 2, "lr": 3e-4, "shape": "width-60"}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a default")
    args = ap.parse_args()
    p = with_overrides(DEFAULTS, args.set, "a setting")

    import torch
    from safetensors.torch import load_file

    from compactlm.config import DistillConfig, PruneConfig
    from compactlm.datasets import corpus_dataset
    from compactlm.distillation import distill
    from compactlm.models import resolve_model
    from compactlm.pruning import prune_to_dir

    t_start, load_start = time.perf_counter(), os.getloadavg()
    teacher = resolve_model(args.teacher)
    calib = SHARED / "gutenberg" / "gutenberg_14books_clean.txt"
    scores = cached_scores(teacher, calib, REPO / "runs" / "repair", {"calib_samples": 32, "calib_seq_len": 256})
    cfg = dict(steps=p["steps"], batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"], warmup_steps=2,
               log_every=1)
    with tempfile.TemporaryDirectory() as tmp:
        student, data = Path(tmp) / "student", Path(tmp) / "data"
        prune_to_dir(teacher, scores, PruneConfig(**SHAPES[p["shape"]]), student)
        corpus_dataset(calib, teacher, data, max_tokens=p["steps"] * p["batch_size"] * p["seq_len"] * 2, seed=1)
        runs = {}
        for name, extra in (("single", {}), ("fsdp", {"strategy": "fsdp", "nproc": p["nproc"]})):
            t0 = time.perf_counter()
            summary = distill(teacher, student, data, DistillConfig(**cfg, **extra), Path(tmp) / name, seed=0)
            runs[name] = {**summary, "wall_s": round(time.perf_counter() - t0, 1), "losses": _losses(Path(tmp) / name)}
            print(f"[fsdp] {name}: loss {summary['loss']:.4f}, {summary['tokens_per_s']:.0f} tok/s, state "
                  f"{summary['state_mib_per_rank']:.0f} MiB per process", flush=True)
        a = load_file(str(Path(tmp) / "single" / "model.safetensors"))
        b = load_file(str(Path(tmp) / "fsdp" / "model.safetensors"))
        weight_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    single, fsdp = runs["single"], runs["fsdp"]
    rel = [abs(x - y) / abs(y) for x, y in zip(fsdp["losses"], single["losses"], strict=True)]
    result = {"teacher": args.teacher, "student": p["shape"], "settings": p, "world_size": fsdp["world_size"],
              "loss_max_rel_diff": max(rel), "losses_single": single["losses"], "losses_fsdp": fsdp["losses"],
              "state_mib_per_rank_fsdp": fsdp["state_mib_per_rank"], "state_mib_single": single["state_mib_per_rank"],
              "state_ratio": round(fsdp["state_mib_per_rank"] / single["state_mib_per_rank"], 3),
              "tokens_per_s_fsdp": round(fsdp["tokens_per_s"], 1),
              "tokens_per_s_single": round(single["tokens_per_s"], 1),
              "wall_s_fsdp": fsdp["wall_s"], "wall_s_single": single["wall_s"], "student_params": single["params"],
              "max_abs_weight_diff": weight_diff, "torch": torch.__version__, "cpu_count": os.cpu_count(),
              "wall_s": round(time.perf_counter() - t_start, 1),
              "load_avg": {"start": load_start, "end": os.getloadavg()},
              "command": "benchmarks/fsdp.py " + " ".join(sys.argv[1:])}
    write_result("fsdp", result)


if __name__ == "__main__":
    main()
