"""Multiple-choice scoring that runs each question's shared prefix once: lm-eval's ``HFLM`` with packed rows.

lm-eval scores a multiple-choice question as one (context, continuation) request per choice, and ``HFLM`` runs
each request as its own sequence, so the question's context is computed once per choice. :class:`SharedPrefixHFLM`
keeps lm-eval's tokenization (``TemplateLM.loglikelihood`` encodes and splits every pair exactly as before) and
replaces only how the encoded requests are scored (``_loglikelihood_tokens``):

1. the requests of one question (lm-eval's task name and doc id) form a group that shares the longest common
   prefix of its model inputs, up to the first scored position: the whole context when the choices continue one
   context (ARC, PIQA, HellaSwag), the sentence up to the blank for WinoGrande's partial scoring;
2. each question becomes one packed row (:func:`pack_group`): its prefix, then every choice's remaining tokens,
   each choice at the positions it has in its own sequence and under a 4D mask (:func:`packed_mask`) that lets it
   see the prefix and itself only; rows of similar lengths share a forward holding at most the tokens of
   ``batch_size`` whole sequences (:func:`split_sorted`), and only the scored positions go through the output head
   (``logits_to_keep``) and the log-softmax;
3. where a packed row cannot stand for the separate sequences (a sliding window shorter than the row's positions,
   an attention kernel that takes no custom mask), the prefixes run instead in forwards that keep their KV cache
   (left-padded, explicit positions; :func:`prefix_spans`, caches of ``4 x batch_size`` groups merged by
   :func:`merge_caches`) and each choice's remaining tokens run on its group's cache rows.

Every choice sees the same tokens at the same positions as in lm-eval's own path (including its left truncation
to ``max_length``), so log-likelihoods agree to float rounding. Requests that share nothing (a question with one
request, loglikelihood_rolling's perplexity windows) and seq2seq models go through ``HFLM``'s own code.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

#: What TemplateLM hands to ``_loglikelihood_tokens``: ((context, continuation), context tokens, continuation tokens)
Request = tuple[tuple[str, str], list[int], list[int]]


@dataclass
class PrefixGroup:
    """Requests scored from one shared prefix. For member ``k``: ``suffixes[k]`` are its input tokens after the
    prefix and ``starts[k]`` where its scored logits begin in ``[last prefix logit] + suffix logits``."""

    prefix: list[int]
    members: list[int]
    suffixes: list[list[int]]
    starts: list[int]


def model_input(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """The tokens HFLM feeds the model for one request: context + continuation, left-truncated to
    ``max_length + 1``, without the last token."""
    return (context + continuation)[-(max_length + 1):][:-1]


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first = seqs[0]
    for i in range(min(len(s) for s in seqs)):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return min(len(s) for s in seqs)


def plan_groups(requests: list[Request], keys: list, max_length: int) -> tuple[list[PrefixGroup], list[int]]:
    """Group requests by ``keys[i]`` (one key per request, e.g. (task, doc id)) and find each group's shared
    prefix; return the groups and the indices of requests that share nothing (one-request groups, no common
    prefix), longest prefix first."""
    by_key: dict = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    groups: list[PrefixGroup] = []
    alone: list[int] = []
    for members in by_key.values():
        inputs = [model_input(requests[i][1], requests[i][2], max_length) for i in members]
        firsts = [len(x) - len(requests[i][2]) for x, i in zip(inputs, members, strict=True)]
        p = min(_common_prefix_len(inputs), min(firsts) + 1)
        if len(members) < 2 or p < 1:
            alone += members
            continue
        groups.append(PrefixGroup(inputs[0][:p], members, [x[p:] for x in inputs], [f - p + 1 for f in firsts]))
    groups.sort(key=lambda g: (-len(g.prefix), -max(map(len, g.suffixes))))
    return groups, sorted(alone)


def split_sorted(lengths: list[int], max_rows: int | list[int], forward_cost: float) -> list[tuple[int, int]]:
    """Cut `lengths` (sorted longest first) into consecutive batches that minimise the padded tokens (rows x
    longest) plus `forward_cost` tokens per batch; a batch starting at ``i`` holds at most ``max_rows[i]`` rows
    (or `max_rows` rows when it is one number). Returns (start, end) pairs. Exact (dynamic programming over the
    cut points)."""
    n = len(lengths)
    if isinstance(max_rows, int):
        max_rows = [max_rows] * n
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(n):  # extend the best cut at i by every batch that may start there
        for j in range(i + 1, min(n, i + max(1, max_rows[i])) + 1):
            cost = best[i] + lengths[i] * (j - i) + forward_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    spans, j = [], n
    while j > 0:
        spans.append((cut[j], j))
        j = cut[j]
    return spans[::-1]


def prefix_spans(groups: list[PrefixGroup], batch_size: int, forward_cost: float) -> list[tuple[int, int]]:
    """Prefix forwards over `groups` (longest prefix first): batches of similar prefix lengths, each with at most
    the tokens of `batch_size` whole sequences (prefix + longest choice)."""
    lengths = [len(g.prefix) for g in groups]
    caps = [batch_size * (n + max(map(len, g.suffixes))) // n for n, g in zip(lengths, groups, strict=True)]
    return split_sorted(lengths, caps, forward_cost)


def pack_group(group: PrefixGroup) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """One row holding a question's prefix and then every choice's suffix: its tokens, their positions (each suffix
    continues the prefix's), segment ids (0 = prefix, k + 1 = member k's suffix) and, per member, the row indices of
    its scored logits (the prefix's last position, then its suffix, from ``starts[k]`` on)."""
    p = len(group.prefix)
    tokens, positions, segments = list(group.prefix), list(range(p)), [0] * p
    logit_rows = []
    for k, suffix in enumerate(group.suffixes):
        at = len(tokens)
        tokens += suffix
        positions += range(p, p + len(suffix))
        segments += [k + 1] * len(suffix)
        logit_rows.append(([p - 1] + list(range(at, at + len(suffix))))[group.starts[k]:])
    return tokens, positions, segments, logit_rows


def packed_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L], True where query ``i`` attends key ``j``: ``j <= i`` and ``j`` in the prefix (segment 0) or in
    ``i``'s own suffix. Padding (segment -1) attends only padding, so no row is empty."""
    n = segments.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    return (causal & ((key == 0) | (key == query)))[:, None]


