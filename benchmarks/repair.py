"""Repair after pruning (issue #17): plain Minitron slicing vs `prune.repair` (least-squares refit of every kept
layer's o_proj and down_proj on the teacher's activations) vs the same refit with `prune.repair.hidden: pca` (the
hidden size cut along the residual stream's principal components), right after pruning and after the same short
KD.

    .venv/bin/python benchmarks/repair.py                 # 2-core CPU, ~30 min -> results/repair.{json,png}
    .venv/bin/python benchmarks/repair.py --set untie=true --set 'shapes=["width-60"]' \
        --set 'kd_students=["width-60"]'                   # + the pca arm -> results/repair_untied.{json,png}

Teacher SmolLM2-135M-Instruct; the four shapes of the headline experiment (benchmarks/quality.py: width-60,
depth-60, width-50, depth-50), importance scores and repair calibration from 32 x 256 tokens of Gutenberg prose
(../shared/data), the same for every method. The pca arm (``prune.repair.hidden: pca``) needs a teacher
whose output head is not tied to its embeddings: ``untie=true`` runs every arm on an untied copy of the teacher (the
same function; its students keep vocab x hidden more parameters, the same for every arm). Depth-only students
lose no unit inside a kept layer, so the repair
leaves them bit-identical (checked here, and their rows say so) and they are evaluated once. Then logit KD
(forward KL, teacher online) on Gutenberg text at the same tokens from both starting points of each width student.
Evaluation: ARC-Easy, PIQA, HellaSwag, WinoGrande (0-shot, first `limit` examples each) and held-out word
perplexity, through compactlm's evaluate_model. Every artifact is cached under --out (a killed run resumes).

Prints one JSON object as its last line and writes it to benchmarks/results/repair.json (rows: student, method,
tokens, word_ppl, avg_acc, above_chance_kept, ...), with a plot next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED, TASKS, _json_cached, evaluate, kept, with_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
#: The shapes benchmarks/quality.py's budget search picked (docs/benchmarks.md, both profiles).
SHAPES = {"width-60": {"hidden_size": 456, "num_attention_heads": 6, "intermediate_size": 1024},
          "depth-60": {"num_hidden_layers": 14},
          "width-50": {"hidden_size": 360, "intermediate_size": 960},
          "depth-50": {"num_hidden_layers": 11}}
#: plain = Minitron slicing; least_squares = prune.repair (refit o_proj / down_proj); pca = the same refit with
#: prune.repair.hidden: pca (the residual stream rotated onto its principal components before the hidden cut).
METHODS = ("plain", "least_squares", "pca")
DEFAULTS: dict[str, Any] = {"limit": 300, "eval_batch_size": 16, "calib_samples": 32, "calib_seq_len": 256,
                            "kd_tokens": 32768, "batch_size": 4, "seq_len": 128, "lr": 3e-4, "warmup_steps": 2,
                            "kd_students": ["width-60", "width-50"], "damping": 0.01, "shapes": list(SHAPES),
                            "untie": False}


def untied_copy(teacher: Path, out: Path) -> Path:
    """`teacher` with its tied output head made a matrix of its own (the same function, vocab x hidden more
    parameters), written once to `out` in the teacher's dtype."""
    if not (out / "model.safetensors").is_file():
        import torch

        from compactlm.models import copy_model_side_files, load_model

        model = load_model(teacher)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.save_pretrained(out)
        copy_model_side_files(teacher, out)
    return out


def cached_scores(teacher: Path, calib: Path, root: Path, p: dict) -> Path:
    """Importance scores of `teacher` on `calib` (``calib_samples`` x ``calib_seq_len``), computed once into
    ``root/scores``."""
    from compactlm.config import ScoreConfig
    from compactlm.importance import score_model

    scores = root / "scores"
    if not (scores / "manifest.json").is_file():
        score_model(teacher, calib, ScoreConfig(num_samples=p["calib_samples"], seq_len=p["calib_seq_len"],
                                                layer_loss=False), scores)
    return scores


def gutenberg_inputs(teacher: Path, root: Path, p: dict) -> tuple[Path, Path, Path, dict, list[dict]]:
    """What the Gutenberg quality benchmarks (this one, schedule.py, ranking.py) start from, each cached under
    `root`: (the calibration text, `teacher`'s importance scores on it, the KD corpus of ``kd_tokens`` (+ one
    sequence) drawn from it, the teacher's evaluation, the result rows starting with the teacher's)."""
    from compactlm.datasets import corpus_dataset

    calib = SHARED / "gutenberg" / "gutenberg_14books_clean.txt"
    scores = cached_scores(teacher, calib, root, p)
    classic = root / "classic"
    if not (classic / "manifest.json").is_file():
        corpus_dataset(calib, teacher, classic, max_tokens=p["kd_tokens"] + p["seq_len"], seed=1)
    t_ev = _json_cached(root / "eval" / "teacher.json", lambda: evaluate(teacher, p, 0))
    return calib, scores, classic, t_ev, [_row("teacher", "-", 0, t_ev, t_ev, {"params": t_ev["params"]})]


