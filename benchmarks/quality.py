"""The headline experiment: how much of the teacher each compression method keeps, at equal training tokens.

    .venv/bin/python benchmarks/quality.py --profile cpu      # <= 60 min on a 2-core CPU
    .venv/bin/python benchmarks/quality.py --profile gpu      # one GPU (16 min on an H100), 128x the tokens

Teacher: SmolLM2-135M-Instruct. Students: the teacher pruned to ~60% and ~50% of its parameters, by width and
by depth; each shape is the best of its kind among the candidates compactlm's budget search ranks by
calibration loss (:func:`compactlm.pruning.rank_candidates`, Minitron-style activation importance). A control
prunes to the same shapes with *random* importance scores.

Arms, each at the same training-token budget (steps x batch x seq_len input tokens; loss on completion tokens):

    pruned        no training
    ce_classic    cross-entropy fine-tuning on classic text (Gutenberg novels from ../shared/data)
    seq_kd        sequence-level KD: cross-entropy on teacher-written answers (synthetic data from vLLM)
    kd_online     logit KD (forward KL) with the teacher in memory, on the synthetic data
    kd_offline    logit KD from the top-k log-probs stored at generation time (teacher never loaded)
    kd_hidden     logit KD + hidden-state KD (cosine) over the pruning layer map, on the synthetic data

Every step is the real code path of the pipeline (generation subprocess with vLLM, score_model, prune_to_dir,
distill, evaluate_model with lm-eval). Evaluation: ARC-Easy, PIQA, HellaSwag, WinoGrande (0-shot, first
``limit`` examples each, compactlm's local copies of the data) and held-out word perplexity. "% kept" is the
student's 4-task average over the teacher's; "% above chance kept" is (student - chance) / (teacher - chance),
which is what the tasks can still tell apart.

MLflow: one parent run (``quality-<profile>``) with one child run per (shape, arm, tokens), in the SQLite store
under the output directory (or $MLFLOW_TRACKING_URI), so the MLflow compare view is the report. Everything is
cached under ``--out`` (default runs/quality-<profile>): a killed run resumes where it stopped.

Prints one JSON object as its last line and writes it to benchmarks/results/quality_<profile>.json, with the
plot (% kept vs training tokens, per arm) next to it as quality_<profile>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = REPO.parent / "shared" / "data"
TASKS = ("compactlm_arc_easy", "compactlm_piqa", "compactlm_hellaswag", "compactlm_winogrande")
CHANCE = {"compactlm_arc_easy": 0.25, "compactlm_piqa": 0.5, "compactlm_hellaswag": 0.25,
          "compactlm_winogrande": 0.5}

# Training arms: DistillConfig overrides plus the dataset they train on.
ARMS: dict[str, dict[str, Any] | None] = {
    "pruned": None,
    "ce_classic": {"data": "classic", "kd_weight": 0.0},
    "seq_kd": {"data": "synthetic", "kd_weight": 0.0},
    "kd_online": {"data": "synthetic", "kd_weight": 1.0},
    "kd_offline": {"data": "synthetic", "kd_weight": 1.0, "mode": "offline"},
    "kd_hidden": {"data": "synthetic", "kd_weight": 1.0, "hidden_weight": 1.0},
}

PROFILES: dict[str, dict[str, Any]] = {
    # 8k training tokens per arm (16 steps of 4 x 128), and 32k for every arm on the ~60% width student (the
    # curve); pruned + kd_online on the other shapes and the random-importance width control; an lr sweep of
    # kd_online; eval limit 60.
    "cpu": {
        "budgets": [0.6, 0.5], "kinds": ["width", "depth"], "tokens": 8192, "batch_size": 4, "seq_len": 128,
        "lr": 3e-4, "warmup_steps": 2, "limit": 60, "eval_batch_size": 16, "prompts": 160, "max_tokens": 128,
        "topk": 20, "engine": "vllm", "gen_batch_size": 64, "score_samples": 32, "all_arms": ["width-60"],
        "few_arms": ["pruned", "kd_online"], "points": [1.0], "extra_points": {"width-60": [4.0]},
        "random_control": {"width-60": ["pruned", "kd_online"], "depth-60": ["pruned"]},
        "sweep": {"student": "width-60", "arm": "kd_online", "lr": [1e-4, 1e-3]},
    },
    # One GPU lease (16 min on an H100): 128x the CPU profile's tokens (1M per arm, 16 x 512 per step),
    # every arm on both ~60% students and a 131k-token point on the width one, pruned + kd_online on the ~50%
    # students, the random-importance control, an lr sweep; eval limit 500 per task; 805 AlpacaEval prompts
    # x 512 tokens with top-50 log-probs. `engine` is vllm; a machine without vLLM runs --set engine='"hf"'.
    "gpu": {
        "budgets": [0.6, 0.5], "kinds": ["width", "depth"], "tokens": 1_048_576, "batch_size": 16,
        "seq_len": 512, "lr": 3e-4, "warmup_steps": 10, "limit": 500, "eval_batch_size": 64, "prompts": 805,
        "max_tokens": 512, "topk": 50, "engine": "vllm", "gen_batch_size": 128, "score_samples": 128,
        "all_arms": ["width-60", "depth-60"], "few_arms": ["pruned", "kd_online"], "points": [1.0],
        "extra_points": {"width-60": [0.125]},
        "random_control": {"width-60": ["pruned", "kd_online"], "depth-60": ["pruned"]},
        "sweep": {"student": "width-60", "arm": "kd_online", "lr": [1e-4, 1e-3]},
    },
}


def plan(p: dict[str, Any], shapes: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """(student, arm, DistillConfig overrides) for every run of the profile, in order."""
    runs = []
    for s in shapes:
        for arm in (ARMS if s in p["all_arms"] else p["few_arms"]):
            runs.append((s, arm, {}))
    for s, arms in p["random_control"].items():
        runs += [(f"random-{s}", arm, {}) for arm in arms]
    sweep = dict(p.get("sweep") or {})
    student, arm = sweep.pop("student", None), sweep.pop("arm", None)
    for field, values in sweep.items():
        runs += [(student, arm, {field: v}) for v in values]
    return runs


def _usage() -> dict[str, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": time.perf_counter(), "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime}


class Timer:
    """Wall and CPU seconds (this process and its children) per phase."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        timer = self

        class _Phase:
            def __enter__(self):
                self.start = _usage()

            def __exit__(self, *exc):
                end = _usage()
                p = timer.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
                p["wall_s"] = round(p["wall_s"] + end["wall"] - self.start["wall"], 1)
                p["cpu_s"] = round(p["cpu_s"] + end["cpu"] - self.start["cpu"], 1)

        return _Phase()


