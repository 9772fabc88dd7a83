"""Self-Instruct expansion: grow a few dozen seed prompts into many new instructions written by the teacher.

Pass 1 (writing): ``ceil(num_instructions * oversample)`` prompts, each showing `seeds_per_prompt` seed
instructions drawn with ``random.Random("compactlm-self-instruct:<seed>:<i>")`` (so prompt i depends only on the
run seed and i), asking for one new instruction. In chat mode the request is a user message; without a chat
template it is a numbered list the model continues. The completions are stored like any generated shard
(under ``self_instruct/``), so pass 1 resumes shard by shard.

Selection (pure, deterministic): each completion is parsed into one instruction (numbering, "Task:" labels and
quotes stripped, cut at the first blank line or next list item, whitespace collapsed) and checked in prompt
order: empty, too few / many words, not an instruction (starts with a non-alphanumeric character or is mostly
symbols/digits), a blocked word (a task a text model cannot do: images, files, ...), an exact or MinHash
near-duplicate of a seed or an earlier kept instruction, too long for the context. The first
`num_instructions` survivors are kept; pass 2 answers them (after the seeds when ``include_seeds``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from compactlm.generation.filters import NearDupIndex, dedup_key

if TYPE_CHECKING:
    from compactlm.config import SelfInstructConfig

REJECT_REASONS = ("empty", "too_short", "too_long", "not_instruction", "blocked_word", "duplicate",
                  "near_duplicate", "too_long_for_context")

CHAT_REQUEST = ("You are asked to come up with a new task instruction for an AI assistant. Here are some "
                "examples:\n\n{examples}\n\nWrite one new instruction that is different from the examples. "
                "Reply with the instruction only.")
LIST_HEADER = "Here is a list of diverse task instructions:\n\n{examples}\n{next}."

_NUMBERING = re.compile(r"^\s*(?:\d+\s*[.):\-]|[-*•])\s*")
_LABEL = re.compile(r"^\s*(?:new\s+)?(?:task|instruction)(?:\s*\d+)?\s*[:.\-]\s*", re.IGNORECASE)
_NEXT_ITEM = re.compile(r"\n\s*\n|\n\s*\d+\s*[.)]\s")


def num_candidates(cfg: SelfInstructConfig) -> int:
    """How many instruction-writing requests pass 1 makes."""
    return math.ceil(cfg.num_instructions * cfg.oversample)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def writing_prompts(seeds: list[str], cfg: SelfInstructConfig, *, chat: bool, seed: int) -> list[str]:
    """The raw (pre-chat-template) instruction-writing prompts of pass 1, one per candidate."""
    if not seeds:
        raise ValueError("self-instruct needs at least one seed prompt")
    k = min(cfg.seeds_per_prompt, len(seeds))
    prompts = []
    for i in range(num_candidates(cfg)):
        rng = random.Random(f"compactlm-self-instruct:{seed}:{i}")  # str seeds hash with sha512: stable
        examples = [_one_line(s) for s in rng.sample(seeds, k)]
        listing = "\n".join(f"{j + 1}. {e}" for j, e in enumerate(examples))
        prompts.append(CHAT_REQUEST.format(examples=listing) if chat
                       else LIST_HEADER.format(examples=listing, next=k + 1))
    return prompts


def parse_instruction(completion: str) -> str:
    """The one instruction a completion holds: the first item, without numbering, labels or quotes."""
    text = completion.strip()
    text = _NEXT_ITEM.split(text, maxsplit=1)[0]
    for _ in range(2):  # "4. Task: ..." has both
        text = _NUMBERING.sub("", text, count=1)
        text = _LABEL.sub("", text, count=1)
    text = _one_line(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def _reject(text: str, cfg: SelfInstructConfig, blocked: re.Pattern | None) -> str | None:
    if not text:
        return "empty"
    words = text.split()
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    visible = [c for c in text if not c.isspace()]
    if not text[0].isalnum() or sum(c.isalpha() for c in visible) < 0.6 * len(visible):
        return "not_instruction"
    if blocked is not None and blocked.search(text):
        return "blocked_word"
    return None


def select_instructions(completions: list[str], seeds: list[str], cfg: SelfInstructConfig,
                        fits: Callable[[str], bool] | None = None) -> tuple[list[str], dict]:
    """Parse and filter the candidates in order; keep the first `num_instructions` survivors.

    `fits(instruction)` says whether its answer fits the context (False -> 'too_long_for_context').
    Returns (instructions, stats) with stats ``{candidates, kept, surplus, rejected: {reason: n}}``; surplus
    counts the candidates left unexamined once `num_instructions` were kept.
    """
    blocked = (re.compile(r"\b(?:" + "|".join(re.escape(w) for w in cfg.blocked_words) + r")\b", re.IGNORECASE)
               if cfg.blocked_words else None)
    seen = {dedup_key(s) for s in seeds}
    near = NearDupIndex(cfg.near_dup_threshold)
    for s in seeds:
        near.add(s)
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    kept: list[str] = []
    examined = 0
    for completion in completions:
        if len(kept) >= cfg.num_instructions:
            break
        examined += 1
        text = parse_instruction(completion)
        why = _reject(text, cfg, blocked)
        if why is None and dedup_key(text) in seen:
            why = "duplicate"
        if why is None and near.is_duplicate(text, add=False):
            why = "near_duplicate"
        if why is None and fits is not None and not fits(text):
            why = "too_long_for_context"
        if why is not None:
            rejected[why] += 1
            continue
        kept.append(text)
        seen.add(dedup_key(text))
        near.add(text)
    return kept, {"candidates": len(completions), "kept": len(kept), "surplus": len(completions) - examined,
                  "rejected": rejected}
