"""Training data as a mixture: the generated set, plain-text corpora and instruction data, mixed by tokens.

Each source gets ``weight / sum(weights)`` of ``tokens`` (all tokens of a row: prompt and completion). Rows are
taken from each source in a seeded random order, whole (a text document is cut into pieces of at most
``doc_tokens`` first), until the source's share is reached; a source with fewer tokens than its share is read
again in a new order (its ``epochs`` in the manifest). The result is one dataset in the generated format
(:mod:`compactlm.formats.generated`) with a ``source`` column, published atomically, the same for the same inputs
and seed, so distillation and its resume see the same rows and batches.

* ``generated``: the generate stage's rows as they are (prompt, the teacher's completion).
* ``text``: each document (a blank-line separated paragraph of a .txt file, or ``text_field`` of a record) is
  tokenized with the teacher's tokenizer, EOS appended, cut into pieces; empty prompt, every token in the loss.
* ``instructions``: ``prompt_field`` (plus ``input_field``) in the teacher's chat format as the prompt,
  ``response_field`` + EOS as the completion, as if the teacher had written it.

Offline KD needs the teacher's top-k log-probs of every row: they are kept when every source is the generated set
with stored top-k; a mixture with other sources has none (distill.mode: offline then says so before training;
online KD computes the teacher's distribution on any text).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from compactlm.config import DataConfig, DataSource
from compactlm.datasets import read_text
from compactlm.formats import generated as fmt
from compactlm.records import read_file_records, read_hf_records


def _records(src: DataSource, where: str) -> list[dict]:
    if src.path.startswith("hf:"):
        return read_hf_records(src.path, src.split, src.subset, None, field=f"{where}.path",
                               split_field=f"{where}.split", alternatives="or a .txt file")
    return read_file_records(Path(src.path).expanduser(), f"{where}.path")


def _field(record: dict, name: str, where: str, n: int, what: str) -> str:
    if name not in record or record[name] is None:
        raise ValueError(f"{where}.{what}: row {n} of {where}.path has no field {name!r}; its fields are "
                         f"{sorted(map(str, record))} (set {where}.{what})")
    return str(record[name])


def _documents(src: DataSource, where: str) -> list[str]:
    p = Path(src.path).expanduser()
    if not src.path.startswith("hf:") and p.suffix.lower() == ".txt":
        return read_text(p)
    return [_field(r, src.text_field, where, n, "text_field") for n, r in enumerate(_records(src, where))]


def _text_pieces(doc: str, tok, doc_tokens: int, key: str) -> list[dict]:
    ids = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [{"id": f"{key}-{i}", "prompt": "", "prompt_text": "", "prompt_token_ids": [],
             "completion": tok.decode(ids[i:i + doc_tokens], skip_special_tokens=True),
             "completion_token_ids": ids[i:i + doc_tokens], "finish_reason": "length"}
            for i in range(0, len(ids), doc_tokens)]


def _instruction(record: dict, src: DataSource, tok, where: str, n: int) -> dict:
    prompt = _field(record, src.prompt_field, where, n, "prompt_field")
    if src.input_field and record.get(src.input_field):
        prompt = f"{prompt}\n\n{record[src.input_field]}"
    response = _field(record, src.response_field, where, n, "response_field")
    text = (tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
            if getattr(tok, "chat_template", None) else prompt)
    p_ids = tok(text, add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"]
    c_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return {"id": str(n), "prompt": prompt, "prompt_text": text, "prompt_token_ids": p_ids, "completion": response,
            "completion_token_ids": c_ids, "finish_reason": "stop"}


def _units(src: DataSource, where: str, generated_dir: Path | None) -> list:
    """What a source is made of before tokenization: generated rows, documents, or instruction records."""
    if src.kind == "generated":
        if generated_dir is None:
            raise ValueError(f"{where} is the generated set but no generated dataset was given")
        return fmt.read_rows(generated_dir)
    units = _documents(src, where) if src.kind == "text" else _records(src, where)
    if not units:
        raise ValueError(f"{where}.path {src.path!r} has no {'text' if src.kind == 'text' else 'rows'}")
    if src.kind == "instructions":  # every row has its fields, before anything is tokenized
        for n, record in enumerate(units):
            _field(record, src.prompt_field, where, n, "prompt_field")
            _field(record, src.response_field, where, n, "response_field")
    return units


def _stream(src: DataSource, units: list, tok, doc_tokens: int, where: str, seed: int) -> Iterator[tuple[int, dict]]:
    """(epoch, row) forever: the source's units in a fresh seeded order per epoch, tokenized once."""
    cache: dict[int, list[dict]] = {}
    epoch = 0
    while True:
        order = list(range(len(units)))
        random.Random(f"{seed}:{where}:{epoch}").shuffle(order)
        for u in order:
            if u not in cache:
                if src.kind == "generated":
                    cache[u] = [units[u]]
                elif src.kind == "text":
                    cache[u] = _text_pieces(units[u], tok, doc_tokens, str(u))
                else:
                    cache[u] = [_instruction(units[u], src, tok, where, u)]
            for row in cache[u]:
                yield epoch, row
        epoch += 1