def write_result(name: str, result: dict, indent: int = 1) -> Path:
    """A benchmark's result: benchmarks/results/<name>.json, and the same object as the last line printed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(result, indent=indent) + "\n")
    print(json.dumps(result))
    return out


def _json_cached(path: Path, fn):
    """fn()'s JSON result, computed once: a finished result file is reused, written atomically."""
    from compactlm.artifacts import write_json_atomic

    if path.is_file():
        return json.loads(path.read_text())
    value = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, value)
    return value


# ------------------------------------------------------------------------------------------------- stages

def synthetic_data(teacher: Path, out: Path, p: dict[str, Any], seed: int, logit_targets: str = "topk") -> Path:
    """Teacher answers to AlpacaEval instructions, with `topk` stored targets per token of the kind
    `logit_targets` (top-k log-probs or sampled ids; the generation stage, in a child)."""
    from compactlm.artifacts import is_complete

    if not is_complete(out):
        cfg = {"prompts": str(SHARED / "alpaca_eval" / "alpaca_eval_instructions.jsonl"),
               "prompt_field": "instruction", "max_prompts": p["prompts"], "n": 1, "max_tokens": p["max_tokens"],
               "temperature": 0.8, "top_p": 0.95, "topk_logprobs": p["topk"], "logit_targets": logit_targets,
               "engine": p["engine"], "shard_size": 64, "max_model_len": max(1024, 4 * p["max_tokens"]),
               "batch_size": p["gen_batch_size"]}
        subprocess.run([sys.executable, "-m", "compactlm.generation", "--model", str(teacher), "--out", str(out),
                        "--config", json.dumps(cfg), "--seed", str(seed), "--no-progress"], check=True, cwd=REPO)
    return out


