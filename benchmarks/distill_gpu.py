"""Distillation throughput and MFU on GPUs at the ~1B scale: CE, online logit KD and offline top-k KD, with
``strategy: single`` and (``--fsdp-modes``, default online KD) ``strategy: fsdp`` over ``--nproc`` GPUs.

    python benchmarks/distill_gpu.py      [--layers 16 --teacher-layers 24 --batch-size 8 --seq-len 2048]
    python benchmarks/distill_gpu.py --device cpu --layers 1 --teacher-layers 1 --hidden 256 --seq-len 64 \
        --batch-size 2 --steps 4 --warmup 1 --name distill_gpu_smoke     # the script itself, on CPU (no MFU)

Models: Llama-shaped, random init (throughput does not depend on the weights), hidden 2048, 32 query / 8 KV
heads of 64, MLP 8192, the SmolLM2 tokenizer's 49,152-token vocabulary, tied embeddings: the student has
``--layers`` layers (16: 1.0B parameters), the teacher ``--teacher-layers`` (24: 1.4B). Data: Gutenberg novels
from ../shared/data through :func:`compactlm.datasets.corpus_dataset`, packed to ``--seq-len``; for the offline
mode, top-k (``--topk``) teacher log-probs of every position are added in the generated-dataset layout.

Each mode trains through :func:`compactlm.distillation.distill` (the pipeline's own trainer: fp32 master
weights, bf16 autocast, fused AdamW, chunked KD loss) for ``--steps`` steps; the first ``--warmup`` steps are
dropped and the figures are medians of the rest, as logged by the trainer: tokens/s, model TFLOP/s (PaLM-style
count: 3 x the student's forward, plus the teacher's forward in online mode) and MFU against the device's bf16
peak (per GPU under fsdp). Peak GPU memory per run: the trainer's ``peak_gpu_mib`` (``torch.cuda.max_memory_allocated``
of the training process; rank 0's under fsdp, which torchrun starts), beside each rank's parameters + gradients +
optimizer state (``state_mib_per_rank``).

Prints one JSON object as its last line and writes it to benchmarks/results/distill_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import SHARED, write_result  # noqa: E402


def add_topk(data_dir: Path, teacher_dir: Path, out_dir: Path, k: int, device: str) -> Path:
    """A copy of the dataset at `data_dir` with the teacher's top-k log-probs of every completion token."""
    import torch

    from compactlm.formats import generated as fmt
    from compactlm.models import load_model

    teacher = load_model(teacher_dir, dtype="bfloat16", device=device).eval()
    rows = fmt.read_rows(data_dir)
    for r in rows:
        ids = torch.tensor([r["prompt_token_ids"] + r["completion_token_ids"]], device=device)
        with torch.inference_mode():
            logp = torch.log_softmax(teacher(ids).logits[0].float(), dim=-1)
        p = len(r["prompt_token_ids"])
        # position p-1+t predicts completion token t; with an empty prompt (a corpus row) the first token
        # has no predictor in the row: it gets a flat placeholder (k ids at probability 1/vocab each)
        lp, li = logp[max(p - 1, 0): p - 1 + len(r["completion_token_ids"])].topk(k, dim=-1)
        pad = len(r["completion_token_ids"]) - lp.shape[0]
        flat = -math.log(logp.shape[-1])
        r["topk_ids"] = [list(range(k))] * pad + li.cpu().tolist()
        r["topk_logprobs"] = [[flat] * k] * pad + lp.cpu().tolist()
    manifest = json.loads((data_dir / "manifest.json").read_text())
    fmt.write_dataset(out_dir, rows, {**manifest, "topk_logprobs": k}, topk=k)
    del teacher
    torch.cuda.empty_cache()
    return out_dir


