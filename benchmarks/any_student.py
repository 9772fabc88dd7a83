"""Which data and which loss, for a student the user brings: classic vs synthetic vs mixed data, and KD across
tokenizers, at equal training tokens.

    .venv/bin/python benchmarks/any_student.py            # ~35 min on a 2-core CPU
    .venv/bin/python benchmarks/any_student.py --set tokens=65536 --set limit=250 --device cuda

Teacher: SmolLM2-135M-Instruct. Student (same tokenizer): the teacher depth-pruned to 14 of 30 layers with
compactlm's importance scores (the ``depth-60`` shape of benchmarks/quality.py), given to each arm as a ready
model, as a recipe's ``student:`` would be. Student (another tokenizer): the same network moved onto a 16k-token
byte-level BPE trained on Gutenberg text and AlpacaEval prompts (:func:`compactlm.vocab.transplant_vocab`, Fast
Vocabulary Transfer), so the two groups differ in the vocabulary only.

Arms, each at the same training-token budget (steps x batch x seq_len), data built by the recipe's ``data``
section (:func:`compactlm.mixture.build_mixture`, same token count for every arm):

    ce_classic    cross-entropy on classic text (Gutenberg novels)
    ce_synthetic  cross-entropy on the teacher's answers to AlpacaEval instructions (vLLM) = sequence-level KD
    ce_mixture    cross-entropy on 50 % classic + 50 % synthetic tokens
    kd_mixture    logit KD (forward KL, online teacher) on the same mixture
    seq_kd        another tokenizer: cross-entropy on the teacher's answers, re-tokenized for the student
    uld           another tokenizer: 0.5 x cross-entropy + 0.5 x ULD (Boizard et al., 2024) on the same answers

Evaluation (tokenizer-independent): held-out word perplexity (the first ``heldout_chars`` characters of WikiText-2
test, cut at a paragraph) and ARC-Easy, PIQA, HellaSwag, WinoGrande (0-shot, first ``limit`` examples).
Everything is cached under ``--out`` (default runs/any-student): a killed run resumes. MLflow: one parent run,
one child per row.

Prints one JSON object as its last line and writes it to benchmarks/results/any_student.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402 - the shared pieces: synthetic data, evaluation, timing, caching

SHAPE = {"num_hidden_layers": 14}
DEFAULTS: dict[str, Any] = {
    "tokens": 16384, "batch_size": 4, "seq_len": 128, "lr": 3e-4, "warmup_steps": 2, "limit": 100,
    "eval_batch_size": 16, "prompts": 160, "max_tokens": 128, "topk": 0, "engine": "vllm", "gen_batch_size": 64,
    "score_samples": 32, "vocab_size": 16384, "heldout_chars": 60000,
}
GUTENBERG = q.SHARED / "gutenberg" / "gutenberg_14books_clean.txt"
# name -> (student group, data, DistillConfig overrides)
ARMS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ce_classic": ("same", "classic", {"kd_weight": 0.0}),
    "ce_synthetic": ("same", "synthetic", {"kd_weight": 0.0}),
    "ce_mixture": ("same", "mixture", {"kd_weight": 0.0}),
    "kd_mixture": ("same", "mixture", {"kd_weight": 1.0}),
    "seq_kd": ("other", "synthetic", {"kd_weight": 0.0}),
    "uld": ("other", "synthetic", {"kd_weight": 0.5}),
}
DATA = {
    "classic": [{"kind": "text", "path": str(GUTENBERG)}],
    "synthetic": [{"kind": "generated"}],
    "mixture": [{"kind": "generated", "weight": 0.5}, {"kind": "text", "path": str(GUTENBERG), "weight": 0.5}],
}


def students(teacher: Path, synth: Path, root: Path, p: dict[str, Any], seed: int) -> dict[str, Path]:
    """{"same": the pruned teacher, "other": the same network on a freshly trained 16k BPE vocabulary}."""
    from compactlm.config import PruneConfig, ScoreConfig
    from compactlm.datasets import read_text
    from compactlm.importance import score_model
    from compactlm.pruning import prune_to_dir
    from compactlm.records import read_file_records
    from compactlm.vocab import train_bpe_tokenizer, transplant_vocab

    scores, same = root / "scores", root / "students" / "same"
    if not (scores / "manifest.json").is_file():
        score_model(teacher, synth, ScoreConfig(num_samples=p["score_samples"], seq_len=256, batch_size=8,
                                                layer_loss=False), scores, device=p["device"], seed=seed)
    if not (same / "manifest.json").is_file():
        prune_to_dir(teacher, scores, PruneConfig(), same, shape=SHAPE, device=p["device"])
    tok_dir = root / "bpe"
    if not (tok_dir / "tokenizer.json").is_file():
        alpaca = q.SHARED / "alpaca_eval" / "alpaca_eval_instructions.jsonl"
        prompts = [r["instruction"] for r in read_file_records(alpaca, "instruction")]
        texts = read_text(GUTENBERG) + prompts
        train_bpe_tokenizer(texts, tok_dir, vocab_size=p["vocab_size"])
    other = transplant_vocab(same, tok_dir, root / "students" / "other")
    return {"same": same, "other": other}


def dataset(kind: str, tokenizer_dir: Path, synth: Path, root: Path, tokens: int, seed: int) -> Path:
    from compactlm.config import DataConfig
    from compactlm.mixture import build_mixture

    out = root / "data" / kind
    if not (out / "manifest.json").is_file():
        build_mixture(DataConfig(sources=DATA[kind], tokens=tokens), tokenizer_dir, out, tokens=tokens,
                      generated_dir=synth, seed=seed)
    return out


def heldout(root: Path, chars: int) -> Path:
    """The first `chars` characters of WikiText-2 test, cut at a paragraph (none of it trains anything)."""
    out = root / "heldout.txt"
    if not out.is_file():
        text = (q.SHARED / "wikitext2_raw" / "wiki.test.raw").read_text()
        paragraphs = [t.strip() for t in text.splitlines() if t.strip() and not t.strip().startswith("=")]
        keep, n = [], 0
        while paragraphs and n < chars:
            keep.append(paragraphs.pop(0))
            n += len(keep[-1])
        out.write_text("\n\n".join(keep) + "\n")
    return out


def evaluate(model_dir: Path, p: dict[str, Any], seed: int) -> dict[str, Any]:
    from compactlm.config import EvalConfig
    from compactlm.evaluation import evaluate_model, main_metric

    cfg = EvalConfig(tasks=list(q.TASKS), limit=p["limit"], batch_size=p["eval_batch_size"], perplexity=True,
                     perplexity_text=p["heldout"], speed=False, data_dir=str(q.SHARED))
    res = evaluate_model(model_dir, cfg, device=p["device"], seed=seed)
    scores = {t: res["tasks"][t][main_metric(res["tasks"][t])] for t in q.TASKS}
    return {"scores": scores, "avg": sum(scores.values()) / len(scores),
            "word_perplexity": res["perplexity"]["word_perplexity"], "params": res["params"]}


def row_for(name: str, model_dir: Path, p: dict[str, Any], seed: int, root: Path, **extra) -> dict[str, Any]:
    ev = q._json_cached(root / "eval" / f"{name}.json", lambda: evaluate(model_dir, p, seed))
    return {"name": name, "word_ppl": round(ev["word_perplexity"], 2), "avg_acc": round(ev["avg"], 4),
            "scores": ev["scores"], "params": ev["params"], **extra}


def table(rows: list[dict[str, Any]]) -> str:
    short = [t.removeprefix("compactlm_") for t in q.TASKS]
    head = ["arm", "student", "data", "tokens", "params (M)", *short, "avg acc", "word ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["name"], r["student"], r.get("data", "-"), f"{r['tokens']:,}",
                                        f"{r['params'] / 1e6:.1f}", *[f"{r['scores'][t]:.3f}" for t in q.TASKS],
                                        f"{r['avg_acc']:.3f}", f"{r['word_ppl']:.1f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=None, help="cache directory (default runs/any-student)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a default")
    args = ap.parse_args()

    from compactlm.config import DistillConfig
    from compactlm.distillation import distill
    from compactlm.models import pick_device, resolve_model
    from compactlm.tracking import Tracker, default_tracking_uri

    p = q.with_overrides(DEFAULTS, args.set, "a setting")
    p["device"] = pick_device(args.device)
    root = Path(args.out or q.REPO / "runs" / "any-student").resolve()
    root.mkdir(parents=True, exist_ok=True)
    p["heldout"] = str(heldout(root, p["heldout_chars"]))
    timer, t0 = q.Timer(), q._usage()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    tracker = Tracker(default_tracking_uri(root), "compactlm-any-student")
    parent = tracker.start_run("any-student", tags={"benchmark": "any_student"})
    tracker.log_params(parent, {"teacher": args.teacher, **{k: json.dumps(v) for k, v in p.items()}})

    teacher = resolve_model(args.teacher)
    with timer("generate"):
        synth = q.synthetic_data(teacher, root / "synthetic", p, args.seed)
    with timer("students"):
        group = students(teacher, synth, root, p, args.seed)
    with timer("evaluate"):
        rows = [row_for("teacher", teacher, p, args.seed, root, student="teacher", tokens=0),
                row_for("pruned", group["same"], p, args.seed, root, student="same", tokens=0),
                row_for("transplanted", group["other"], p, args.seed, root, student="other", tokens=0)]
    steps = max(1, p["tokens"] // (p["batch_size"] * p["seq_len"]))
    for name, (who, data_kind, overrides) in ARMS.items():
        sdir = group[who]
        with timer("data"):
            data = dataset(data_kind, teacher, synth, root, steps * p["batch_size"] * p["seq_len"], args.seed)
        cfg = DistillConfig(steps=steps, batch_size=p["batch_size"], seq_len=p["seq_len"], lr=p["lr"],
                            warmup_steps=p["warmup_steps"], log_every=max(1, steps // 8), **overrides)
        out = root / "trained" / name
        with timer(f"train:{name}"):
            if not (out / "manifest.json").is_file():
                distill(teacher, sdir, data, cfg, out, seed=args.seed, device=p["device"])
        train = json.loads((out / "manifest.json").read_text()).get("metrics", {})
        with timer("evaluate"):
            row = row_for(name, out, p, args.seed, root, student=who, data=data_kind,
                          tokens=steps * p["batch_size"] * p["seq_len"], kd_weight=overrides["kd_weight"],
                          train_loss=train.get("loss"), train_seconds=train.get("seconds"))
        rows.append(row)
        run = tracker.start_run(name, parent_id=parent, tags={"student": who, "data": data_kind})
        tracker.log_params(run, {"student": who, "data": data_kind, "distill": cfg.model_dump_json()})
        tracker.log_metrics(run, {"word_ppl": row["word_ppl"], "avg_acc": row["avg_acc"],
                                  **{t.removeprefix("compactlm_"): v for t, v in row["scores"].items()}})
        tracker.end_run(run)
        print(f"[any_student] {name}: ppl {row['word_ppl']:.1f}, avg acc {row['avg_acc']:.3f}", flush=True)
    tracker.end_run(parent)

    end = q._usage()
    result = {"benchmark": "any_student", "teacher": args.teacher, "settings": p, "student_shape": SHAPE,
              "arms": rows, "table_md": table(rows), "phases": timer.phases,
              "wall_s": round(end["wall"] - t0["wall"], 1), "cpu_s": round(end["cpu"] - t0["cpu"], 1),
              "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    q.RESULTS.mkdir(parents=True, exist_ok=True)
    (q.RESULTS / "any_student.json").write_text(json.dumps(result, indent=2) + "\n")
    print(result["table_md"])
    print(json.dumps({k: v for k, v in result.items() if k != "table_md"}))


if __name__ == "__main__":
    main()
