"""Quality filters for generated completions and written instructions: exact and MinHash near-duplicates,
length, truncation, degenerate repetition.

Every filter is a pure function of the text/tokens plus the state of the *kept* items before it, and items are
always visited in (prompt_id, sample) order. Rebuilding the state from finished shards (``remember``) in the same
order therefore reproduces the uninterrupted run exactly: filtering is deterministic under resume. MinHash uses
a fixed permutation seed, so its signatures (and the LSH buckets) do not depend on the process or the run seed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compactlm.config import FilterConfig

#: Drop reasons of the completion filter, in the order they are checked (the manifest's stats.dropped keys).
DROP_FILTERS = ("empty", "truncated", "min_tokens", "max_tokens", "repetition", "duplicate", "near_duplicate")
MINHASH_SEED = 1
SHINGLE_WORDS = 3
_WORD = re.compile(r"\w+", re.UNICODE)


def normalize_text(text: str) -> str:
    """Exact-dedup key text: case-folded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def dedup_key(text: str) -> str:
    return hashlib.sha1(normalize_text(text).encode()).hexdigest()


def shingles(text: str, n: int = SHINGLE_WORDS) -> set[str]:
    """Word n-grams of the case-folded text (the whole text when shorter than n words; empty for no words)."""
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def repetition_ratio(token_ids: Iterable[int], n: int) -> float:
    """Share of repeated n-grams, ``1 - unique/total`` (0 for fewer than n tokens). A loop scores near 1."""
    ids = list(token_ids)
    total = len(ids) - n + 1
    if total <= 0:
        return 0.0
    return 1.0 - len({tuple(ids[i:i + n]) for i in range(total)}) / total


class NearDupIndex:
    """MinHash LSH over word shingles: is a text a near-duplicate (estimated Jaccard >= threshold) of one added?

    LSH proposes candidates; each is confirmed with the MinHash Jaccard estimate, so the rule is
    ``max_j est_jaccard(text, kept_j) >= threshold`` up to LSH recall (which is ~1 near the threshold's
    far side with datasketch's optimal banding). Texts without words are never near-duplicates.
    """

    def __init__(self, threshold: float, num_perm: int = 128):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        # threshold 1.0 is exact-match only; datasketch needs a band layout, which (0, 1) thresholds give.
        self.lsh = MinHashLSH(threshold=min(threshold, 0.99), num_perm=num_perm)
        self._sigs: dict[str, object] = {}

    def _minhash(self, text: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=MINHASH_SEED)
        sh = shingles(text)
        if sh:
            m.update_batch([s.encode() for s in sorted(sh)])
        return m, bool(sh)

    def is_duplicate(self, text: str, *, add: bool = True) -> bool:
        """True if `text` is a near-duplicate of an added text; otherwise add it (when `add`) and return False."""
        m, has_words = self._minhash(text)
        if not has_words:
            return False
        for key in self.lsh.query(m):
            if m.jaccard(self._sigs[key]) >= self.threshold:
                return True
        if add:
            self.add_minhash(m)
        return False

    def add(self, text: str) -> None:
        m, has_words = self._minhash(text)
        if has_words:
            self.add_minhash(m)

    def add_minhash(self, m) -> None:
        key = str(len(self._sigs))
        self.lsh.insert(key, m)
        self._sigs[key] = m

    def __len__(self) -> int:
        return len(self._sigs)


class CompletionFilter:
    """Decides, in (prompt_id, sample) order, which completions to keep; counts nothing itself.

    Checks, in order: empty text, truncated (finish_reason 'length', when `drop_truncated`), fewer than
    `min_tokens` / more than `max_completion_tokens` tokens (EOS excluded), degenerate repetition, exact
    duplicate, MinHash near-duplicate of an earlier kept completion.
    """

    def __init__(self, cfg: FilterConfig, eos: set[int]):
        self.cfg, self.eos = cfg, eos
        self.seen: set[str] = set()
        self.near = NearDupIndex(cfg.near_dup_threshold, cfg.minhash_num_perm) if cfg.near_dup_threshold else None

    def remember(self, text: str) -> None:
        """Add a kept completion (from a finished shard) to the dedup state without checking it."""
        if self.cfg.dedup:
            self.seen.add(dedup_key(text))
        if self.near is not None:
            self.near.add(text)

    def reason(self, text: str, token_ids: list[int], finish_reason: str = "stop") -> str | None:
        """The filter that drops this completion, or None to keep it (it is then remembered for dedup)."""
        cfg = self.cfg
        if not text.strip():
            return "empty"
        if cfg.drop_truncated and finish_reason == "length":
            return "truncated"
        n = len(token_ids) - (1 if token_ids and token_ids[-1] in self.eos else 0)
        if n < cfg.min_tokens:
            return "min_tokens"
        if cfg.max_completion_tokens is not None and n > cfg.max_completion_tokens:
            return "max_tokens"
        if cfg.max_repetition is not None and \
                repetition_ratio(token_ids[:n], cfg.repetition_ngram) > cfg.max_repetition:
            return "repetition"
        key = dedup_key(text) if cfg.dedup else None
        if key is not None and key in self.seen:
            return "duplicate"
        if self.near is not None and self.near.is_duplicate(text):
            return "near_duplicate"
        if key is not None:
            self.seen.add(key)
        return None
