"""Training data for distillation: a generated dataset packed into fixed-length rows, with top-k targets.

Packing follows :func:`compactlm.datasets.pack` exactly (same seeded example order, same cut), so online and
offline KD train on the same token rows. For offline KD the teacher's stored top-k ids / log-probs travel with
the tokens: ``topk_ids[r, j]`` / ``topk_logprobs[r, j]`` describe the teacher's distribution *of token*
``ids[r, j]`` (given the tokens before it), i.e. the generation contract's alignment with
``completion_token_ids``. Prompt positions have no targets (filler: id 0, log-prob 0) and mask 0. The logits at
position t predict token t + 1, so the trainer pairs ``logits[:, :-1]`` with ``topk_*[:, 1:]`` and ``mask[:, 1:]``.

Packed rows concatenate examples without attention resets (as in online KD): a completion may see the end of
the previous example as extra context, while the stored teacher log-probs were computed without it. This is
the usual packing approximation; the first tokens of each example are the ones affected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.datasets import pack
from compactlm.formats.generated import iter_tables, logit_targets, topk_width

if TYPE_CHECKING:
    import torch


@dataclass
class PackedData:
    """Training rows. ``topk_*`` are set for offline KD only; ``teacher_ids`` / ``align_*`` for a student with
    another tokenizer (:mod:`compactlm.distillation.crosstok`).

    ids: [rows, seq_len] int64; mask: [rows, seq_len] int64 (1 = completion token);
    topk_ids: [rows, seq_len, k] int32; topk_logprobs: [rows, seq_len, k] float16;
    teacher_ids: [rows, teacher_len] int64, the same text in the teacher's tokens;
    align_s / align_t: [rows, pairs] int64, student / teacher positions whose logits predict a token starting at
    the same character (-1 = padding).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    teacher_ids: torch.Tensor | None = None
    align_s: torch.Tensor | None = None
    align_t: torch.Tensor | None = None
    targets: str = "topk"  # what topk_* hold: "topk" or "sampled" (compactlm.formats.generated.logit_targets)

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])


def pack_with_topk(data_dir: str | os.PathLike, seq_len: int, *, seed: int = 0) -> PackedData:
    """Pack a generated dataset that holds ``topk_ids`` / ``topk_logprobs`` (see the module docstring).

    Raises ValueError when the columns are missing, ragged (a row whose top-k count differs from its
    completion length or whose k differs from the others) or when there is not enough data for one row.
    """
    import numpy as np
    import pyarrow.compute as pc
    import torch

    data_dir = Path(data_dir)
    k = topk_width(data_dir)
    if not k:
        raise ValueError(f"{data_dir} holds no top-k log-probs (columns topk_ids/topk_logprobs); regenerate it "
                         "with generate.topk_logprobs: k > 0, or use distill.mode: online")
    prompts, completions, top_ids, top_lps = [], [], [], []
    cols = ["prompt_token_ids", "completion_token_ids", "topk_ids", "topk_logprobs"]
    for shard, t in iter_tables(data_dir, cols):
        n_tok = pc.list_value_length(t.column("completion_token_ids")).to_numpy(zero_copy_only=False)
        n_top = pc.list_value_length(t.column("topk_ids")).to_numpy(zero_copy_only=False)
        if (n_tok != n_top).any():
            raise ValueError(f"{shard}: topk_ids rows must align with completion_token_ids (one [k] list per "
                             "completion token)")
        ids2 = pc.list_flatten(t.column("topk_ids"))
        lps2 = pc.list_flatten(t.column("topk_logprobs"))
        widths = pc.list_value_length(ids2).to_numpy(zero_copy_only=False)
        if len(widths) and ((widths != k).any() or
                            (pc.list_value_length(lps2).to_numpy(zero_copy_only=False) != k).any()):
            raise ValueError(f"{shard}: every topk_ids / topk_logprobs entry must hold k={k} values")
        top_ids.append(pc.list_flatten(ids2).to_numpy(zero_copy_only=False).astype(np.int32).reshape(-1, k))
        top_lps.append(pc.list_flatten(lps2).to_numpy(zero_copy_only=False).astype(np.float16).reshape(-1, k))
        prompts.extend(t.column("prompt_token_ids").to_pylist())
        completions.extend(t.column("completion_token_ids").to_pylist())

    # Flat layout in dataset order: example i = its prompt then its completion. comp_row maps a flat position
    # to its row in the flat top-k arrays (-1 for prompt positions).
    flat_ids: list[int] = []
    comp_row: list[int] = []
    index_examples: list[tuple[list[int], list[int]]] = []
    n_comp = 0
    for p, c in zip(prompts, completions):
        start = len(flat_ids)
        flat_ids.extend(p)
        flat_ids.extend(c)
        comp_row.extend([-1] * len(p))
        comp_row.extend(range(n_comp, n_comp + len(c)))
        n_comp += len(c)
        index_examples.append((list(range(start, len(flat_ids))), [0] * len(p) + [1] * len(c)))
    # pack() on position indices = the exact permutation/cut that pack() applies to the token examples
    index, mask = pack(index_examples, seq_len, seed=seed)
    ids = torch.tensor(flat_ids, dtype=torch.long)[index]
    rows = torch.tensor(comp_row, dtype=torch.long)[index].clamp_min(0)
    all_ids = torch.from_numpy(np.concatenate(top_ids)) if top_ids else torch.zeros(0, k, dtype=torch.int32)
    all_lps = torch.from_numpy(np.concatenate(top_lps)) if top_lps else torch.zeros(0, k, dtype=torch.float16)
    if all_ids.shape[0] == 0:
        raise ValueError(f"{data_dir} has no completion tokens")
    topk_ids, topk_lps = all_ids[rows], all_lps[rows]  # [rows, seq_len, k]
    filler = mask == 0
    topk_ids[filler] = 0
    topk_lps[filler] = 0.0
    return PackedData(ids, mask, topk_ids, topk_lps, targets=logit_targets(data_dir))


def pack_plain(examples: list[tuple[list[int], list[int]]], seq_len: int, *, seed: int = 0) -> PackedData:
    ids, mask = pack(examples, seq_len, seed=seed)
    return PackedData(ids, mask)


def row_stream(n_rows: int, seed: int) -> Iterator[tuple[int, int]]:
    """(epoch, row) forever: a fresh seeded permutation per epoch, so small datasets cycle deterministically."""
    import torch

    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        for row in torch.randperm(n_rows, generator=g).tolist():
            yield epoch, row
        epoch += 1
