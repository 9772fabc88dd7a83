"""Calibration: a few hundred token rows from a dataset or a text file, and a model's loss on them.

Scoring (importance) and pruning (the budget proxy) both measure on calibration ids; this is where they get
them and where the loss is defined, so the two stages agree without importing each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.datasets import pack, read_text
from compactlm.formats.generated import iter_examples

if TYPE_CHECKING:
    import torch


def calibration_ids(source: str | os.PathLike, tokenizer, *, num_samples: int, seq_len: int, seed: int = 0,
                    text_field: str = "text") -> torch.Tensor:
    """[num_samples, seq_len] token ids for calibration: from a generated dataset dir or a text file.

    Fewer rows come back when the source is too small; at least one row is required.
    """
    source = Path(source)
    if source.is_dir():
        examples = list(iter_examples(source))
    else:
        eos = tokenizer.eos_token_id
        examples = []
        for doc in read_text(source, text_field):
            toks = tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
            examples.append((toks, [1] * len(toks)))
    ids, _ = pack(examples, seq_len, seed=seed)
    return ids[:num_samples]


def batches(input_ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, input_ids.shape[0], batch_size):
        yield input_ids[i:i + batch_size]


def lm_loss_sums(model, batch: torch.Tensor) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) for one batch; row by row to bound memory."""
    import torch.nn.functional as F

    logits = model(input_ids=batch, use_cache=False).logits
    total = 0.0
    for r in range(batch.shape[0]):
        total += F.cross_entropy(logits[r, :-1].float(), batch[r, 1:], reduction="sum").item()
    return total, batch.shape[0] * (batch.shape[1] - 1)


def calibration_loss(model, input_ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of `model` on `input_ids` [N, L] (no hooks added)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(input_ids, batch_size):
            s, c = lm_loss_sums(model, batch.to(device))
            total, count = total + s, count + c
    return total / count
