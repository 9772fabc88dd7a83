"""Offline KD targets at equal bytes per token (issue #18): the teacher's top-k log-probs (+ a rest bucket,
`logit_targets: topk`) vs k ids drawn from its distribution (`logit_targets: sampled`), against the exact
full-vocabulary forward KL they stand in for.

    .venv/bin/python benchmarks/sparse_targets.py      # 2-core CPU, ~3 min -> results/sparse_targets.json

Teacher SmolLM2-135M-Instruct; student its width-60 Minitron student (benchmarks/repair.py's plain slicing; built
here, cached under --out, when absent). Text: `sequences` x `seq_len` tokens of Gutenberg prose from the end of
the file (../shared/data; calibration uses its start), every position counted. For each k, with both kinds
stored as generation stores them (int32 ids + fp16 log-probs: 6k bytes per token):
- the loss value each gives vs the exact KL (top-k: the coarse (k+1)-way KL, a lower bound; sampled: the mean and
  the standard deviation over `draws` independent draws, unbiased);
- how well one draw's gradient w.r.t. the student's logits points along the exact gradient (cosine, over all
  positions at once; top-k has one fixed gradient, sampled a fresh draw per repeat, mean reported).

Prints one JSON object as its last line and writes it to benchmarks/results/sparse_targets.json
(`{"rows": [{"k", "bytes_per_token", "exact_kl", "topk_kl", "topk_bias", "sampled_kl_mean", "sampled_bias",
"sampled_sd", "topk_grad_cos", "sampled_grad_cos"}]}`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED, with_overrides, write_result  # noqa: E402
from repair import SHAPES, _prune, cached_scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {"ks": [4, 8, 16, 32, 64], "draws": 32, "sequences": 16, "seq_len": 128, "calib_samples": 32,
            "calib_seq_len": 256, "damping": 0.01}


def _logits(model_dir: Path, ids):
    import torch

    from compactlm.models import load_model

    model = load_model(model_dir, dtype="float32", device="cpu").eval()
    with torch.no_grad():
        out = torch.cat([model(ids[i:i + 4]).logits for i in range(0, len(ids), 4)])
    return out.reshape(-1, out.shape[-1])


def _grad(loss_fn, s):
    import torch

    x = s.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x), x)
    return g.flatten()


def measure(s, t, k: int, draws: int, seed: int) -> dict:
    import torch
    import torch.nn.functional as F

    from compactlm.distillation.losses import kd_loss, sampled_kd_loss, topk_kd_loss

    t_logp = F.log_softmax(t.float(), -1)
    exact = kd_loss(s, t, None).item()
    g_exact = _grad(lambda x: kd_loss(x, t, None), s)
    lp, ids = t_logp.topk(k, dim=-1)
    lp = lp.half()  # as stored
    topk = topk_kd_loss(s, ids, lp, None).item()
    cos = torch.nn.functional.cosine_similarity
    topk_cos = cos(_grad(lambda x: topk_kd_loss(x, ids, lp, None), s), g_exact, dim=0).item()
    gen = torch.Generator().manual_seed(seed)
    values, coss = [], []
    probs = t_logp.exp()
    for _ in range(draws):
        d = torch.multinomial(probs, k, replacement=True, generator=gen).sort(-1).values
        dlp = t_logp.gather(-1, d).half()
        values.append(sampled_kd_loss(s, d, dlp, None).item())
        coss.append(cos(_grad(lambda x, d=d, dlp=dlp: sampled_kd_loss(x, d, dlp, None), s), g_exact, dim=0).item())
    v = torch.tensor(values)
    return {"k": k, "bytes_per_token": 6 * k, "exact_kl": round(exact, 4), "topk_kl": round(topk, 4),
            "topk_bias": round(topk - exact, 4), "sampled_kl_mean": round(v.mean().item(), 4),
            "sampled_bias": round(v.mean().item() - exact, 4), "sampled_sd": round(v.std().item(), 4),
            "sampled_bias_se": round(v.std().item() / draws ** 0.5, 4), "topk_grad_cos": round(topk_cos, 4),
            "sampled_grad_cos": round(sum(coss) / len(coss), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2-135m-instruct")
    ap.add_argument("--out", default=str(REPO / "runs" / "repair"), help="benchmarks/repair.py's cache")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a default")
    args = ap.parse_args()
    p = with_overrides(DEFAULTS, args.set, "a setting")

    import torch

    from compactlm.models import load_tokenizer, resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    root = Path(args.out).resolve()
    teacher = resolve_model(args.teacher)
    text = SHARED / "gutenberg" / "gutenberg_14books_clean.txt"
    scores = cached_scores(teacher, text, root, p)
    student = root / "students" / "width-60-plain"
    _prune(teacher, scores, text, SHAPES["width-60"], "plain", student, p)
    n = p["sequences"] * p["seq_len"]
    ids = load_tokenizer(teacher)(text.read_text()[-200_000:])["input_ids"][-n:]
    ids = torch.tensor(ids).reshape(p["sequences"], p["seq_len"])
    t, s = _logits(teacher, ids), _logits(student, ids)
    rows = []
    for k in p["ks"]:
        rows.append(measure(s, t, k, p["draws"], seed=k))
        print(f"[sparse] k={k}: {rows[-1]}", flush=True)
    result = {"teacher": args.teacher, "student": "width-60 (plain slicing)", "settings": p, "rows": rows,
              "tokens": n, "wall_s": round(time.perf_counter() - t_start, 1),
              "load_avg": {"start": load_start, "end": os.getloadavg()}, "cpu_count": os.cpu_count(),
              "command": "benchmarks/sparse_targets.py " + " ".join(sys.argv[1:])}
    write_result("sparse_targets", result, indent=2)


if __name__ == "__main__":
    main()