def merge_caches(caches: list, masks: list[torch.Tensor]) -> tuple[object, torch.Tensor] | None:
    """One KV cache (and attention mask) holding the rows of all `caches`, each left-padded to the widest one
    (padding is masked, so it costs attention only, not a forward). None when a layer is not a plain dynamic layer
    or a sliding-window layer that still holds its whole prefix: then each cache is used on its own."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    width = max(m.shape[1] for m in masks)
    layers = []
    for parts in zip(*(c.layers for c in caches), strict=True):
        kind = type(parts[0])
        if any(type(p) is not kind for p in parts) or kind not in (DynamicLayer, DynamicSlidingWindowLayer):
            return None
        if kind is DynamicSlidingWindowLayer and width >= parts[0].sliding_window:
            return None  # the window already dropped prefix tokens: positions would no longer line up
        layer = copy.copy(parts[0])
        layer.keys, layer.values = (torch.cat([F.pad(getattr(p, name), (0, 0, width - getattr(p, name).shape[-2], 0))
                                               for p in parts]) for name in ("keys", "values"))
        if kind is DynamicSlidingWindowLayer:
            layer.cumulative_length = width
        layers.append(layer)
    out = copy.copy(caches[0])
    out.layers = layers
    return out, torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in masks])


def _select_rows(cache, rows: torch.Tensor):
    """A copy of `cache` holding batch rows `rows` (repeats allowed); `cache` itself is left as it was."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(rows)
    return out


