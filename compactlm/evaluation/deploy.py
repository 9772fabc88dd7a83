"""Deployment speed of one model as it would be served: decode tokens/s at batch 1 and at a batch, prompt-processing
tokens/s and the serving process's peak memory (VmHWM), for a GGUF file (llama.cpp), an HF directory (transformers) or
a vLLM directory.

Each measurement runs in a child process of its own (``python -m compactlm.evaluation.deploy``), so the peak RSS
(the whole process, runtime and weights included) belongs to that model alone and no engine
outlives it. The work is the same for every format: a prompt of `prompt_tokens` tokens of the shipped held-out
text (tokenized by the model's own tokenizer), then `decode_tokens` greedy tokens one at a time (end-of-text
ignored). At a batch, `batch` copies of that prompt decode together, each step one token per sequence (llama.cpp: one
context holding `batch` sequences that share the prompt's KV cells; transformers: a batch of rows; vLLM: `batch`
requests). One short warm-up, then the best of `repeats` timed rounds (damps other processes on a shared CPU).
prompt tok/s = prompt tokens / prefill seconds; decode tok/s = decode tokens (x batch) / seconds of the decode steps.
vLLM runs in-process (no engine-core process), eager, prefix caching off, its OpenMP threads on the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FORMATS = ("gguf", "hf", "vllm")
HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout.txt"


def prompt_ids(encode, n: int) -> list[int]:
    """The first `n` tokens of the held-out text (repeated when shorter), tokenized by `encode`."""
    ids = list(encode(HELDOUT.read_text()))
    if not ids:
        raise ValueError("the held-out text tokenized to nothing")
    return (ids * (n // len(ids) + 1))[:n]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gguf_batch_decode(llm, ids: list[int], n_decode: int, batch: int, repeats: int = 1) -> tuple[float, list]:
    """(best seconds, the last round's tokens per sequence) of `n_decode` greedy steps of `batch` sequences decoded
    together in one llama.cpp context on `llm`'s model (the prompt `ids` evaluated once, its KV cells shared)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import _internals

    from compactlm.evaluation.llamacpp import N_BATCH

    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    params.n_seq_max, params.kv_unified = batch, True
    params.n_ctx = len(ids) + batch * (n_decode + 1) + 16
    ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    b = _internals.LlamaBatch(n_tokens=max(N_BATCH, batch), embd=0, n_seq_max=batch, verbose=False)
    n_vocab, best, out = llm.n_vocab(), float("inf"), []
    try:
        for _ in range(repeats):
            ctx.kv_cache_clear()
            for i in range(0, len(ids), N_BATCH):
                b.set_batch(batch=ids[i:i + N_BATCH], n_past=i, logits_all=False)
                ctx.decode(b)
            toks = [int(np.ctypeslib.as_array(ctx.get_logits(), shape=(1, n_vocab)).argmax())] * batch
            for seq in range(1, batch):
                ctx.kv_cache_seq_cp(0, seq, 0, len(ids))
            t0, out = time.perf_counter(), [toks]
            for step in range(n_decode):
                b.batch.n_tokens = batch
                for seq, tok in enumerate(toks):
                    b.batch.token[seq], b.batch.pos[seq], b.batch.logits[seq] = tok, len(ids) + step, True
                    b.batch.seq_id[seq][0], b.batch.n_seq_id[seq] = seq, 1
                ctx.decode(b)
                toks = np.ctypeslib.as_array(ctx.get_logits(), shape=(batch, n_vocab)).argmax(1).tolist()
                out.append(toks)
            best = min(best, time.perf_counter() - t0)
    finally:
        b.close()
        ctx.close()
    return best, [list(seq) for seq in zip(*out)]


def _gguf(path: str, n_prompt: int, n_decode: int, threads: int, repeats: int, dtype: str | None,
          batch: int) -> dict:
    from compactlm.evaluation.llamacpp import GgufRunner, load_gguf

    runner = GgufRunner(load_gguf(path, n_ctx=n_prompt + n_decode + 8, threads=threads))
    ids = prompt_ids(lambda t: runner.llm.tokenize(t.encode(), add_bos=False, special=False), n_prompt)
    runner.greedy(ids[:16], 2)  # warm-up
    best_p, best_d = float("inf"), float("inf")
    for _ in range(repeats):
        best_p = min(best_p, _timed(lambda: runner.prefill(ids)))
        tok = runner.next_token()

        def decode(tok=tok) -> None:
            for _ in range(n_decode):
                runner.step(tok)
                tok = runner.next_token()

        best_d = min(best_d, _timed(decode))
    batched = gguf_batch_decode(runner.llm, ids, n_decode, batch, repeats)[0] if batch > 1 else None
    return {"engine": "llama.cpp", "prefill_s": best_p, "decode_s": best_d, "decode_s_batch": batched}


def _hf(path: str, n_prompt: int, n_decode: int, threads: int, repeats: int, dtype: str | None,
        batch: int) -> dict:
    import torch

    from compactlm.models import load_model, load_tokenizer

    torch.set_num_threads(threads)
    model, tok = load_model(path, dtype=dtype or "float32"), load_tokenizer(path)
    ids = torch.tensor([prompt_ids(lambda t: tok(t, add_special_tokens=False)["input_ids"], n_prompt)])

    def run(prompt, steps: int) -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            t1 = time.perf_counter()
            for _ in range(steps):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            return t1 - t0, time.perf_counter() - t1

    run(ids[:, :16], 2)  # warm-up
    times = [run(ids, n_decode) for _ in range(repeats)]
    batched = min(run(ids.repeat(batch, 1), n_decode)[1] for _ in range(repeats)) if batch > 1 else None
    return {"engine": "transformers", "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "prefill_s": min(t[0] for t in times), "decode_s": min(t[1] for t in times), "decode_s_batch": batched}


def _vllm(path: str, n_prompt: int, n_decode: int, threads: int, repeats: int, dtype: str | None,
          batch: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=path, dtype=dtype or "auto", enforce_eager=True, max_model_len=n_prompt + n_decode + 16,
              enable_prefix_caching=False, distributed_executor_backend="uni", trust_remote_code=False, seed=0)
    tok = llm.get_tokenizer()
    prompt = TokensPrompt(prompt_token_ids=prompt_ids(lambda t: tok(t, add_special_tokens=False)["input_ids"],
                                                      n_prompt))

    def gen(n: int, rows: int = 1) -> float:
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
        return _timed(lambda: llm.generate([prompt] * rows, params, use_tqdm=False))

    gen(2)  # warm-up
    prefill = min(gen(1) for _ in range(repeats))
    total = min(gen(n_decode + 1) for _ in range(repeats))
    batched = None
    if batch > 1:  # decode seconds at the batch: (batch prompts, n_decode + 1 tokens) - (batch prompts, 1 token)
        whole = min(gen(n_decode + 1, batch) for _ in range(repeats))
        batched = max(whole - min(gen(1, batch) for _ in range(repeats)), 1e-9)
    llm.llm_engine.engine_core.shutdown()
    return {"engine": "vllm", "dtype": dtype or "auto", "prefill_s": prefill, "decode_s": max(total - prefill, 1e-9),
            "decode_s_batch": batched}


def _cpu_list(threads: int) -> str:
    from compactlm.runtime import affinity_cores

    return ",".join(str(c) for c in affinity_cores()[:threads])


def measure_in_process(path: str, fmt: str, *, prompt_tokens: int = 256, decode_tokens: int = 64,
                       threads: int | None = None, repeats: int = 2, dtype: str | None = None,
                       batch: int = 8) -> dict[str, Any]:
    """The measurement itself (what the child runs); peak RSS is this process's."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    threads = threads or len(_cpu_list(os.cpu_count() or 1).split(","))
    t0 = time.perf_counter()
    fn = {"gguf": _gguf, "hf": _hf, "vllm": _vllm}[fmt]
    r = fn(str(path), prompt_tokens, decode_tokens, threads, repeats, dtype, batch)
    return {**r, "format": fmt, "threads": threads, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "repeats": repeats, "prompt_tok_s": prompt_tokens / r["prefill_s"],
            "decode_tok_s_b1": decode_tokens / r["decode_s"], "batch_size": batch if batch > 1 else None,
            "decode_tok_s_batch": batch * decode_tokens / r["decode_s_batch"] if r["decode_s_batch"] else None,
            "seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB): ``VmHWM`` of /proc/self/status, which starts afresh at exec.
    (``getrusage``'s ru_maxrss does not: Linux carries the parent's RSS at fork into the child's maximum, so a child
    of a 1.3 GB flow process would report >= 1.3 GB.) Falls back to ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str | os.PathLike, fmt: str, *, prompt_tokens: int = 256, decode_tokens: int = 64,
            threads: int | None = None, repeats: int = 2, dtype: str | None = None, batch: int = 8,
            timeout: float = 1800) -> dict[str, Any]:
    """:func:`measure_in_process` in a child process of its own; returns its dict::

        {"decode_tok_s_b1", "decode_tok_s_batch", "batch_size", "prompt_tok_s", "peak_rss_mib", "prefill_s",
         "decode_s", "decode_s_batch", "engine", "format", "threads", "prompt_tokens", "decode_tokens", "repeats",
         "seconds"}

    (``decode_tok_s_batch`` and ``batch_size`` are None with ``batch=1``.)
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    threads = threads or len(_cpu_list(os.cpu_count() or 1).split(","))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    if fmt == "vllm":
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND=_cpu_list(threads),
                   VLLM_CPU_NUM_OF_RESERVED_CPU="0", TORCH_COMPILE_DISABLE="1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="compactlm-deploy-") as tmp:
        out, log = Path(tmp) / "speed.json", Path(tmp) / "child.log"
        cmd = [sys.executable, "-m", "compactlm.evaluation.deploy", "--model", str(path), "--format", fmt,
               "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens), "--threads",
               str(threads), "--repeats", str(repeats), "--batch", str(batch), "--out", str(out)] \
            + (["--dtype", dtype] if dtype else [])
        with log.open("w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                                  cwd=str(Path(__file__).resolve().parents[2]))
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"speed of {path} ({fmt}) failed (exit {proc.returncode}); last output:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compactlm.evaluation.deploy", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a .gguf file (gguf) or a model directory (hf, vllm)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="sequences decoded together for the batch figure (1: none)")
    ap.add_argument("--dtype", default=None, help="hf / vllm weights dtype (default: float32 / the model's own)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    result = measure_in_process(a.model, a.format, prompt_tokens=a.prompt_tokens, decode_tokens=a.decode_tokens,
                                threads=a.threads, repeats=a.repeats, dtype=a.dtype, batch=a.batch)
    Path(a.out).write_text(json.dumps(result))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _mean_acc(result: dict[str, Any] | None) -> float | None:
    from compactlm.evaluation.report import main_metric

    tasks = (result or {}).get("tasks") or {}
    scores = [m[name] for m in tasks.values() if (name := main_metric(m)) is not None]
    return sum(scores) / len(scores) if scores else None


def deploy_rows(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (model label, format) of ``{label: {format: {"size_bytes", "eval", "speed"}}}`` (what the export
    stage records): ``{"model", "format", "size_mb", "decode_tok_s_b1", "decode_tok_s_batch", "batch_size",
    "prompt_tok_s", "peak_rss_mib", "word_ppl", "avg_acc", "ppl_ratio"}``; ``ppl_ratio`` = word perplexity / the
    same model's first format's (its full-precision row). Unmeasured values are None; 1 MB = 1e6 bytes."""
    rows = []
    for label, formats in results.items():
        base = None
        for fmt, r in formats.items():
            ppl = ((r.get("eval") or {}).get("perplexity") or {}).get("word_perplexity")
            base = base if base is not None else ppl
            speed = r.get("speed") or {}
            rows.append({"model": label, "format": fmt, "size_mb": r["size_bytes"] / 1e6,
                         "decode_tok_s_b1": speed.get("decode_tok_s_b1"),
                         "decode_tok_s_batch": speed.get("decode_tok_s_batch"), "batch_size": speed.get("batch_size"),
                         "prompt_tok_s": speed.get("prompt_tok_s"),
                         "peak_rss_mib": speed.get("peak_rss_mib"), "word_ppl": ppl,
                         "avg_acc": _mean_acc(r.get("eval")),
                         "ppl_ratio": ppl / base if ppl is not None and base else None})
    return rows


def deploy_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`deploy_rows` (— where a value was not measured)."""
    batch = next((r["batch_size"] for r in rows if r.get("batch_size")), "n")
    cols = [("model", "model", "{}"), ("format", "format", "{}"), ("size_mb", "size MB", "{:.1f}"),
            ("decode_tok_s_b1", "decode tok/s (batch 1) ↑", "{:.1f}"),
            ("decode_tok_s_batch", f"decode tok/s (batch {batch}) ↑", "{:.1f}"),
            ("prompt_tok_s", "prompt tok/s ↑", "{:.0f}"),
            ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("word_ppl", "word ppl ↓", "{:.2f}"),
            ("avg_acc", "avg acc", "{:.3f}"), ("ppl_ratio", "ppl vs full precision", "{:.3f}")]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for row in rows:
        cells = [("—" if row.get(k) is None else f.format(row[k])) for k, _, f in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