def train(teacher: Path, student: Path, data: Path, mode: str, strategy: str, args, work: Path) -> dict:
    """One `distill()` call in `mode` under `strategy` (fsdp: ``--nproc`` ranks that torchrun starts); the medians
    of the logged steps after the warm-up, the peak GPU memory of (rank 0's) process and the losses."""
    import torch

    from compactlm.config import DistillConfig
    from compactlm.distillation import distill

    fields = {"ce": {"kd_weight": 0.0}, "kd_online": {"kd_weight": 1.0},
              "kd_offline": {"kd_weight": 1.0, "mode": "offline"}}[mode]
    nproc = args.nproc if strategy == "fsdp" else 1
    cfg = DistillConfig(steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                        seq_len=args.seq_len, lr=3e-4, warmup_steps=2, log_every=1, strategy=strategy, nproc=nproc,
                        **fields)
    logged: list[dict] = []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    summary = distill(teacher, student, data, cfg, work / f"out-{strategy}-{mode}", seed=0, device=args.device,
                      log_fn=lambda m, s, out=logged: out.append(m))
    wall = time.perf_counter() - t
    kept = logged[args.warmup:]
    tok_s = statistics.median(m["tokens_per_s"] for m in kept)
    peak = summary.get("peak_gpu_mib")
    return {
        "tokens_per_s": round(tok_s),
        "model_tflops": round(statistics.median(m["model_tflops"] for m in kept), 1),
        "mfu": round(statistics.median(m["mfu"] for m in kept), 3) if "mfu" in kept[0] else None,
        "step_s": round(args.batch_size * args.seq_len / tok_s, 3),
        "peak_mem_gib": round(peak / 1024, 1) if peak is not None else None,
        "state_mib_per_rank": summary["state_mib_per_rank"],
        "first_loss": round(logged[0]["loss"], 4), "last_loss": round(logged[-1]["loss"], 4),
        "call_wall_s": round(wall, 1), "world_size": nproc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--teacher-layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048, help="hidden size (MLP 4x, heads of 64, 4 per KV head)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="first steps dropped from the medians")
    ap.add_argument("--topk", type=int, default=50)
    ap.add_argument("--modes", default="ce,kd_online,kd_offline")
    ap.add_argument("--fsdp-modes", default="kd_online", help="modes also run with strategy fsdp ('' for none)")
    ap.add_argument("--nproc", type=int, default=None, help="fsdp ranks (default: every visible GPU)")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (no MFU)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--name", default="distill_gpu")
    args = ap.parse_args()

    import torch

    from compactlm.datasets import corpus_dataset
    from compactlm.models import count_params, load_model, make_tiny_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("distill_gpu.py needs a CUDA device (--device cpu for a smoke run)")
    args.nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 1)
    work = Path(args.work or tempfile.mkdtemp(prefix="distill-gpu-"))
    shape = dict(hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
                 num_key_value_heads=args.hidden // 256, head_dim=64, intermediate_size=4 * args.hidden,
                 tie_word_embeddings=True, max_position_embeddings=args.seq_len)
    t0 = time.perf_counter()
    student = make_tiny_model(work / "student", num_hidden_layers=args.layers, seed=0, **shape)
    teacher = make_tiny_model(work / "teacher", num_hidden_layers=args.teacher_layers, seed=1, **shape)
    tokens = (args.steps + 1) * args.batch_size * args.seq_len
    data = work / "data"
    if not (data / "manifest.json").is_file():
        corpus_dataset(SHARED / "gutenberg" / "gutenberg_14books_clean.txt", student, data, max_tokens=tokens,
                       seed=0, doc_tokens=args.seq_len)
    modes = args.modes.split(",")
    fsdp_modes = [m for m in args.fsdp_modes.split(",") if m]
    topk_data = add_topk(data, teacher, work / "data-topk", args.topk, args.device) \
        if "kd_offline" in modes + fsdp_modes else None
    setup_s = time.perf_counter() - t0

    results: dict[str, dict] = {}
    for strategy, todo in (("single", modes), ("fsdp", fsdp_modes)):
        for mode in todo:
            row = train(teacher, student, topk_data if mode == "kd_offline" else data, mode, strategy, args, work)
            results.setdefault(strategy, {})[mode] = row
            print(f"[distill_gpu] {strategy} {mode}: {row}", flush=True)
    out = {
        "benchmark": "distill_gpu", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "student_params": count_params(load_model(student)),
        "teacher_params": count_params(load_model(teacher)), "layers": args.layers,
        "teacher_layers": args.teacher_layers, "hidden": args.hidden, "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
        "tokens_per_step": args.batch_size * args.seq_len, "steps": args.steps, "warmup_dropped": args.warmup,
        "topk": args.topk, "setup_s": round(setup_s, 1), "modes": results.get("single", {}),
        "fsdp": {"world_size": args.nproc, "modes": results.get("fsdp", {})}, "python": platform.python_version(),
    }
    write_result(args.name, out, indent=2)


if __name__ == "__main__":
    main()
