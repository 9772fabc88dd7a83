"""On-policy distillation (issue #18): off-policy KD vs the student learning on its own samples, at equal steps.

    .venv/bin/python benchmarks/onpolicy.py              # hours on a 2-core CPU -> results/onpolicy.json

Teacher SmolLM2-135M-Instruct; students: the ~60 % width and depth shapes of the headline experiment
(benchmarks/quality.py; every arm on both), pruned with importance scores from
Gutenberg prose (benchmarks/repair.py's cache). Training data: the teacher's answers to AlpacaEval instructions (the
HF engine, sampled at T=0.8), stored twice with the same text: top-k log-probs and importance-sampled targets
(``generate.logit_targets: sampled``), k ids per token each, so both take the same bytes per token. Every arm runs
the same number of optimizer steps of the same batch (steps x batch x seq_len "tokens"; an on-policy step trains on
its prompts plus the student's samples):

    pruned            no training
    off_policy        logit KD (forward KL), teacher online, on the teacher's answers
    on_policy         every step on the student's own samples (distill.on_policy, fraction 1, reverse KL)
    mixed             half the steps on the student's samples (fraction 0.5)
    off_then_on       half the steps off-policy, then half on-policy (a distill_then chain, as a recipe runs it)
    offline_topk      offline KD from the stored top-k log-probs (teacher not loaded)
    offline_sampled   offline KD from the stored sampled targets (unbiased forward KL)
    classic           logit KD on Gutenberg prose (data the teacher did not write), teacher online
    corrected         the same, from a corrected teacher (``correct``: fine-tuned on that prose first with the
                      recipe defaults, then scored, pruned and distilled from, as the pipeline runs it)
    corrected_lora    the same with ``correct.lora`` (rank-16 adapters on every linear layer, lr 2e-4)

Measured per row: held-out word perplexity, the 4-task average (ARC-Easy, PIQA, HellaSwag, WinoGrande; 0-shot, first
`limit` each), the teacher's mean NLL per token of the student's greedy answers to held-out instructions (AlpacaEval
instructions the training never saw: the on-policy quality signal, lower = the teacher finds the answers likelier),
and the arm's training wall time. Everything is cached under --out: a killed run resumes.

Prints one JSON object as its last line and writes it to benchmarks/results/onpolicy.json
(rows: student, arm, tokens, word_ppl, avg_acc, teacher_nll_on_student, wall_s).
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
from quality import SHARED, _json_cached, evaluate, synthetic_data, with_overrides, write_result  # noqa: E402
from repair import SHAPES, _prune, cached_scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INSTRUCTIONS = SHARED / "alpaca_eval" / "alpaca_eval_instructions.jsonl"
ALL_ARMS = ["pruned", "off_policy", "on_policy", "mixed", "off_then_on", "offline_topk", "offline_sampled", "classic",
            "corrected", "corrected_lora"]
DEFAULTS: dict[str, Any] = {
    "students": {"width-60": ALL_ARMS, "depth-60": ALL_ARMS},
    "steps": 32, "batch_size": 4, "seq_len": 128, "lr": 3e-4, "warmup_steps": 2, "prompts": 160, "max_tokens": 96,
    "k": 16, "gen_batch_size": 32, "max_new_tokens": 64, "limit": 300, "eval_batch_size": 16, "heldout": 48,
    "heldout_tokens": 64, "calib_samples": 32, "calib_seq_len": 256, "damping": 0.01,
}


def arms(p: dict[str, Any]) -> dict[str, list[tuple[str, dict[str, Any]]] | None]:
    """arm -> its distill stages [(dataset, DistillConfig overrides)], run in order (None = no training)."""
    on = {"loss": "reverse_kl", "max_new_tokens": p["max_new_tokens"]}
    half = p["steps"] // 2
    return {
        "pruned": None,
        "off_policy": [("topk", {})],
        "on_policy": [("topk", {"on_policy": {"fraction": 1.0, **on}})],
        "mixed": [("topk", {"on_policy": {"fraction": 0.5, **on}})],
        "off_then_on": [("topk", {"steps": half}), ("topk", {"steps": p["steps"] - half,
                                                               "on_policy": {"fraction": 1.0, **on}})],
        "offline_topk": [("topk", {"mode": "offline"})],
        "offline_sampled": [("sampled", {"mode": "offline"})],
        "classic": [("classic", {})],
        "corrected": [("classic", {})],
        "corrected_lora": [("classic", {})],
    }


def synthetic(teacher: Path, out: Path, targets: str, p: dict[str, Any], seed: int) -> Path:
    """The teacher's answers to the first `prompts` instructions with k stored targets per token (generation
    stage, HF engine: the same seed writes the same text for both target kinds)."""
    return synthetic_data(teacher, out, {**p, "topk": p["k"], "engine": "hf"}, seed, logit_targets=targets)


def teacher_nll_on_student(teacher: Path, student: Path, p: dict[str, Any], batch: int = 16) -> float:
    """The teacher's mean NLL per token of the student's greedy answers to the last `heldout` instructions (each
    answer up to its first end-of-sequence token, included)."""
    import torch

    from compactlm.generation.prompts import format_prompts, load_prompts
    from compactlm.models import cut_at_eos, eos_token_ids, load_model, load_tokenizer

    tok = load_tokenizer(teacher)
    rows = load_prompts(str(INSTRUCTIONS), "instruction")[-p["heldout"]:]
    prompts = [list(f.prompt_token_ids) for f in format_prompts(rows, tok, chat=True)]
    s_model = load_model(student, dtype="float32", device="cpu").eval()
    t_model = load_model(teacher, dtype="float32", device="cpu").eval()
    eos = eos_token_ids(student, tok)
    pad = min(eos)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            width = max(map(len, chunk))  # left-padded, so every answer starts at column `width`
            x = torch.tensor([[pad] * (width - len(c)) + c for c in chunk])
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
            out = s_model.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=p["heldout_tokens"],
                                   pad_token_id=pad)[:, width:]
            answers = [cut_at_eos([int(t) for t in row], eos) for row in out]
            full = torch.cat([x, out], 1)
            full_mask = torch.cat([mask, torch.tensor([[1] * len(a) + [0] * (out.shape[1] - len(a))
                                                       for a in answers])], 1)
            logits = t_model(full, attention_mask=full_mask).logits[:, width - 1:-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, out[..., None])[..., 0]
            for j, a in enumerate(answers):
                total -= logp[j, :len(a)].sum().item()
                count += len(a)
    return total / max(count, 1)


def train(teacher: Path, student: Path, stages: list[tuple[str, dict]], data: dict[str, Path], out: Path,
          p: dict[str, Any], seed: int) -> tuple[Path, float]:
    """The student after each stage in turn (cached per stage), and the stages' summed training seconds."""
    from compactlm.config import DistillConfig
    from compactlm.distillation import distill

    seconds = 0.0
    for i, (dataset, overrides) in enumerate(stages):
        steps = overrides.get("steps", p["steps"])
        cfg = DistillConfig(**{"steps": steps, "batch_size": p["batch_size"], "seq_len": p["seq_len"], "lr": p["lr"],
                               "warmup_steps": min(p["warmup_steps"], steps), "log_every": 4, **overrides})
        stage_out = out.with_name(f"{out.name}-{i + 1}")
        if not (stage_out / "manifest.json").is_file():
            distill(teacher, student, data[dataset], cfg, stage_out, seed=seed, device="cpu")
        seconds += json.loads((stage_out / "manifest.json").read_text())["metrics"]["seconds"]
        student = stage_out
    return student, seconds


