"""Budget candidates ranked by the proxy vs by a short distillation (issue #17): which shape each ranking picks,
and how the candidates really end after the same full KD.

    .venv/bin/python benchmarks/ranking.py         # 2-core CPU, ~35 min -> results/ranking.{json,png}

Teacher SmolLM2-135M-Instruct, a budget of 60 % of its parameters (the headline experiment's, benchmarks/quality.py),
the budget search's pool of 8 candidate shapes, every candidate cut with the least-squares repair. The proxy
(``budget.proxy: loss``, calibration loss right after pruning) ranks the pool; ``budget.short_distill`` then
distills the proxy's best ``distill_top`` for ``short_tokens`` each (logit KD, teacher online) and ranks them by
the same proxy measured after that (``compactlm.candidates.rank_with_short_distill``, what the prune stage's
tasks compute), and ``prune_to_dir`` prunes its first. The ground truth:
each of those top candidates distilled for the full ``kd_tokens`` (from the same pruned start, the same data)
and evaluated on ARC-Easy, PIQA, HellaSwag, WinoGrande (0-shot, first `limit` examples) and held-out word
perplexity. Training and calibration text: Gutenberg prose (../shared/data). Every artifact is cached under --out.

Prints one JSON object as its last line and writes it to benchmarks/results/ranking.json (rows: student, method,
tokens, word_ppl, avg_acc, above_chance_kept, proxy_rank, short_rank, ...), with a plot next to it.
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
from repair import _row, gutenberg_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DEFAULTS: dict[str, Any] = {"limit": 300, "eval_batch_size": 16, "calib_samples": 32, "calib_seq_len": 256,
                            "params": 0.6, "search": 8, "proxy": "loss", "distill_top": 3, "short_tokens": 8192,
                            "kd_tokens": 32768, "batch_size": 4, "seq_len": 128, "lr": 3e-4, "warmup_steps": 2,
                            "damping": 0.01}


def _distill_cfg(p: dict, tokens: int):
    from compactlm.config import DistillConfig

    steps = max(1, tokens // (p["batch_size"] * p["seq_len"]))
    return DistillConfig(steps=steps, batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"],
                         warmup_steps=min(p["warmup_steps"], steps), log_every=max(1, steps // 8))


def ranked(teacher: Path, scores: Path, classic: Path, p: dict, root: Path) -> dict:
    """The budget's prune record with the short-distill ranking (the proxy's rank of each in "proxy_rank")."""
    from compactlm.candidates import rank_with_short_distill
    from compactlm.config import PruneConfig, RepairConfig
    from compactlm.pruning import prune_to_dir

    out = root / "budget"
    if not (out / "manifest.json").is_file():
        repair = RepairConfig(num_samples=p["calib_samples"], seq_len=p["calib_seq_len"], damping=p["damping"])
        cfg = PruneConfig(repair=repair, budget={
            "params": p["params"], "search": p["search"], "candidates": p["search"], "proxy": p["proxy"],
            "distill_top": p["distill_top"], "short_distill": _distill_cfg(p, p["short_tokens"]).model_dump()})
        t0 = time.perf_counter()
        ranking = rank_with_short_distill(teacher, scores, cfg, classic, cache_dir=root / "short")
        prune_to_dir(teacher, scores, cfg, out, ranking=ranking, calibration=classic)
        (out / "bench.json").write_text(json.dumps({"rank_s": round(time.perf_counter() - t0, 1)}))
    return {**json.loads((out / "pruning.json").read_text()), **json.loads((out / "bench.json").read_text())}


def trained(teacher: Path, scores: Path, classic: Path, candidate: dict, p: dict, root: Path) -> Path:
    """`candidate` pruned (least-squares repair, the stage's seed) and distilled for ``kd_tokens``."""
    from compactlm.config import PruneConfig, RepairConfig
    from compactlm.distillation import distill
    from compactlm.pruning import prune_to_dir

    name = "-".join(f"{candidate['shape'][k]}" for k in sorted(candidate["shape"]))
    pruned, student = root / "pruned" / name, root / "trained" / name
    if not (pruned / "manifest.json").is_file():
        repair = RepairConfig(num_samples=p["calib_samples"], seq_len=p["calib_seq_len"], damping=p["damping"])
        prune_to_dir(teacher, scores, PruneConfig(repair=repair), pruned, calibration=classic,
                     shape=candidate["shape"])
    if not (student / "manifest.json").is_file():
        distill(teacher, pruned, classic, _distill_cfg(p, p["kd_tokens"]), student, seed=0, device="cpu")
    return student


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r for r in rows if r["student"] != "teacher"]
    labels = [f"{r['kind']} {r['param_ratio']:.2f}\nproxy #{r['proxy_rank']}, short #{r['short_rank']}" for r in arms]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "word_ppl", "held-out word perplexity after full KD"),
                           (axes[1], "above_chance_kept", "% of the teacher's above-chance margin kept")):
        ax.bar(labels, [r[key] for r in arms], color="tab:blue")
        ax.set_title(label)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, 60 % budget: the proxy's best candidates after full KD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(REPO / "runs" / "ranking"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a default")
    args = ap.parse_args()
    p = with_overrides(DEFAULTS, args.set, "a setting")
    p["device"] = "cpu"

    from compactlm.models import resolve_model

    t_start, load_start = time.perf_counter(), os.getloadavg()
    root = Path(args.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    teacher = resolve_model(args.teacher)
    _, scores, classic, t_ev, rows = gutenberg_inputs(teacher, root, p)
    record = ranked(teacher, scores, classic, p, root)
    ranking = record["ranking"]
    for c in sorted((c for c in ranking if "distilled_value" in c), key=lambda c: c["proxy_rank"]):
        student = trained(teacher, scores, classic, c, p, root)
        ev = _json_cached(root / "eval" / f"{student.name}.json", lambda d=student: evaluate(d, p, 0))
        rows.append(_row(c["kind"], "full_kd", p["kd_tokens"], ev, t_ev, {
            "shape": c["shape"], "kind": c["kind"], "param_ratio": round(c["param_ratio"], 4), "params": ev["params"],
            "proxy_rank": c["proxy_rank"], "short_rank": c["rank"], "proxy_value": c["proxy_value"],
            "distilled_value": c["distilled_value"], "short_distill": c["short_distill"]}))
        print(f"[ranking] {c['kind']} {c['shape']}: proxy #{c['proxy_rank']} short #{c['rank']} -> ppl "
              f"{ev['word_perplexity']:.1f} avg {ev['avg']:.3f}", flush=True)
    arms = rows[1:]
    truth = min(arms, key=lambda r: r["word_ppl"])
    picks = {"proxy": next(r for r in arms if r["proxy_rank"] == 1), "short_distill": next(
        r for r in arms if r["short_rank"] == 1), "best_after_full_kd_by_word_ppl": truth}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(rows, RESULTS / "ranking.png")
    result = {"teacher": args.teacher, "settings": p, "tasks": list(TASKS), "rows": rows,
              "picks": {k: {"shape": v["shape"], "word_ppl": v["word_ppl"], "avg_acc": v["avg_acc"]}
                        for k, v in picks.items()},
              "pool": [{k: c.get(k) for k in ("kind", "shape", "param_ratio", "proxy_value", "distilled_value",
                                             "proxy_rank", "rank")} for c in ranking],
              "rank_s": record["rank_s"], "wall_s": round(time.perf_counter() - t_start, 1),
              "load_avg": {"start": load_start, "end": os.getloadavg()}, "cpu_count": os.cpu_count(),
              "command": "benchmarks/ranking.py " + " ".join(sys.argv[1:])}
    (RESULTS / "ranking.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
