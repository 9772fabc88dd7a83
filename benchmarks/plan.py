"""The memory plan (``compactlm plan``) against measured peaks, stage by stage (issue #16).

    .venv/bin/python benchmarks/plan.py [--models tiny,smollm2-135m-instruct]

For each model every stage runs as the pipeline runs it (the library call its task makes) in a child process of
its own: generate (engine hf), score (in memory and streaming), prune (in memory and streaming, 75 % of the width;
and a 75 % parameter budget on a bf16 copy of the teacher, 2 candidate tasks at once as the stage runs them, with
the loss proxy and with the KL proxy, whose tasks run the teacher),
distill (one process, online KD; and with gradient checkpointing), evaluate (hf, the shipped compactlm_facts task
and perplexity: the plan's row is a bound, ``bound``), generate with vLLM on CPU (the caller's and the engine
process's peaks added). ``measured_mib`` is the child's peak RSS (``ru_maxrss``, the whole process);
``predicted_mib`` is the plan's figure for the same stage config (:attr:`StageNeed.per_process`: the stage's parts plus
``RUNTIME_CPU``, the process's libraries). ``rel_err`` = predicted / measured - 1. ``model_predicted_mib`` and
``model_measured_mib`` are both without the runtime constant (what the models and batches take);
``import_rss_mib`` is the child's RSS after its imports, before any model or tokenizer. Each stage runs
``--repeats`` times (3): ``measured_mib`` is the largest peak (what a run must have room for),
``measured_mib_runs`` all of them.
Prints one JSON object as its last line and writes it to benchmarks/results/plan.json.
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

from compactlm.footprint import RUNTIME_CPU

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED, write_result  # noqa: E402

GUTENBERG = SHARED / "gutenberg" / "gutenberg_14books_clean.txt"

GEN = {"engine": "hf", "max_prompts": 16, "max_tokens": 64, "batch_size": 8, "max_model_len": 256, "dtype": "float32"}
SCORE = {"num_samples": 16, "seq_len": 256, "batch_size": 8, "layer_loss": False}
DISTILL = {"steps": 2, "batch_size": 4, "seq_len": 256, "warmup_steps": 0, "kd_weight": 1.0}
EVAL = {"tasks": ["compactlm_facts"], "batch_size": 16, "speed": False}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(stage: str, args: dict) -> None:
    """Run one stage in this process; print its peak RSS above the imports."""
    import resource

    import torch  # noqa: F401
    import transformers  # noqa: F401

    from compactlm.config import DistillConfig, EvalConfig, GenerateConfig, PruneConfig, ScoreConfig
    from compactlm.distillation.trainer import distill
    from compactlm.generation import generate_dataset
    from compactlm.importance.score import score_model
    from compactlm.pruning.prune import prune_to_dir
    if stage == "evaluate":
        import lm_eval  # noqa: F401

        from compactlm.evaluation.runner import evaluate_model
    base = _rss_mib()
    t0 = time.perf_counter()
    a = args
    if stage == "generate":
        generate_dataset(a["teacher"], GenerateConfig(**a["cfg"]), a["out"], progress=False)
    elif stage == "score":
        score_model(a["teacher"], a["calibration"], ScoreConfig(**a["cfg"]), a["out"])
    elif stage == "prune":
        prune_to_dir(a["teacher"], a["scores"], PruneConfig(**a["cfg"]), a["out"])
    elif stage == "distill":
        distill(a["teacher"], a["student"], a["data"], DistillConfig(**a["cfg"]), a["out"])
    elif stage == "evaluate":
        evaluate_model(a["teacher"], EvalConfig(**a["cfg"]))
    elif stage == "prune-budget":
        _budget_fan_out(a, PruneConfig(**a["cfg"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest rank / engine process
    print("RESULT " + json.dumps({"import_rss_mib": round(base, 1), "self_peak_mib": round(peak, 1),
                                  "child_peak_mib": round(children, 1),
                                  "measured_mib": round(children if a.get("measure") == "child" else
                                                        peak + children if a.get("measure") == "sum" else peak, 1),
                                  "wall_s": round(time.perf_counter() - t0, 1)}), flush=True)


def _budget_fan_out(a: dict, cfg) -> None:
    """The prune stage with a budget, as its task does: the candidates measured by parallel tasks (threads, as
    many as the plan counts), then the best one cut."""
    from concurrent.futures import ThreadPoolExecutor

    from compactlm.pruning import prune_to_dir
    from compactlm.pruning.budget import measure_candidate, plan_candidates, rank_measured

    pool = plan_candidates(a["teacher"], a["scores"], cfg)
    with ThreadPoolExecutor(max_workers=a["workers"]) as ex:
        measured = list(ex.map(lambda c: measure_candidate(a["teacher"], a["scores"], cfg, a["calibration"], c), pool))
    prune_to_dir(a["teacher"], a["scores"], cfg, a["out"], ranking=rank_measured(measured))


def _run(stage: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", stage, json.dumps(args)], capture_output=True,
                          text=True, timeout=1800, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{stage} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


def _model(name: str, root: Path) -> Path:
    from compactlm.models import make_tiny_model, resolve_model

    if name == "tiny":  # SmolLM2's vocabulary on a small body: the logits terms dominate
        return make_tiny_model(root / "tiny", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=4, intermediate_size=768)
    return resolve_model(name)


def _rows(name: str, teacher: Path, tmp: Path, repeats: int) -> list[dict]:
    from transformers import AutoConfig

    from compactlm import footprint as fp
    from compactlm import stage_plans as plans
    from compactlm.config import DistillConfig, EvalConfig, GenerateConfig, PruneConfig, ScoreConfig
    from compactlm.models import copy_model_side_files, load_model
    from compactlm.plan import read_config

    config = AutoConfig.from_pretrained(teacher)
    t = fp.dims(config)
    calib = str(GUTENBERG) if GUTENBERG.is_file() else str(tmp / "data-0")
    shape = {"hidden_size": config.hidden_size * 3 // 4 // config.num_attention_heads * config.num_attention_heads,
             "intermediate_size": config.intermediate_size * 3 // 4}
    s = fp.dims(config, shape)
    rows = []

    def measure(stage: str, label: str, need, args: dict) -> None:
        runs = []
        for i in range(repeats):  # each repeat writes its own output (a finished one would be reused)
            out = {k: (f"{v}-{i}" if k == "out" else v) for k, v in args.items()}
            runs.append(_run(stage, {"teacher": str(teacher), **out}))
        m = max(runs, key=lambda r: r["measured_mib"])  # the peak a run must have room for
        m["measured_mib_runs"] = [r["measured_mib"] for r in runs]
        pred = need.per_process / fp.MiB
        rows.append({"model": name, "stage": label, "bound": "bound" in label, "predicted_mib": round(pred, 1), **m,
                     "rel_err": round(pred / m["measured_mib"] - 1, 3),
                     "model_predicted_mib": round(need.model_bytes / fp.MiB, 1),
                     "model_measured_mib": round(m["measured_mib"] - RUNTIME_CPU / fp.MiB, 1)})
        print(json.dumps(rows[-1]), flush=True)

    measure("generate", "generate (hf)", plans.generate(GenerateConfig(**GEN), t, False, 0),
            {"cfg": GEN, "out": str(tmp / "data")})
    for streaming in (False, True):
        cfg = {**SCORE, "streaming": streaming}
        measure("score", "score" + (" streaming" if streaming else ""), plans.score(ScoreConfig(**cfg), t, False),
                {"cfg": cfg, "calibration": calib, "out": str(tmp / f"scores-{streaming}")})
    for streaming in (False, True):
        cfg = {**shape, "streaming": streaming}
        measure("prune", "prune" + (" streaming" if streaming else ""), plans.prune(PruneConfig(**cfg), t, s, False),
                {"cfg": cfg, "scores": str(tmp / "scores-False-0"), "out": str(tmp / f"student-{streaming}")})
    for ckpt in (False, True):
        cfg = {**DISTILL, "gradient_checkpointing": ckpt}
        measure("distill", "distill" + (" checkpointing" if ckpt else ""),
                plans.distill(DistillConfig(**cfg), "distill", t, s, False, 0),
                {"cfg": cfg, "student": str(tmp / "student-False-0"), "data": str(tmp / "data-0"),
                 "out": str(tmp / f"distilled-{ckpt}")})
    cfg = {**DISTILL, "strategy": "fsdp", "nproc": 2}  # each rank's peak (the largest): torchrun's grandchildren
    measure("distill", "distill fsdp x 2 (per rank)", plans.distill(DistillConfig(**cfg), "distill", t, s, False, 0),
            {"cfg": cfg, "student": str(tmp / "student-False-0"), "data": str(tmp / "data-0"),
             "out": str(tmp / "distilled-fsdp"), "measure": "child"})
    bf16 = tmp / "teacher-bf16"  # most checkpoints are stored in bf16: the budget's tasks share its pages
    load_model(teacher, dtype="bfloat16").save_pretrained(bf16)
    copy_model_side_files(teacher, bf16)
    for proxy in ("loss", "kl"):  # kl: each task runs the bf16 teacher as fp32, one module converted at a time
        cfg = {"budget": {"params": 0.75, "search": 2, "proxy": proxy}}
        measure("prune-budget", f"prune budget{' kl' if proxy == 'kl' else ''} (bf16 teacher, 2 tasks)",
                plans.prune(PruneConfig(**cfg), fp.dims(read_config(bf16)), s, False, cpus=2),
                {"cfg": cfg, "teacher": str(bf16), "scores": str(tmp / "scores-False-0"), "calibration": calib,
                 "workers": 2, "out": str(tmp / f"student-budget-{proxy}")})
    measure("evaluate", "evaluate (hf; a bound)", plans.evaluate(EvalConfig(**EVAL), t, t, False, 0), {"cfg": EVAL})
    cfg = {**GEN, "engine": "vllm", "dtype": "auto"}  # the caller and vLLM's engine process together
    measure("generate", "generate (vLLM CPU, 2 processes)", plans.generate(GenerateConfig(**cfg), t, False, 0),
            {"cfg": cfg, "out": str(tmp / "data-vllm"), "measure": "sum"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each stage; the largest peak is compared")
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "ARGS"))
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], json.loads(args.child[1]))
    load0, rows = os.getloadavg(), []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rows += _rows(name, _model(name, Path(tmp)), Path(tmp), args.repeats)
    errs = [abs(r["rel_err"]) for r in rows if not r["bound"]]
    result = {"rows": rows, "max_abs_rel_err": max(errs), "within_15pct": sum(e <= 0.15 for e in errs),
              "predictions": len(errs), "bounds_held": all(r["rel_err"] >= 0 for r in rows if r["bound"]),
              "load_avg": {"start": load0, "end": os.getloadavg()},
              "command": "benchmarks/plan.py " + " ".join(sys.argv[1:])}
    write_result("plan", result)


if __name__ == "__main__":
    main()