class SharedPrefixHFLM(HFLM):
    """``HFLM`` that scores a question's choices from one forward of their shared prefix (module docstring).

    Same constructor as ``HFLM``. ``batch_size`` bounds the tokens of each forward: at most as many as that many whole
    sequences (prefix + choice) would have. With ``batch_size="auto"`` or a seq2seq model it scores exactly like
    ``HFLM``.
    """

    #: What one forward costs beyond its tokens, in tokens (reading every weight once: ~25 on a 2-core CPU with a
    #: 135M model, more on a GPU); it decides when splitting a batch to save padding pays off.
    FORWARD_COST = 32
    #: Groups (questions) whose choices are batched together, in units of batch_size: their prefix caches are kept
    #: at once, so that the choices can be sorted by length among many.
    POOL = 4

    _doc_keys: dict | None = None

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # TemplateLM.loglikelihood tokenizes and calls _loglikelihood_tokens with (context, continuation) strings:
        # remember which question each pair belongs to, so the token scorer can group the choices.
        self._doc_keys = {req.args: (req.task_name, req.doc_id) for req in requests}
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._doc_keys = None

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        doc_keys = self._doc_keys
        if doc_keys is None or self.backend != "causal" or not isinstance(self.batch_size, int):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        keys = [doc_keys.get(r[0], ("request", i)) for i, r in enumerate(requests)]
        groups, alone = plan_groups(requests, keys, int(self.max_length))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if alone:
            scored = super()._loglikelihood_tokens([requests[i] for i in alone], disable_tqdm=disable_tqdm,
                                                   override_bs=override_bs)
            for i, answer in zip(alone, scored, strict=True):
                results[i] = answer
        bar = tqdm(total=sum(len(g.members) for g in groups), disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (shared prefixes)")
        pool = self.POOL * max(1, int(self.batch_size))
        answers = self._score_packed(groups, requests) if self._packable(groups) else (
            answer for start in range(0, len(groups), pool)
            for answer in self._score_pool(groups[start:start + pool], requests))
        for i, answer in answers:
            results[i] = answer
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def _packable(self, groups: list[PrefixGroup]) -> bool:
        """Whether the questions can run packed (:meth:`_score_packed`): the model takes a custom 4D mask (SDPA or
        eager attention) and no sliding window is shorter than the longest packed row's positions."""
        config = self.model.config
        window = getattr(config, "sliding_window", None)
        longest = max((len(g.prefix) + max(map(len, g.suffixes)) for g in groups), default=0)
        return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
                and not (isinstance(window, int) and longest >= window))

    def _score_packed(self, groups: list[PrefixGroup], requests: list[Request]):
        """Yield (request index, answer) for every member of `groups`, each question as one row (:func:`pack_group`):
        its prefix runs once, its choices follow in the same row under a mask that hides the other choices, and
        only the scored positions go through the output head. Rows of similar lengths share a forward, each forward
        with at most the tokens of ``batch_size`` whole sequences (prefix + longest choice)."""
        packed = sorted(((g, pack_group(g)) for g in groups), key=lambda gp: -len(gp[1][0]))
        lengths = [len(p[0]) for _, p in packed]
        bs = max(1, int(self.batch_size))
        caps = [bs * (len(g.prefix) + max(map(len, g.suffixes))) // n for (g, _), n in zip(packed, lengths,
                                                                                          strict=True)]
        for start, end in split_sorted(lengths, caps, self.FORWARD_COST):
            yield from self._run_packed(packed[start:end], requests)

    def _run_packed(self, packed: list, requests: list[Request]):
        """One forward of packed rows (right-padded) and the answers of their members."""
        width = max(len(p[0]) for _, p in packed)
        ids = torch.full((len(packed), width), self._pad_id(), dtype=torch.long)
        positions = torch.zeros((len(packed), width), dtype=torch.long)
        segments = torch.full((len(packed), width), -1, dtype=torch.long)
        for b, (_, (tokens, pos, seg, _)) in enumerate(packed):
            ids[b, :len(tokens)], positions[b, :len(pos)], segments[b, :len(seg)] = (
                torch.tensor(tokens), torch.tensor(pos), torch.tensor(seg))
        mask = packed_mask(segments)
        if self.model.config._attn_implementation == "eager":  # eager attention adds the mask to its scores
            dtype = self.mixed_precision_dtype or self.model.dtype
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        keep = sorted({r for _, p in packed for rows in p[3] for r in rows})
        extra = {"logits_to_keep": torch.tensor(keep, device=self.device)} if _accepts_logits_to_keep(
            self.model) else {}
        column = {r: c for c, r in enumerate(keep)} if extra else {r: r for r in keep}
        logits = self._forward(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=positions.to(self.device), use_cache=False, **extra).logits
        for b, (group, (*_, logit_rows)) in enumerate(packed):
            for i, rows in zip(group.members, logit_rows, strict=True):
                yield i, self._answer(logits[b, [column[r] for r in rows]], requests[i][2])

    def _score_pool(self, groups: list[PrefixGroup], requests: list[Request]):
        """Yield (request index, (log-likelihood, is_greedy)) for every member of `groups`: their prefixes in
        forwards of similar lengths, then all their choices from one merged cache (when the cache allows)."""
        spans = prefix_spans(groups, max(1, int(self.batch_size)), self.FORWARD_COST)
        parts = [(groups[a:b], *self._run_prefixes(groups[a:b])) for a, b in spans]
        merged = merge_caches([p[1] for p in parts], [p[3] for p in parts]) if len(parts) > 1 else None
        if merged is not None:
            parts = [(groups, merged[0], torch.cat([p[2] for p in parts]), merged[1])]
        for part in parts:
            yield from self._score_suffixes(*part, requests)

    def _score_suffixes(self, groups: list[PrefixGroup], cache, last: torch.Tensor, ctx_mask: torch.Tensor,
                        requests: list[Request]):
        """The choices of `groups` from their prefix cache and last-position logits."""
        rows = sorted(((g, k) for g, group in enumerate(groups) for k, s in enumerate(group.suffixes) if s),
                      key=lambda gk: -len(groups[gk[0]].suffixes[gk[1]]))
        suffix_logits: dict[tuple[int, int], torch.Tensor] = {}
        # Batches of similar lengths, each with at most the tokens of `batch_size` whole sequences: padding costs as
        # much as real tokens, a forward (every weight read once) about FORWARD_COST tokens.
        lengths = [len(groups[g].suffixes[k]) for g, k in rows]
        width, bs = ctx_mask.shape[1], max(1, int(self.batch_size))
        caps = [bs * (width + n) // n for n in lengths]
        for start, end in split_sorted(lengths, caps, self.FORWARD_COST):
            chunk = rows[start:end]
            logits = self._run_suffixes(cache, ctx_mask, [(g, len(groups[g].prefix), groups[g].suffixes[k])
                                                          for g, k in chunk])
            for row, (g, k) in enumerate(chunk):
                suffix_logits[g, k] = logits[row, :len(groups[g].suffixes[k])]
        for g, group in enumerate(groups):
            for k, i in enumerate(group.members):
                parts = [last[g:g + 1]] + ([suffix_logits[g, k]] if (g, k) in suffix_logits else [])
                yield i, self._answer(torch.cat(parts)[group.starts[k]:], requests[i][2])

    def _forward(self, **kwargs):
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            return self.model(**kwargs)

    def _pad_id(self) -> int:
        return int(self.eot_token_id)

    def _run_prefixes(self, groups: list[PrefixGroup]):
        """One forward of the groups' prefixes, left-padded: (KV cache, last-position logits [B, V], mask [B, W])."""
        width = max(len(g.prefix) for g in groups)
        ids = torch.full((len(groups), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(groups), width), dtype=torch.long)
        for b, g in enumerate(groups):
            ids[b, width - len(g.prefix):] = torch.tensor(g.prefix)
            mask[b, width - len(g.prefix):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if _accepts_logits_to_keep(self.model) else {}
        out = self._forward(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), use_cache=True, **keep)
        return out.past_key_values, out.logits[:, -1], mask

    def _run_suffixes(self, cache, ctx_mask: torch.Tensor, rows: list[tuple[int, int, list[int]]]) -> torch.Tensor:
        """One forward of suffixes on their groups' cache rows; rows are (group, prefix length, suffix tokens).
        Right-padded; returns logits [rows, longest suffix, V]."""
        width = max(len(s) for _, _, s in rows)
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (_, _, s) in enumerate(rows):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        source = torch.tensor([g for g, _, _ in rows])
        positions = torch.tensor([p for _, p, _ in rows])[:, None] + torch.arange(width)[None, :]
        out = self._forward(input_ids=ids.to(self.device),
                            attention_mask=torch.cat([ctx_mask[source], mask], dim=1).to(self.device),
                            position_ids=positions.to(self.device),
                            past_key_values=_select_rows(cache, source.to(self.device)), use_cache=True)
        return out.logits

    def _answer(self, logits: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """(sum of the continuation's log-probs, whether it is the greedy continuation), as HFLM computes them."""
        logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        target = torch.tensor(continuation, dtype=torch.long, device=logp.device)
        greedy = bool((logp.argmax(dim=-1) == target).all())
        return float(logp.gather(1, target[:, None]).sum()), greedy


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


__all__ = ["PrefixGroup", "SharedPrefixHFLM", "merge_caches", "model_input", "pack_group", "packed_mask",
           "plan_groups", "prefix_spans", "split_sorted"]