def _take(stream: Iterator[tuple[int, dict]], quota: int, label: str) -> tuple[list[dict], int, int]:
    """Rows from `stream` until `quota` tokens: (rows, tokens, epochs started)."""
    rows, tokens, epoch = [], 0, 0
    while tokens < quota:
        epoch, row = next(stream)
        n = len(row["prompt_token_ids"]) + len(row["completion_token_ids"])
        rows.append({**row, "id": f"{label}/{row['id']}-{len(rows)}", "prompt_id": len(rows), "sample": 0,
                     "source": label})
        tokens += n
    return rows, tokens, epoch + 1


def build_mixture(cfg: DataConfig, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tokens: int,
                  generated_dir: str | os.PathLike | None = None, seed: int = 0) -> dict[str, Any]:
    """Mix `cfg.sources` into `tokens` tokens (see the module docstring) and publish the dataset to `out_dir`.

    Returns the manifest: per source its requested and realised tokens and shares, rows and epochs. Bad input (a
    missing file or field, an unavailable dataset, all weights zero) raises ValueError before anything is written.
    """
    from compactlm.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    total_weight = sum(s.weight for s in cfg.sources)
    generated = Path(generated_dir) if generated_dir is not None else None
    units = [_units(s, f"data.sources[{i}]", generated) for i, s in enumerate(cfg.sources)]
    rows: list[dict] = []
    stats = []
    for i, (src, unit) in enumerate(zip(cfg.sources, units)):
        quota = round(tokens * src.weight / total_weight)
        label = f"{i}:{src.kind}"
        taken, n, epochs = _take(_stream(src, unit, tok, cfg.doc_tokens, f"data.sources[{i}]", seed), quota, label) \
            if quota > 0 else ([], 0, 0)
        rows += taken
        stats.append({"index": i, "kind": src.kind, "path": src.path, "label": label, "weight": src.weight,
                      "share_requested": src.weight / total_weight, "tokens_requested": quota, "tokens": n,
                      "rows": len(taken), "epochs": epochs})
    realised = sum(s["tokens"] for s in stats)
    for s in stats:
        s["share"] = s["tokens"] / realised if realised else 0.0
    topk = _kept_topk(cfg, generated)
    if not topk:
        for r in rows:
            r.pop("topk_ids", None)
            r.pop("topk_logprobs", None)
    manifest = {"stage": "data", "seed": seed, "tokens_requested": tokens, "tokens": realised, "sources": stats,
                "config": cfg.model_dump(mode="json"), "tokenizer": str(tokenizer_dir), "topk_logprobs": topk,
                "logit_targets": fmt.logit_targets(generated) if topk else None}
    return fmt.write_dataset(out_dir, rows, manifest, topk=topk, shard_rows=4096, source=True)


def _kept_topk(cfg: DataConfig, generated: Path | None) -> int:
    """k of the stored top-k log-probs when every source is the generated set with them, else 0."""
    if generated is None or any(s.kind != "generated" for s in cfg.sources):
        return 0
    return fmt.topk_width(generated)
