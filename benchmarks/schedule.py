"""Iterative pruning (issue #17): the width-60 student reached in one cut vs in rounds of prune -> distill
(``schedule.rounds``), at the same total KD tokens.

    .venv/bin/python benchmarks/schedule.py        # 2-core CPU, ~25 min -> results/schedule.{json,png}

Teacher SmolLM2-135M-Instruct, the width-60 shape of the headline experiment (benchmarks/quality.py), every cut
with the least-squares repair (``prune.repair``), importance scores and repair calibration from 32 x 256 tokens of
Gutenberg prose (../shared/data). Each arm distills ``kd_tokens`` in all (logit KD, forward KL, teacher online, on
Gutenberg text): one cut spends them on the final student; ``rounds`` = R spends ``share`` of them healing the
R - 1 intermediate students (equal parts) and the rest on the final one, each round scoring the student the round
before healed, the data order continuing across rounds (``distill.skip_rows``): exactly what the compress flow
runs for ``schedule: {rounds: R, share}`` (``tasks/schedule.py``), here called through the library.
Evaluation: ARC-Easy, PIQA, HellaSwag, WinoGrande (0-shot, first `limit` examples each) and held-out word
perplexity. Every artifact is cached under --out (a killed run resumes).

Prints one JSON object as its last line and writes it to benchmarks/results/schedule.json (rows: student,
method, tokens, word_ppl, avg_acc, above_chance_kept, ...), with a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import TASKS, _json_cached, evaluate, with_overrides  # noqa: E402
from repair import SHAPES, _prune, _row, gutenberg_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULTS: dict[str, Any] = {"limit": 300, "eval_batch_size": 16, "calib_samples": 32, "calib_seq_len": 256,
                            "kd_tokens": 32768, "batch_size": 4, "seq_len": 128, "lr": 3e-4, "warmup_steps": 2,
                            "damping": 0.01, "student": "width-60", "rounds": [1, 2, 3], "share": 0.5,
                            "method": "least_squares"}


def run_rounds(teacher: Path, scores: Path, calib: Path, classic: Path, rounds: int, p: dict,
               root: Path) -> tuple[Path, list[dict]]:
    """The student of `rounds` rounds (1 = one cut): (its dir, one row per round)."""
    from transformers import AutoConfig

    from compactlm.config import SHAPE_FIELDS, DistillConfig, PruneConfig, ScoreConfig
    from compactlm.distillation import distill
    from compactlm.importance import score_model
    from compactlm.pruning.schedule import describe, round_shapes, round_steps
    from compactlm.pruning.shapes import target_shape

    config = AutoConfig.from_pretrained(teacher)
    final = {k: v for k, v in target_shape(config, PruneConfig(**SHAPES[p["student"]])).items() if k in SHAPE_FIELDS}
    steps = round_steps(p["kd_tokens"] // (p["batch_size"] * p["seq_len"]), rounds, p["share"])
    plan = describe(config, round_shapes(config, final, rounds), steps)
    model, model_scores, arm = teacher, scores, root / f"rounds-{rounds}"
    for row in plan:
        r = row["round"]
        if r > 1:  # score the student the round before healed, as the flow's score-r{r} does
            model_scores = arm / f"score-{r}"
            if not (model_scores / "manifest.json").is_file():
                score_model(model, calib, ScoreConfig(num_samples=p["calib_samples"], seq_len=p["calib_seq_len"],
                                                      layer_loss=False), model_scores)
        pruned = arm / f"prune-{r}"
        row["prune"] = _prune(model, model_scores, calib, row["shape"], p["method"], pruned, p)
        cfg = DistillConfig(steps=row["steps"], batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"],
                            warmup_steps=min(p["warmup_steps"], row["steps"]), log_every=max(1, row["steps"] // 8),
                            skip_rows=sum(steps[:r - 1]) * p["batch_size"])
        model = arm / f"distill-{r}"
        if not (model / "manifest.json").is_file():
            distill(teacher, pruned, classic, cfg, model, seed=0, device="cpu")
        row["final_kd_loss"] = json.loads((model / "manifest.json").read_text())["metrics"]["kd_loss"]
    return model, plan


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in rows if r["student"] != "teacher"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "word_ppl", "held-out word perplexity"),
                           (axes[1], "above_chance_kept", "% of the teacher's above-chance margin kept")):
        ax.bar([r["method"] for r in arms], [r[key] for r in arms], color="tab:blue")
        ax.set_title(label)
    fig.suptitle(f"SmolLM2-135M-Instruct -> {arms[0]['student']}: one cut vs rounds, "
                 f"{arms[0]['tokens']:,} KD tokens each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(REPO / "runs" / "schedule"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a default")
    args = ap.parse_args()
    p = with_overrides(DEFAULTS, args.set, "a setting")
    p["device"] = "cpu"

    from compactlm.models import resolve_model

    t_start, load_start = time.perf_counter(), os.getloadavg()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    teacher = resolve_model(args.teacher)
    calib, scores, classic, t_ev, rows = gutenberg_inputs(teacher, root, p)
    for rounds in p["rounds"]:
        t0 = time.perf_counter()
        student, plan = run_rounds(teacher, scores, calib, classic, rounds, p, root)
        ev = _json_cached(root / "eval" / f"rounds-{rounds}.json", lambda d=student: evaluate(d, p, 0))
        method = "one_cut" if rounds == 1 else f"rounds-{rounds}"
        rows.append(_row(p["student"], method, p["kd_tokens"], ev, t_ev,
                         {"params": ev["params"], "rounds": plan, "arm_s": round(time.perf_counter() - t0, 1)}))
        print(f"[schedule] {method}: ppl {ev['word_perplexity']:.1f} avg {ev['avg']:.3f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / "schedule.png")
    result = {"teacher": args.teacher, "settings": p, "shape": SHAPES[p["student"]], "tasks": list(TASKS),
              "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1),
              "load_avg": {"start": load_start, "end": os.getloadavg()}, "cpu_count": os.cpu_count(),
              "command": "benchmarks/schedule.py " + " ".join(sys.argv[1:])}
    (RESULTS / "schedule.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