def corrected_teacher(teacher: Path, classic: Path, root: Path, p: dict[str, Any], seed: int,
                      lora: bool = False) -> Path:
    """The teacher after ``correct`` (the recipe's defaults, `steps` steps; with `lora` its LoRA defaults) on the
    classic text, as the compress flow's correct stage runs it."""
    from compactlm.config import CorrectConfig
    from compactlm.distillation import correct_teacher

    out = root / ("teacher-corrected-lora" if lora else "teacher-corrected")
    if not (out / "manifest.json").is_file():
        cfg = CorrectConfig(steps=p["steps"], batch_size=p["batch_size"], seq_len=p["seq_len"],
                            lora={} if lora else None)
        correct_teacher(teacher, classic, cfg, out, seed=seed, device="cpu")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(REPO / "runs" / "onpolicy"), help="cache directory")
    ap.add_argument("--scores", default=str(REPO / "runs" / "repair"), help="benchmarks/repair.py's cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a default")
    args = ap.parse_args()
    p = with_overrides(DEFAULTS, args.set, "a setting")

    import torch

    from compactlm.datasets import corpus_dataset
    from compactlm.models import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    root, seed = Path(args.out).resolve(), args.seed
    teacher = resolve_model(args.teacher)
    text = SHARED / "gutenberg" / "gutenberg_14books_clean.txt"
    scores = cached_scores(teacher, text, Path(args.scores).resolve(), p)
    data = {kind: synthetic(teacher, root / f"synthetic-{kind}", kind, p, seed) for kind in ("topk", "sampled")}
    data["classic"] = root / "classic"
    if not (data["classic"] / "manifest.json").is_file():
        corpus_dataset(text, teacher, data["classic"], max_tokens=2 * p["steps"] * p["batch_size"] * p["seq_len"],
                       seed=seed)
    teachers = {"original": (teacher, scores)}
    for kind in ("corrected", "corrected_lora"):
        if any(kind in a for a in p["students"].values()):
            fixed = corrected_teacher(teacher, data["classic"], root, p, seed, lora=kind == "corrected_lora")
            teachers[kind] = (fixed, cached_scores(fixed, text, root / kind, p))
    ev = {"limit": p["limit"], "eval_batch_size": p["eval_batch_size"], "device": "cpu"}
    t_row = _json_cached(root / "eval" / "teacher.json", lambda: {
        **evaluate(teacher, ev, seed), "teacher_nll_on_student": teacher_nll_on_student(teacher, teacher, p)})
    rows = [{"student": "teacher", "arm": "-", "tokens": 0, "word_ppl": t_row["word_perplexity"],
             "avg_acc": t_row["avg"], "teacher_nll_on_student": t_row["teacher_nll_on_student"], "wall_s": 0.0}]
    plan = arms(p)
    for name, names in p["students"].items():
        for arm in names:
            row = _json_cached(root / "eval" / f"{name}-{arm}.json", lambda arm=arm, name=name: {
                "load_avg_start": os.getloadavg()[0], **measure(teachers, name, arm, plan[arm], data, root, p, seed),
                "load_avg_end": os.getloadavg()[0]})
            steps = 0 if plan[arm] is None else p["steps"]
            rows.append({"student": name, "arm": arm, "tokens": steps * p["batch_size"] * p["seq_len"], **row})
            print(f"[onpolicy] {name} {arm}: {json.dumps(rows[-1])}", flush=True)
    result = {"teacher": args.teacher, "settings": p, "rows": rows,
              "same_text_both_targets": _same_text(data["topk"], data["sampled"]),
              "wall_s": round(time.perf_counter() - t_start, 1),
              "load_avg": {"start": load_start, "end": os.getloadavg()}, "cpu_count": os.cpu_count(),
              "command": "benchmarks/onpolicy.py " + " ".join(sys.argv[1:])}
    write_result("onpolicy", result)