def random_scores(real: Path, out: Path, seed: int) -> Path:
    """Importance scores of the same shapes as `real`, drawn uniformly at random (the control)."""
    import torch

    from compactlm.artifacts import is_complete, publish_dir
    from compactlm.importance.scores import SUMMARY_FILE, ImportanceScores, load_scores

    if is_complete(out):
        return out
    s = load_scores(real)
    g = torch.Generator().manual_seed(seed)
    rnd = ImportanceScores(heads=torch.rand(s.heads.shape, generator=g),
                           neurons=torch.rand(s.neurons.shape, generator=g),
                           channels=torch.rand(s.channels.shape, generator=g),
                           layer_block_influence=torch.rand(s.layer_block_influence.shape, generator=g),
                           base_loss=s.base_loss, num_key_value_heads=s.num_key_value_heads, settings=s.settings)
    summary = json.loads((real / SUMMARY_FILE).read_text())
    with publish_dir(out, {"stage": "score", "random_control": True, "seed": seed}) as tmp:
        rnd.save_tensors(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps({**summary, "random_control": True}))
    return out


def pick_shapes(teacher: Path, scores: Path, calib: Path, p: dict[str, Any], seed: int) -> dict[str, dict]:
    """{"width-60": candidate, "depth-60": ..., ...}: the best-ranked candidate of each kind per budget."""
    from compactlm.config import PruneConfig
    from compactlm.pruning import rank_candidates

    shapes = {}
    for b in p["budgets"]:
        budget = dict(params=b, search=8, candidates=8, proxy="loss")
        ranked = rank_candidates(teacher, scores, PruneConfig(budget=budget), calib, seed=seed)
        for kind in p["kinds"]:
            best = next((c for c in ranked if c["kind"] == kind), None)
            if best is None:
                raise RuntimeError(f"no {kind} candidate fits params={b}: {[c['kind'] for c in ranked]}")
            shapes[f"{kind}-{round(b * 100)}"] = {**best, "budget": b}
    return shapes


def evaluate(model_dir: Path, p: dict[str, Any], seed: int) -> dict[str, Any]:
    from compactlm.config import EvalConfig
    from compactlm.evaluation import evaluate_model, main_metric

    cfg = EvalConfig(tasks=list(TASKS), limit=p["limit"], batch_size=p["eval_batch_size"], perplexity=True,
                     speed=False, data_dir=str(SHARED))
    res = evaluate_model(model_dir, cfg, device=p["device"], seed=seed)
    scores = {t: res["tasks"][t][main_metric(res["tasks"][t])] for t in TASKS}
    return {"scores": scores, "avg": sum(scores.values()) / len(scores),
            "word_perplexity": res["perplexity"]["word_perplexity"], "params": res["params"],
            "eval_seconds": round(res["seconds"], 1)}


def kept(ev: dict[str, Any], teacher: dict[str, Any]) -> dict[str, float]:
    above = [(ev["scores"][t] - CHANCE[t]) / (teacher["scores"][t] - CHANCE[t]) for t in TASKS
             if teacher["scores"][t] - CHANCE[t] > 0.02]  # tasks where the teacher is above chance
    return {"pct_kept": round(100 * ev["avg"] / teacher["avg"], 1),
            "pct_above_chance_kept": round(100 * sum(above) / len(above), 1) if above else None}


