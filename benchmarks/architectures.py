"""Every supported model family through score -> prune (each axis) -> distill -> evaluate -> vLLM, on tiny models.

    .venv/bin/python benchmarks/architectures.py   [--families gemma2,phi3 --steps 4 --eval-backend hf]

Per family (``compactlm.arch.SUPPORTED_ARCHS``) a tiny random teacher from :func:`compactlm.models.make_tiny_model`
(hidden 256, 4 query heads x 64 in 2 KV groups, 4 layers, MLP 256, tied embeddings, the real SmolLM2 tokenizer;
hidden = heads x head_dim, so every teacher is itself servable by vLLM) goes through:

* ``scoring_ok`` — the score stage (:func:`compactlm.importance.score_model`, with the layer-loss pass) on a
  calibration text: finite scores of the model's shapes;
* ``prune_nothing_bit_exact`` — pruning nothing returns the teacher's logits bit for bit;
* ``prune_axes`` / ``prune_axes_ok`` — per axis (depth 4->3, heads 4->2, hidden 256->248, MLP 256->248, and all
  at once) on a copy of the teacher whose removed units were zeroed (tests/compactlm/pruning/units.py, the
  family-aware helper of the exactness test) and whose norms' eps is 0: the largest |logit difference| to the
  teacher, whether it is within rtol 1e-5 / atol 2e-5, and whether ``param_count`` equals the student's
  ``count_params``;
* ``student`` — the real teacher pruned by the prune stage (:func:`compactlm.pruning.prune_to_dir`) to a shape
  that cuts every axis (3 layers, hidden 192, 2 heads, MLP 192): ``written_as``, parameters;
* ``distill_ok`` — :func:`compactlm.distillation.distill`, ``--steps`` online steps with logit and hidden-state
  KD on a small chat dataset: finite losses, the published student loads;
* ``eval_ok`` — :func:`compactlm.evaluation.evaluate_model` (``--eval-backend``) on compactlm_facts (8
  questions) and the built-in perplexity text: finite metrics;
* ``vllm_loads`` / ``greedy_match`` — the teacher, the pruned and the distilled student load in one vLLM
  subprocess (tests/scripts/vllm_greedy.py) and vLLM's 8 greedy tokens equal HF's ``generate``; per model in
  ``vllm`` also ``logprob_max_abs_diff``, the largest difference between vLLM's and HF's log-prob of those
  tokens (random tiny models often repeat one token, so this is what shows both compute the same function).
  The two top-level fields are about the pruned student.

Prints one JSON object as its last line and writes it to benchmarks/results/architectures.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/compactlm/pruning/units.py: the exactness test's family-aware zeroing
sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import write_result  # noqa: E402

SHAPE = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
             intermediate_size=256, tie_word_embeddings=True)
AXES = {"depth": dict(num_hidden_layers=3), "heads": dict(num_attention_heads=2), "hidden": dict(hidden_size=248),
        "mlp": dict(intermediate_size=248),
        "mixed": dict(num_hidden_layers=3, num_attention_heads=2, hidden_size=248, intermediate_size=248)}
STUDENT = dict(num_hidden_layers=3, hidden_size=192, intermediate_size=192, num_attention_heads=2)
CALIB = "\n\n".join(f"Line {i}: pruning keeps the heads, neurons and channels that matter most." for i in range(20))
PROMPT = "The capital of France is"  # tests/scripts/vllm_greedy.py's prompt
MAX_TOKENS = 8


def _finite(*tensors) -> bool:
    return all(bool(t.isfinite().all()) for t in tensors if t is not None)


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


def prune_axes(teacher_dir: Path) -> dict:
    """Prune-nothing identity and, per axis, removing zeroed units: max |logit diff|, exact, params match."""
    import torch

    from compactlm.config import PruneConfig
    from compactlm.importance import compute_importance
    from compactlm.models import count_params, load_model
    from compactlm.pruning import param_count, prune_model
    from tests.compactlm.pruning.units import set_norm_eps, zero_units

    model = load_model(teacher_dir)
    ids = torch.randint(0, 5000, (2, 10), generator=torch.Generator().manual_seed(0))
    student, _ = prune_model(model, compute_importance(model, ids, batch_size=2, layer_loss=False), PruneConfig())
    out = {"prune_nothing_bit_exact": torch.equal(_logits(model, ids), _logits(student, ids))}
    D, I = model.config.hidden_size, model.config.intermediate_size
    zero_units(model, [1, 2], list(range(I - 8, I)), list(range(0, D, D // 8)), dead_layer=1)
    model.config.rms_norm_eps = 0.0
    set_norm_eps(model.modules(), 0.0)
    scores = compute_importance(model, ids, batch_size=2, layer_loss=False)
    scores.heads[:, [1, 2]] = -1.0  # head scores read the o_proj input, which zeroed o_proj columns leave as is
    ref = _logits(model, ids)
    axes = {}
    for name, target in AXES.items():
        student, rec = prune_model(model, scores, PruneConfig(**target))
        diff = float((_logits(student, ids) - ref).abs().max())
        axes[name] = {"max_abs_logit_diff": diff, "exact": torch.allclose(_logits(student, ids), ref, rtol=1e-5,
                                                                             atol=2e-5),
                      "params_match": param_count(model.config, rec["student"]) == count_params(student)
                      == rec["params_after"], "written_as": rec["written_as"]}
    return {**out, "prune_axes": axes,
            "prune_axes_ok": all(a["exact"] and a["params_match"] for a in axes.values())}


def score_and_prune(teacher_dir: Path, work: Path) -> dict:
    """The score stage on the calibration text and the prune stage to STUDENT."""
    from compactlm.config import PruneConfig, ScoreConfig
    from compactlm.importance import load_scores, score_model
    from compactlm.pruning import prune_to_dir

    (work / "calib.txt").write_text(CALIB)
    score_model(teacher_dir, work / "calib.txt", ScoreConfig(num_samples=2, seq_len=16, batch_size=2),
                work / "scores")
    s = load_scores(work / "scores")
    ok = _finite(s.heads, s.neurons, s.channels, s.layer_block_influence, s.layer_loss_increase) and \
        tuple(s.heads.shape) == (SHAPE["num_hidden_layers"], SHAPE["num_attention_heads"])
    rec = prune_to_dir(teacher_dir, work / "scores", PruneConfig(**STUDENT), work / "student")
    return {"scoring_ok": ok, "student": {"written_as": rec["written_as"], "shape": rec["student"],
                                         "params_before": rec["params_before"], "params_after": rec["params_after"]}}


def _chat_data(teacher_dir: Path, out: Path) -> Path:
    from compactlm.formats.generated import write_dataset
    from compactlm.models import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    rows = []
    for i in range(16):
        prompt = f"Write one sentence about the number {i}."
        prompt_text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        completion = f"The number {i} comes after {i - 1} and before {i + 1}, as everyone agrees."
        rows.append({"id": f"{i}-0", "prompt_id": i, "sample": 0, "prompt": prompt, "prompt_text": prompt_text,
                     "completion": completion, "finish_reason": "stop",
                     "prompt_token_ids": tok(prompt_text, add_special_tokens=False)["input_ids"],
                     "completion_token_ids": tok(completion, add_special_tokens=False)["input_ids"] + [
                         tok.eos_token_id]})
    write_dataset(out, rows, {"stage": "generate", "rows": len(rows)})
    return out


def distill_and_eval(teacher_dir: Path, work: Path, steps: int, backend: str) -> dict:
    from compactlm.config import DistillConfig, EvalConfig
    from compactlm.distillation import distill
    from compactlm.evaluation import evaluate_model
    from compactlm.models import load_model

    cfg = DistillConfig(steps=steps, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, chunk_size=32,
                        hidden_weight=1.0)
    summary = distill(teacher_dir, work / "student", _chat_data(teacher_dir, work / "data"), cfg,
                      work / "distilled", seed=0)
    losses = [summary[k] for k in ("initial_loss", "loss", "kd_loss", "hidden_loss")]
    load_model(work / "distilled")
    t0 = time.perf_counter()
    result = evaluate_model(work / "distilled", EvalConfig(tasks=["compactlm_facts"], limit=8, batch_size=8,
                                                           max_length=128, speed=False, backend=backend))
    metrics = [result["tasks"]["compactlm_facts"]["acc"], result["perplexity"]["word_perplexity"]]
    return {"distill_ok": all(math.isfinite(v) for v in losses),
            "distill": {"initial_loss": summary["initial_loss"], "loss": summary["loss"],
                        "hidden_loss": summary["hidden_loss"]},
            "eval_ok": all(math.isfinite(v) for v in metrics),
            "eval": {"backend": backend, "acc": metrics[0], "word_perplexity": metrics[1],
                     "seconds": time.perf_counter() - t0}}


def hf_greedy(model_dir: Path) -> tuple[list[int], list[float]]:
    """HF's greedy tokens and the log-prob HF gives each."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=MAX_TOKENS, do_sample=False)
        logp = torch.log_softmax(model(ids).logits[0, prompt.shape[1] - 1:-1].float(), dim=-1)
    new = ids[0, prompt.shape[1]:]
    return new.tolist(), logp.gather(-1, new[:, None])[:, 0].tolist()