def measure(teachers: dict[str, tuple[Path, Path]], name: str, arm: str, stages: list | None,
            data: dict[str, Path], root: Path, p: dict[str, Any], seed: int) -> dict[str, Any]:
    """One row: the `name` shape pruned from the arm's teacher (by its importance scores), trained by the arm's
    stages from that teacher, evaluated; the original teacher scores the student's answers."""
    which = arm if arm in ("corrected", "corrected_lora") else "original"
    source, scores = teachers[which]
    text = SHARED / "gutenberg" / "gutenberg_14books_clean.txt"
    pruned = root / "students" / (name if which == "original" else f"{name}-{which}")
    _prune(source, scores, text, SHAPES[name], "plain", pruned, p)
    model, wall = (pruned, 0.0) if stages is None else train(source, pruned, stages, data,
                                                             root / "trained" / f"{name}-{arm}", p, seed)
    if which != "original":  # the arm pays for its correction
        wall += json.loads((source / "manifest.json").read_text())["metrics"]["seconds"]
    ev = {"limit": p["limit"], "eval_batch_size": p["eval_batch_size"], "device": "cpu"}
    e = evaluate(model, ev, seed)
    return {"word_ppl": e["word_perplexity"], "avg_acc": e["avg"], "scores": e["scores"],
            "teacher_nll_on_student": teacher_nll_on_student(teachers["original"][0], model, p),
            "wall_s": round(wall, 1)}


def _same_text(a: Path, b: Path) -> bool:
    """Whether the two stored datasets hold the same completions (so only their targets differ)."""
    from compactlm.formats.generated import read_rows

    key = ("prompt_id", "completion")
    return [tuple(r[k] for k in key) for r in read_rows(a)] == [tuple(r[k] for k in key) for r in read_rows(b)]


if __name__ == "__main__":
    main()