def _weights_digest(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


def _prune(teacher: Path, scores: Path, calib: Path, shape: dict, method: str, out: Path, p: dict) -> dict:
    from compactlm.config import PruneConfig, RepairConfig
    from compactlm.pruning import prune_to_dir

    if not (out / "manifest.json").is_file():
        repair = None if method == "plain" else RepairConfig(num_samples=p["calib_samples"],
                                                             seq_len=p["calib_seq_len"], damping=p["damping"],
                                                             hidden="pca" if method == "pca" else "slice")
        t0 = time.perf_counter()
        record = prune_to_dir(teacher, scores, PruneConfig(**shape, repair=repair), out, calibration=calib)
        (out / "bench.json").write_text(json.dumps({"prune_s": round(time.perf_counter() - t0, 1)}))
    record = json.loads((out / "pruning.json").read_text())
    rep = record.get("repair") or {}
    return {"params": record["params_after"], "param_ratio": round(record["param_ratio"], 3),
            "prune_s": json.loads((out / "bench.json").read_text())["prune_s"],
            "repair_error_before": rep.get("mean_error_before"), "repair_error_after": rep.get("mean_error_after"),
            "refitted_projections": len(rep.get("projections", [])),
            "hidden_basis": record.get("hidden_basis")}


def _row(student: str, method: str, tokens: int, ev: dict, teacher_ev: dict, extra: dict) -> dict:
    k = kept(ev, teacher_ev)
    return {"student": student, "method": method, "tokens": tokens, "word_ppl": round(ev["word_perplexity"], 1),
            "avg_acc": round(ev["avg"], 4), "above_chance_kept": k["pct_above_chance_kept"],
            "pct_kept": k["pct_kept"], "scores": ev["scores"], **extra}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [s for s in SHAPES if any(r["student"] == s for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "word_ppl", "held-out word perplexity (log)"),
                           (axes[1], "above_chance_kept", "% of the teacher's above-chance margin kept")):
        width, xs = 0.13, range(len(students))
        bars = [(m, t) for t in (0, 1) for m in METHODS]
        for i, (method, trained) in enumerate(bars):
            vals = []
            for s in students:
                r = next((r for r in rows if r["student"] == s and r["method"] == method
                          and (r["tokens"] > 0) == bool(trained)), None)
                vals.append(float("nan") if r is None or r[key] is None else r[key])
            ax.bar([x + (i - (len(bars) - 1) / 2) * width for x in xs], vals, width,
                   label=f"{method}{' + KD' if trained else ', 0 tokens'}")
        ax.set_xticks(list(xs), students)
        ax.set_title(label)
        if key == "word_ppl":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct pruned: plain slicing vs least-squares repair vs + PCA hidden cut")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(REPO / "runs" / "repair"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a default")
    args = ap.parse_args()
    p = with_overrides(DEFAULTS, args.set, "a setting")
    p["device"] = "cpu"

    from compactlm.config import DistillConfig
    from compactlm.distillation import distill
    from compactlm.models import resolve_model

    t_start, load_start = time.perf_counter(), os.getloadavg()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    teacher = resolve_model(args.teacher)
    if p["untie"]:  # the pca arm needs an output head of its own: the same function, untied, for every arm
        teacher = untied_copy(teacher, root / "teacher-untied")
    calib, scores, classic, t_ev, rows = gutenberg_inputs(teacher, root, p)
    steps = max(1, p["kd_tokens"] // (p["batch_size"] * p["seq_len"]))
    for sname, shape in ((k, SHAPES[k]) for k in p["shapes"]):
        dirs = {}
        pca = ("pca",) if "hidden_size" in shape and p["untie"] else ()
        for method in ("plain", "least_squares") + pca:
            dirs[method] = root / "students" / f"{sname}-{method}"
            info = _prune(teacher, scores, calib, shape, method, dirs[method], p)
            same = method != "plain" and _weights_digest(dirs[method]) == _weights_digest(dirs["plain"])
            ev_dir = dirs["plain"] if same else dirs[method]
            ev = _json_cached(root / "eval" / f"{ev_dir.name}.json", lambda d=ev_dir: evaluate(d, p, 0))
            rows.append(_row(sname, method, 0, ev, t_ev, {**info, "identical_to_plain": same}))
            print(f"[repair] {sname} {method}: ppl {ev['word_perplexity']:.1f} avg {ev['avg']:.3f}", flush=True)
            if sname not in p["kd_students"]:
                continue
            cfg = DistillConfig(steps=steps, batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"],
                                warmup_steps=p["warmup_steps"], log_every=max(1, steps // 8))
            trained = root / "trained" / f"{sname}-{method}"
            if not (trained / "manifest.json").is_file():
                distill(teacher, dirs[method], classic, cfg, trained, seed=0, device="cpu")
            ev = _json_cached(root / "eval" / f"{trained.name}-kd.json", lambda d=trained: evaluate(d, p, 0))
            rows.append(_row(sname, method, steps * p["batch_size"] * p["seq_len"], ev, t_ev, info))
            print(f"[repair] {sname} {method} + KD: ppl {ev['word_perplexity']:.1f} avg {ev['avg']:.3f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "repair_untied" if p["untie"] else "repair"
    plot(rows, RESULTS / f"{name}.png")
    result = {"teacher": args.teacher, "settings": p, "shapes": SHAPES, "tasks": list(TASKS), "rows": rows,
              "wall_s": round(time.perf_counter() - t_start, 1), "load_avg": {"start": load_start,
                                                                               "end": os.getloadavg()},
              "cpu_count": os.cpu_count(), "command": "benchmarks/repair.py " + " ".join(sys.argv[1:])}
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