def vllm_greedy(model_dirs: list[Path]) -> tuple[dict[int, dict | str], float]:
    """{index: {"ids", "logprobs"}, or the error} of every model, from one vLLM subprocess; and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "vllm_greedy.py"), "--max-tokens",
                           str(MAX_TOKENS), *map(str, model_dirs)], capture_output=True, text=True, env=env,
                          timeout=1800)
    out: dict[int, dict | str] = {}
    for line in proc.stdout.splitlines():
        if line.startswith(("VLLM_OK ", "VLLM_FAIL ")):
            _, i, rest = line.split(" ", 2)
            out[int(i)] = json.loads(rest) if line.startswith("VLLM_OK ") else rest
    for i in range(len(model_dirs)):
        out.setdefault(i, f"no result (exit {proc.returncode}): {proc.stderr[-500:]}")
    return out, time.perf_counter() - t0


def vllm_row(got: dict | str, model_dir: Path) -> dict:
    if isinstance(got, str):
        return {"loads": False, "error": got}
    hf, hf_logp = hf_greedy(model_dir)
    diff = max((abs(a - b) for a, b in zip(got["logprobs"], hf_logp)), default=0.0)
    return {"loads": True, "greedy_match": got["ids"] == hf, "logprob_max_abs_diff": diff,
            "vllm_tokens": got["ids"], "hf_tokens": hf}


def family(arch: str, root: Path, args) -> dict:
    from compactlm.models import make_tiny_model

    work = root / arch
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    teacher = make_tiny_model(work / "teacher", arch=arch, **SHAPE)
    row = {"model_type": arch, **score_and_prune(teacher, work), **prune_axes(teacher),
           **distill_and_eval(teacher, work, args.steps, args.eval_backend)}
    row["seconds"] = time.perf_counter() - t0  # all but vLLM
    print(json.dumps({k: row[k] for k in ("model_type", "scoring_ok", "prune_axes_ok", "distill_ok", "eval_ok")}),
          flush=True)
    return row


def main() -> None:
    from compactlm.arch import SUPPORTED_ARCHS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(SUPPORTED_ARCHS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--eval-backend", choices=("hf", "vllm"), default="hf")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compactlm-arch-") as tmp:
        root = Path(tmp)
        rows = [family(arch, root, args) for arch in args.families.split(",")]
        kinds = ("teacher", "student", "distilled")
        dirs = [root / r["model_type"] / k for r in rows for k in kinds]
        tokens, vllm_seconds = vllm_greedy(dirs)
        for i, row in enumerate(rows):
            row["vllm"] = {kind: vllm_row(tokens[3 * i + j], dirs[3 * i + j]) for j, kind in enumerate(kinds)}
            row["vllm_loads"] = row["vllm"]["student"]["loads"]
            row["greedy_match"] = row["vllm"]["student"].get("greedy_match", False)
    result = {"families": rows, "teacher_shape": SHAPE, "student_shape": STUDENT, "axes": AXES,
              "vllm_subprocess_seconds": vllm_seconds, "vllm_models": len(dirs),
              "seconds": time.perf_counter() - t0,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "command": "python " + " ".join(["benchmarks/architectures.py", *sys.argv[1:]])}
    write_result("architectures", result, indent=2)


if __name__ == "__main__":
    main()