# ------------------------------------------------------------------------------------------------- report

def table(rows: list[dict[str, Any]]) -> str:
    short = {t: t.removeprefix("compactlm_") for t in TASKS}
    head = ["student", "arm", "tokens", "params (M)"] + [short[t] for t in TASKS] + \
        ["avg", "% kept", "% above chance kept", "word ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(
            [r["student"], r["arm"], f"{r['tokens']:,}", f"{r['params'] / 1e6:.1f}"]
            + [f"{r['scores'][t]:.3f}" for t in TASKS]
            + [f"{r['avg']:.3f}", f"{r['pct_kept']:.1f}",
               "n/a" if r["pct_above_chance_kept"] is None else f"{r['pct_above_chance_kept']:.1f}",
               f"{r['word_perplexity']:.1f}"]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per student trained with several arms: % of the teacher's 4-task average kept and held-out word perplexity
    vs training tokens, one line per arm (its 0-token point is the pruned student). Last panel: every student's
    perplexity pruned vs after kd_online (log scale), random-importance controls included."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip([a for a in ARMS if a != "pruned"], ["tab:blue", "tab:orange", "tab:green", "tab:red",
                                                           "tab:purple"]))
    students = [s for s in dict.fromkeys(r["student"] for r in rows if r["student"] != "teacher")]
    curved = [s for s in students if len({r["arm"] for r in rows if r["student"] == s and r["arm"] in colors}) > 1]
    n = 2 * len(curved) + 1
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.2 * cols, 3.9 * ((n + cols - 1) // cols)),
                             squeeze=False)
    flat = list(axes.flat)
    for i, student in enumerate(curved):
        base = next((r for r in rows if r["student"] == student and r["arm"] == "pruned"), None)
        for ax, field, label in ((flat[2 * i], "pct_kept", "% of teacher's 4-task average kept"),
                                 (flat[2 * i + 1], "word_perplexity", "held-out word perplexity (log)")):
            for arm, color in colors.items():
                pts = sorted((r["tokens"], r[field]) for r in rows if r["student"] == student and r["arm"] == arm)
                if pts:
                    pts = ([(0, base[field])] if base is not None else []) + pts
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=color, label=arm)
            teacher = next(r[field] for r in rows if r["student"] == "teacher")
            ax.axhline(teacher, color="black", lw=0.8, ls="--", label="teacher")
            if field == "word_perplexity":
                ax.set_yscale("log")
            ax.set_title(f"{student}: {label}", fontsize=9)
            ax.set_xlabel("training tokens")
            ax.grid(alpha=0.3)
        flat[2 * i].legend(fontsize=7, loc="lower right")
    ax = flat[2 * len(curved)]
    names = [s for s in students if any(r["student"] == s and r["arm"] == "kd_online" for r in rows)]
    for j, (arm, color) in enumerate((("pruned", "tab:gray"), ("kd_online", "tab:green"))):
        vals = [max(((r["tokens"], r["word_perplexity"]) for r in rows if r["student"] == s and r["arm"] == arm),
                    default=(0, float("nan")))[1] for s in names]  # the row with the most training tokens
        ax.bar([k + 0.4 * j for k in range(len(names))], vals, width=0.4, color=color,
               label=arm + (" (most tokens)" if arm != "pruned" else ""))
    ax.set_yscale("log")
    ax.set_xticks([k + 0.2 for k in range(len(names))], names, rotation=30, ha="right", fontsize=7)
    ax.set_title("held-out word perplexity per student (log)", fontsize=9)
    ax.legend(fontsize=7)
    for extra in flat[n:]:
        extra.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main

