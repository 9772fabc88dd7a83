"""Training rows for a student whose tokenizer differs from the teacher's: the same text in both tokenizations,
and the positions where the two next-token distributions can be compared.

Each example (one row of a generated dataset) becomes one row, not packed: the student reads its own formatting
of the prompt (its chat template when the teacher's prompt was chat-formatted) and the completion in its tokens;
the teacher reads exactly the prompt it was given and the completion re-tokenized with its tokenizer. A
student position is paired with a teacher position when the tokens they predict start at the same character
of the completion (the first non-space character of each token's span, since byte-level tokenizers differ in
whether a token carries its leading space). Pairs are where :func:`~compactlm.distillation.losses.uld_loss`
compares the two distributions; everywhere else the student learns from the data alone (cross-entropy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from compactlm.distillation.data import PackedData


def student_prompt_ids(row: dict, tokenizer) -> list[int]:
    """The student's own formatting of a row's prompt: its chat template when the teacher's prompt was
    chat-formatted (and the student has one), else the prompt text as the teacher saw it."""
    prompt, formatted = row.get("prompt") or "", row.get("prompt_text") or ""
    if prompt and formatted != prompt and getattr(tokenizer, "chat_template", None):
        formatted = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=False)
    return tokenizer(formatted, add_special_tokens=False)["input_ids"] if formatted else []


def token_starts(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """(ids, start) of `text`'s tokens: start = the first non-space character of each token's span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = []
    for a, b in enc["offset_mapping"]:
        while a < b and text[a].isspace():
            a += 1
        starts.append(a)
    return list(enc["input_ids"]), starts


def aligned_positions(s_prompt: int, s_starts: list[int], t_prompt: int, t_starts: list[int]) -> list[tuple[int, int]]:
    """(student position, teacher position) pairs whose logits predict completion tokens that start at the same
    character (the logits at position p predict token p + 1). The first completion token of an example without a
    prompt has no predicting position and is skipped."""
    teacher_at: dict[int, int] = {}
    for k, c in enumerate(t_starts):
        teacher_at.setdefault(c, k)
    pairs = []
    for j, c in enumerate(s_starts):
        k = teacher_at.get(c)
        if k is not None and s_prompt + j >= 1 and t_prompt + k >= 1:
            pairs.append((s_prompt + j - 1, t_prompt + k - 1))
    return pairs


def _example(row: dict, s_tok, t_tok, seq_len: int, t_len: int):
    """(student ids, student mask, teacher ids, pairs) of one row, truncated to the row lengths."""
    text = row["completion"]
    stop = row.get("finish_reason") == "stop"
    s_prompt = student_prompt_ids(row, s_tok)
    s_comp, s_starts = token_starts(text, s_tok)
    t_comp, t_starts = token_starts(text, t_tok)
    if stop:  # EOS is predicted at the end of the text by both
        s_comp, s_starts = s_comp + [s_tok.eos_token_id], s_starts + [len(text)]
        t_comp, t_starts = t_comp + [t_tok.eos_token_id], t_starts + [len(text)]
    t_prompt = list(row["prompt_token_ids"])
    s_ids, t_ids = (s_prompt + s_comp)[:seq_len], (t_prompt + t_comp)[:t_len]
    mask = ([0] * len(s_prompt) + [1] * len(s_comp))[:seq_len]
    pairs = [(a, b) for a, b in aligned_positions(len(s_prompt), s_starts, len(t_prompt), t_starts)
             if a + 1 < len(s_ids) and b + 1 < len(t_ids)]
    return s_ids, mask, t_ids, pairs


def cross_tokenizer_rows(rows: list[dict], s_tok, t_tok, seq_len: int, *, teacher_len: int | None = None,
                         seed: int = 0) -> PackedData:
    """One training row per example (see the module docstring), in a seeded order; rows left without a loss token
    after truncation are dropped. Raises ValueError when none is left."""
    import random

    import torch

    from compactlm.distillation.data import PackedData

    t_len = teacher_len or 2 * seq_len
    examples = [e for e in (_example(r, s_tok, t_tok, seq_len, t_len) for r in rows) if sum(e[1][1:]) > 0]
    if not examples:
        raise ValueError(f"no example keeps a completion token within {seq_len} student tokens; raise seq_len")
    random.Random(seed).shuffle(examples)
    n, width = len(examples), max(len(e[3]) for e in examples) or 1
    ids, mask = torch.zeros(n, seq_len, dtype=torch.long), torch.zeros(n, seq_len, dtype=torch.long)
    t_ids = torch.zeros(n, t_len, dtype=torch.long)
    align_s, align_t = torch.full((n, width), -1, dtype=torch.long), torch.full((n, width), -1, dtype=torch.long)
    for i, (s, m, t, pairs) in enumerate(examples):
        ids[i, :len(s)], mask[i, :len(m)], t_ids[i, :len(t)] = torch.tensor(s), torch.tensor(m), torch.tensor(t)
        if pairs:
            align_s[i, :len(pairs)] = torch.tensor([a for a, _ in pairs])
            align_t[i, :len(pairs)] = torch.tensor([b for _, b in pairs])
    return PackedData(ids, mask, teacher_ids=t_ids, align_s=align_s, align_t=align_t)


def gather_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [b, T, V] at positions [b, M] (-1 = padding, gathers position 0) -> [b, M, V]."""
    idx = positions.clamp_min(0)
    return logits.gather(1, idx[..., None].expand(-1, -1, logits.shape[-1]))
