"""Training text: packing token examples into fixed-length rows, reading plain-text corpora, and converting a
corpus into the generated-dataset format (:mod:`compactlm.formats.generated`, which owns that format).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, *, seed: int = 0,
         drop_last: bool = True):
    """Shuffle examples (seeded), concatenate them, and cut fixed-length rows.

    Returns (input_ids, loss_mask) as LongTensors of shape [rows, seq_len]. With drop_last=False the tail
    is padded with token 0 and mask 0.
    """
    import torch

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    mask: list[int] = []
    for i in order:
        ids.extend(examples[i][0])
        mask.extend(examples[i][1])
    rows = len(ids) // seq_len
    if not drop_last and len(ids) % seq_len:
        pad = seq_len - len(ids) % seq_len
        ids.extend([0] * pad)
        mask.extend([0] * pad)
        rows += 1
    if rows == 0:
        raise ValueError(f"not enough tokens ({len(ids)}) for one sequence of {seq_len}; "
                         "generate more data or lower seq_len")
    n = rows * seq_len
    return (torch.tensor(ids[:n], dtype=torch.long).view(rows, seq_len),
            torch.tensor(mask[:n], dtype=torch.long).view(rows, seq_len))


def read_text(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents from a .txt file (blank-line separated paragraphs) or a .jsonl file (one field per line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    obj = json.loads(line)
                    if text_field not in obj:
                        raise KeyError(f"{path}:{n} has no field {text_field!r} (set text_field)")
                    docs.append(str(obj[text_field]))
        return docs
    return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]


def corpus_dataset(source: str | os.PathLike, tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   max_tokens: int, seed: int = 0, text_field: str = "text", doc_tokens: int = 1024) -> dict:
    """Write a plain-text corpus as a dataset in the generated format, for CE fine-tuning on classic text.

    Documents come from :func:`read_text` (blank-line separated paragraphs of a .txt file, or `text_field` of
    each .jsonl line). They are visited in a seeded random order, tokenized with the tokenizer in
    `tokenizer_dir` (EOS appended) and cut into rows of at most `doc_tokens` tokens until `max_tokens` tokens are
    taken. Each row has an empty prompt and the text as its completion, so every token counts in the loss and
    :func:`compactlm.distillation.distill` with ``kd_weight=0`` is plain fine-tuning on the corpus (``kd_weight > 0``
    is logit KD on it). Published atomically (``data/shard-00000.parquet`` then ``manifest.json``); returns the
    manifest. Raises ValueError when `max_tokens` < 1 or the corpus has no text.
    """
    from compactlm.formats.generated import write_dataset
    from compactlm.models import load_tokenizer

    if max_tokens < 1 or doc_tokens < 1:
        raise ValueError(f"max_tokens ({max_tokens}) and doc_tokens ({doc_tokens}) must be >= 1")
    docs = read_text(source, text_field)
    if not docs:
        raise ValueError(f"{source} has no text (expected blank-line separated paragraphs or {text_field!r} rows)")
    tok = load_tokenizer(tokenizer_dir)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    rows: list[dict] = []
    taken = 0
    for i in order:
        ids = tok(docs[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for start in range(0, len(ids), doc_tokens):
            chunk = ids[start:start + doc_tokens][:max_tokens - taken]
            rows.append({"id": f"{i}-{start}", "prompt_id": i, "sample": start // doc_tokens, "prompt": "",
                         "prompt_text": "", "completion": tok.decode(chunk), "prompt_token_ids": [],
                         "completion_token_ids": chunk, "finish_reason": "length"})
            taken += len(chunk)
            if taken >= max_tokens:
                break
        if taken >= max_tokens:
            break
    manifest = {"stage": "corpus", "source": str(source), "tokenizer": str(tokenizer_dir), "seed": seed,
                "stats": {"rows": len(rows), "tokens": taken, "documents_available": len(docs)}}
    return write_dataset(out_dir, rows, manifest)