def with_overrides(defaults: dict[str, Any], sets: list[str], what: str) -> dict[str, Any]:
    """A copy of `defaults` with each ``--set KEY=JSON`` of `sets` applied; an unknown key exits naming the known
    ones (`what` says what a key is, e.g. "a profile field")."""
    p = dict(defaults)
    for kv in sets:
        k, _, v = kv.partition("=")
        if k not in p:
            raise SystemExit(f"--set {k}: not {what} ({', '.join(sorted(p))})")
        p[k] = json.loads(v)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=None, help="cache directory (default runs/quality-<profile>)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="results file name (default quality_<profile>)")
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the results JSON")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a profile field, e.g. --set limit=50 --set 'points=[0.5,1.0]'")
    args = ap.parse_args()

    from compactlm.config import DistillConfig, PruneConfig, ScoreConfig
    from compactlm.datasets import corpus_dataset
    from compactlm.distillation import distill
    from compactlm.importance import score_model
    from compactlm.models import pick_device, resolve_model
    from compactlm.pruning import prune_to_dir
    from compactlm.tracking import Tracker, default_tracking_uri

    name = args.name or f"quality_{args.profile}"
    if args.replot:
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        plot(saved["rows"], RESULTS / f"{name}.png", saved["plot_title"])
        return
    p = with_overrides(PROFILES[args.profile], args.set, "a profile field")
    p["device"] = pick_device(args.device)
    root = Path(args.out or REPO / "runs" / f"quality-{args.profile}").resolve()
    root.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    t0 = _usage()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    tracker = Tracker(default_tracking_uri(root), "compactlm-quality")
    parent = tracker.start_run(f"quality-{args.profile}", tags={"benchmark": "quality", "profile": args.profile})
    tracker.log_params(parent, {"teacher": args.teacher, **{k: json.dumps(v) for k, v in p.items()}})
    teacher = resolve_model(args.teacher)

    with timer("generate"):
        synth = synthetic_data(teacher, root / "synthetic", p, args.seed)
    with timer("corpus"):
        classic = root / "classic"
        if not (classic / "manifest.json").is_file():
            corpus_dataset(SHARED / "gutenberg" / "gutenberg_14books_clean.txt", teacher, classic,
                           max_tokens=p["tokens"] + p["seq_len"], seed=args.seed)
    with timer("score"):
        scores = root / "scores"
        if not (scores / "manifest.json").is_file():
            score_model(teacher, synth, ScoreConfig(num_samples=p["score_samples"], seq_len=256, batch_size=8,
                                                    layer_loss=False), scores, device=p["device"], seed=args.seed)
    with timer("prune"):
        shapes = _json_cached(root / "shapes.json", lambda: pick_shapes(teacher, scores, synth, p, args.seed))
        rnd_scores = random_scores(scores, root / "scores-random", args.seed)
        students: dict[str, Path] = {}
        for sname, cand in shapes.items():
            for control, sdir in (("", scores), ("random-", rnd_scores)):
                if control and sname not in p["random_control"]:
                    continue
                out = root / "students" / f"{control}{sname}"
                if not (out / "manifest.json").is_file():
                    prune_to_dir(teacher, sdir, PruneConfig(), out, shape=cand["shape"], device=p["device"])
                students[f"{control}{sname}"] = out

    with timer("evaluate"):
        t_eval = _json_cached(root / "eval" / "teacher.json", lambda: evaluate(teacher, p, args.seed))
    rows: list[dict[str, Any]] = [{"student": "teacher", "arm": "-", "tokens": 0, **t_eval, **kept(t_eval, t_eval)}]
    steps_full = max(1, p["tokens"] // (p["batch_size"] * p["seq_len"]))
    for sname, arm, overrides in plan(p, list(shapes)):
        sdir, spec = students[sname], ARMS[arm]
        label = arm + "".join(f"[{k}={v}]" for k, v in overrides.items())
        points = p["points"] + (p.get("extra_points", {}).get(sname, []) if not overrides else [])
        for point in ([0.0] if spec is None else points):
            steps = 0 if spec is None else max(1, round(steps_full * point))
            key = f"{sname}__{label}__{steps}"
            model_dir, train, cfg = sdir, {}, None
            if spec is not None:
                fields = {"steps": steps, "batch_size": p["batch_size"], "seq_len": p["seq_len"], "lr": p["lr"],
                          "warmup_steps": min(p["warmup_steps"], steps), "log_every": max(1, steps // 8),
                          **{k: v for k, v in spec.items() if k != "data"}, **overrides}
                cfg = DistillConfig(**fields)
                data = synth if spec["data"] == "synthetic" else classic
                model_dir = root / "trained" / key
                with timer(f"train:{arm}"):
                    if not (model_dir / "manifest.json").is_file():
                        distill(teacher, sdir, data, cfg, model_dir, seed=args.seed, device=p["device"])
                train = json.loads((model_dir / "manifest.json").read_text()).get("metrics", {})
            with timer("evaluate"):
                ev = _json_cached(root / "eval" / f"{key}.json", lambda d=model_dir: evaluate(d, p, args.seed))
            row = {"student": sname, "arm": label, "tokens": steps * p["batch_size"] * p["seq_len"], **ev,
                   **kept(ev, t_eval), "train_loss": train.get("loss"), "train_seconds": train.get("seconds")}
            rows.append(row)
            run = tracker.start_run(key, parent_id=parent, tags={"student": sname, "arm": label})
            tracker.log_params(run, {"student": sname, "arm": label, "tokens": row["tokens"], "steps": steps,
                                     "shape": json.dumps(shapes[sname.removeprefix("random-")]["shape"]),
                                     "random_importance": sname.startswith("random-"),
                                     **({"distill": cfg.model_dump_json()} if cfg is not None else {})})
            tracker.log_metrics(run, {"avg": row["avg"], "pct_kept": row["pct_kept"],
                                      "word_perplexity": row["word_perplexity"], "params": row["params"],
                                      **{t.removeprefix("compactlm_"): v for t, v in row["scores"].items()},
                                      **({"pct_above_chance_kept": row["pct_above_chance_kept"]}
                                         if row["pct_above_chance_kept"] is not None else {}),
                                      **({"train_loss": row["train_loss"]} if row["train_loss"] is not None
                                         else {})})
            tracker.end_run(run)
            print(f"[quality] {key}: avg {row['avg']:.3f} ({row['pct_kept']}% kept), "
                  f"ppl {row['word_perplexity']:.1f}", flush=True)

    end = _usage()
    md = table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{name}.png"
    plot_title = (f"SmolLM2-135M-Instruct -> pruned students, profile {args.profile}: arms at equal training "
                  f"tokens, eval limit {p['limit']} per task")
    plot(rows, png, plot_title)
    # A resumed benchmark is several invocations over one cache: keep each one's timing and report the sum.
    this_run = {"phases": timer.phases, "wall_s": round(end["wall"] - t0["wall"], 1),
                "cpu_s": round(end["cpu"] - t0["cpu"], 1), "load_before": load_before,
                "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(root / "invocations.jsonl", "a") as f:
        f.write(json.dumps(this_run) + "\n")
    invocations = [json.loads(x) for x in (root / "invocations.jsonl").read_text().splitlines() if x.strip()]
    result = {
        "profile": args.profile, "teacher": args.teacher, "settings": {k: v for k, v in p.items()},
        "shapes": {k: {"kind": v["kind"], "shape": v["shape"], "param_ratio": round(v["param_ratio"], 3)}
                   for k, v in shapes.items()},
        "rows": rows, "table_md": md, "plot_title": plot_title,
        "total_wall_s": round(sum(i["wall_s"] for i in invocations), 1),
        "total_cpu_s": round(sum(i["cpu_s"] for i in invocations), 1), "invocations": invocations,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "mlflow": {"tracking_uri": tracker.tracking_uri, "parent_run": parent},
    }
    tracker.log_text(parent, md, "quality_table.md")
    tracker.log_artifact(parent, png)
    tracker.log_dict(parent, result, "quality.json")
    tracker.end_run(parent)
    print(md)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
