"""Logit distillation losses: divergences between the teacher's and the student's next-token distributions.

Conventions shared by every loss here:

* ``student_logits`` and ``teacher_logits`` have shape ``[..., V]`` (same V: logit KD needs a shared vocabulary);
  ``mask`` has the leading shape ``[...]`` (bool or 0/1) and selects the tokens that count. ``mask=None`` counts all.
* Both distributions are softened by the same ``temperature`` T and the result is multiplied by T², so gradient
  magnitudes stay comparable across temperatures (Hinton et al., 2015).
* The return value is the mean over the masked tokens of the per-token divergence (a 0-dim fp32 tensor; 0 when
  no token is selected). Math is done in fp32 whatever the input dtype.
* p = teacher distribution, q = student distribution.

:func:`kd_loss` is what the trainer calls: it selects the masked tokens, then evaluates the divergence in chunks
of ``chunk_size`` tokens, each chunk's gradient computed right away into one buffer the size of the logits
(:class:`_ChunkedSum`), so the fp32 softmax intermediates of only one chunk exist at a time and nothing is
recomputed (cf. torchtune's chunked KD loss, Liger's fused losses). With a 128k vocabulary and chunk_size=1024,
that is ~0.5 GB per intermediate instead of ``tokens x V x 4`` bytes for the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from compactlm.choices import HIDDEN_LOSS_CHOICES, HiddenLoss
from compactlm.choices import KD_LOSS_CHOICES as KD_KINDS
from compactlm.choices import KDLoss as KDKind

# ----------------------------------------------------------------------------------------------- per token
# Each takes fp32 log-probs [N, V] (student, teacher) and returns the divergence per token [N].


def _forward_kl_tokens(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q): mean-seeking, the classic KD objective."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def _reverse_kl_tokens(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_v q (log q - log p): mode-seeking (MiniLLM)."""
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def _jsd_tokens(s_logp: torch.Tensor, t_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD (GKD, Agarwal et al. 2024): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    Bounded by the binary entropy H(beta) <= log 2; symmetric in (p, q) at beta = 0.5.
    """
    m_logp = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log1p(-beta)]), dim=0)
    kl_p_m = (t_logp.exp() * (t_logp - m_logp)).sum(-1)
    kl_q_m = (s_logp.exp() * (s_logp - m_logp)).sum(-1)
    return beta * kl_p_m + (1.0 - beta) * kl_q_m


def _tv_tokens(s_logp: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p - q|, in [0, 1]."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


def _per_token_fn(kind: str, jsd_beta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "forward_kl":
        return _forward_kl_tokens
    if kind == "reverse_kl":
        return _reverse_kl_tokens
    if kind == "jsd":
        if not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be strictly between 0 and 1, got {jsd_beta} "
                             "(use loss=forward_kl or reverse_kl for the limits)")
        return lambda s, t: _jsd_tokens(s, t, jsd_beta)
    if kind == "tv":
        return _tv_tokens
    raise ValueError(f"unknown KD loss kind {kind!r}; choose one of {', '.join(KD_KINDS)}")


# ------------------------------------------------------------------------------------------------- helpers

def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
           temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ in shape; logit KD needs the same tokens and a shared vocabulary (for different tokenizers "
            "use sequence-level KD: kd_weight=0 on teacher-written data)"
        )
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return s, t


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean() if per_token.numel() else per_token.sum()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def _divergence(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None, temperature: float, jsd_beta: float = 0.5) -> torch.Tensor:
    _check(student_logits, teacher_logits, mask, temperature)
    fn = _per_token_fn(kind, jsd_beta)
    s, t = _log_probs(student_logits, teacher_logits, temperature)
    return _masked_mean(fn(s, t), mask) * temperature**2


# ---------------------------------------------------------------------------------------- public, one each

def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over masked tokens of KL(teacher || student)."""
    return _divergence("forward_kl", student_logits, teacher_logits, mask, temperature)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over masked tokens of KL(student || teacher)."""
    return _divergence("reverse_kl", student_logits, teacher_logits, mask, temperature)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """T² · mean over masked tokens of the generalized Jensen-Shannon divergence JSD(beta), 0 < beta < 1."""
    return _divergence("jsd", student_logits, teacher_logits, mask, temperature, jsd_beta=beta)


def total_variation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over masked tokens of the total variation distance."""
    return _divergence("tv", student_logits, teacher_logits, mask, temperature)


# ------------------------------------------------------------------------------------------------- chunked

def _select(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[..., V] -> [N, V] rows where mask is set (all rows when mask is None)."""
    x = x.reshape(-1, x.shape[-1])
    return x if mask is None else x[mask.reshape(-1).bool()]


class _ChunkedSum(torch.autograd.Function):
    """sum over row chunks of fn(x_chunk, *consts_chunk), with d/dx computed chunk by chunk in the forward.

    Each chunk runs forward + backward once, right away, and its gradient is written into one preallocated
    buffer the size of `x`; backward only scales that buffer. So at most one chunk's fp32 intermediates are
    alive at any time, nothing is recomputed (cf. activation checkpointing, which runs every chunk's forward
    twice), and there is no per-chunk full-size slice gradient. The graph supports a single backward (the
    buffer is scaled in place).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[..., torch.Tensor], chunk_size: int,
                *consts: torch.Tensor) -> torch.Tensor:
        need = ctx.needs_input_grad[0]
        grad = torch.empty_like(x) if need else None
        total = x.new_zeros((), dtype=torch.float32)
        for start in range(0, x.shape[0], chunk_size):
            xc = x[start:start + chunk_size].detach()
            cs = [c[start:start + chunk_size] for c in consts]
            if need:
                xc.requires_grad_(True)
                with torch.enable_grad():
                    value = fn(xc, *cs)
                (g,) = torch.autograd.grad(value, xc)
                grad[start:start + chunk_size] = g
            else:
                value = fn(xc, *cs)
            total = total + value.detach()
        ctx.save_for_backward(grad) if need else None
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad.mul_(grad_out.to(grad.dtype)), None, None, *([None] * (len(ctx.needs_input_grad) - 3)))


def _chunked_sum(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Sum of fn(*chunk) over row chunks of ``tensors`` (the first may need a gradient; the others are constants).
    Memory: one chunk's intermediates plus one gradient buffer the size of ``tensors[0]`` (see _ChunkedSum)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    x, *consts = tensors
    consts = [c.detach() for c in consts]
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChunkedSum.apply(x, fn, chunk_size, *consts)
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, x.shape[0], chunk_size):
        total = total + fn(*[t[start:start + chunk_size] for t in [x, *consts]])
    return total


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
            kind: KDKind = "forward_kl", temperature: float = 1.0, chunk_size: int = 1024,
            jsd_beta: float = 0.5) -> torch.Tensor:
    """Chunked KD loss: equals the matching one-shot loss above, with bounded fp32 memory.

    Args:
        student_logits: ``[..., V]`` any float dtype (bf16 under autocast is fine); gradients flow into it.
        teacher_logits: ``[..., V]`` same shape; treated as a constant (detached).
        mask: ``[...]`` bool/0-1, tokens that count; None = all.
        kind: forward_kl | reverse_kl | jsd | tv.
        temperature: softens both distributions; the loss is multiplied by temperature².
        chunk_size: tokens per chunk (>= 1).
        jsd_beta: mixture weight of the teacher for ``kind="jsd"``, strictly in (0, 1).

    Returns: 0-dim fp32 tensor, the mean over masked tokens (0 when none is selected).
    """
    _check(student_logits, teacher_logits, mask, temperature)
    per_token = _per_token_fn(kind, jsd_beta)
    s_rows, t_rows = _select(student_logits, mask), _select(teacher_logits.detach(), mask)
    if s_rows.shape[0] == 0:
        return student_logits.sum().float() * 0.0  # keeps the graph connected; no token counts

    def chunk_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s_logp, t_logp = _log_probs(s, t, temperature)
        return per_token(s_logp, t_logp).sum()

    return _chunked_sum(chunk_loss, [s_rows, t_rows], chunk_size) / s_rows.shape[0] * temperature**2


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy over masked tokens, computed in fp32 chunks like :func:`kd_loss`.

    ``logits`` is ``[..., V]`` already aligned with ``labels`` ``[...]`` (the caller shifts).
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits' leading shape "
                         f"{tuple(logits.shape[:-1])}")
    rows = _select(logits, mask)
    targets = labels.reshape(-1) if mask is None else labels.reshape(-1)[mask.reshape(-1).bool()]
    if rows.shape[0] == 0:
        return logits.sum().float() * 0.0

    def chunk_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x.float(), y, reduction="sum")

    return _chunked_sum(chunk_loss, [rows, targets], chunk_size) / rows.shape[0]


# ------------------------------------------------------------------------------------- offline (top-k) KD

#: Floor for the teacher's "rest" mass 1 - sum(top-k probs): fp16 storage can make the top-k sum reach or pass
#: 1, and a zero bucket would give log 0. The coarse distribution is renormalised after flooring.
REST_FLOOR = 1e-6


def _coarse_student(s: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs [N, k + 1] of the student on the teacher's top-k ids plus one bucket for every other id.

    One fused log_softmax over V (the cost of a cross-entropy), then O(k) work: the rest mass is
    ``1 - sum(top-k probs)``, floored at :data:`REST_FLOOR` like the teacher's and renormalised (fp32 rounding
    of the sum is ~1e-7, so below the floor the exact value would be noise anyway).
    """
    top = F.log_softmax(s.float(), dim=-1).gather(-1, ids)
    rest = torch.log((1.0 - top.exp().sum(-1, keepdim=True)).clamp_min(REST_FLOOR))
    coarse = torch.cat([top, rest], dim=-1)
    return coarse - coarse.logsumexp(-1, keepdim=True)


def _coarse_teacher(lp: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs [N, k + 1] from stored top-k log-probs [N, k]: the k values plus the rest mass."""
    lp = lp.float()
    rest = torch.log((1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(REST_FLOOR))
    coarse = torch.cat([lp, rest], dim=-1)
    return coarse - coarse.logsumexp(-1, keepdim=True)


def topk_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 mask: torch.Tensor | None, kind: KDKind = "forward_kl", temperature: float = 1.0,
                 chunk_size: int = 1024, jsd_beta: float = 0.5) -> torch.Tensor:
    """Offline KD against a sparse teacher: its top-k log-probs as stored by generation, plus a "rest" bucket.

    Tail mass. The teacher's top-k log-probs do not say how the remaining mass ``1 - sum(top-k probs)`` is spread
    over the other ``V - k`` ids. We do not renormalise over the top-k (that would claim the teacher puts zero
    mass elsewhere and pushes the student's tail to zero, over-sharpening it by exactly the dropped mass).
    Instead both distributions are *coarsened* to the same ``k + 1`` outcomes: each top-k id on its own and one
    "rest" bucket, with rest masses ``1 - sum(p_topk)`` for the teacher and ``1 - sum(q_topk)`` for the student
    (q from its full softmax), both floored at :data:`REST_FLOOR` and renormalised (fp16 storage can push the
    teacher's top-k sum to 1). The divergence ``kind`` is then taken between
    the two ``(k + 1)``-way distributions. Consequences: it is exact on everything the data holds (the top-k
    probabilities and the tail mass), it is 0 iff the student matches them, and for KL it is a lower bound of
    the full-vocabulary KL (data-processing inequality), approaching it as k grows or the teacher is peaked.

    Temperature. Generation stores raw log-probs (T = 1). Softening the full teacher distribution would need
    the unknown tail, so ``temperature`` softens both *coarse* distributions the same way
    (``log_softmax(coarse / T)``, the rest bucket treated as one outcome) and the result is scaled by T². At
    T = 1 this is the quantity above; at T != 1 it is a consistent (0 iff matched) but not identical surrogate
    for the online tempered loss.

    Args:
        student_logits: ``[..., V]``; gradients flow into it. The caller aligns positions: the logits at t
            predict token t + 1, so pass ``logits[:, :-1]`` with the targets of tokens ``1..T-1``.
        topk_ids: ``[..., k]`` integer ids of the teacher's top-k tokens at each position.
        topk_logprobs: ``[..., k]`` the teacher's raw log-probs of those ids (fp16 as stored is fine).
        mask: ``[...]`` positions that count (completion tokens); rows with mask 0 are never read, so prompt
            positions may hold any filler.
        kind, temperature, chunk_size, jsd_beta: as in :func:`kd_loss`.

    Returns: 0-dim fp32 tensor, the mean over masked positions (0 when none is selected).
    """
    lead = student_logits.shape[:-1]
    if topk_ids.shape != topk_logprobs.shape or topk_ids.shape[:-1] != lead:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} must "
                         f"both be [..., k] with leading shape {tuple(lead)} (the student's logits' positions)")
    if topk_ids.shape[-1] >= student_logits.shape[-1]:
        raise ValueError(f"top-k width {topk_ids.shape[-1]} must be smaller than the vocabulary "
                         f"{student_logits.shape[-1]}; use online KD for full distributions")
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(lead)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    per_token = _per_token_fn(kind, jsd_beta)
    s_rows = _select(student_logits, mask)
    ids_rows = _select(topk_ids, mask).long()
    lp_rows = _select(topk_logprobs.detach(), mask)
    if s_rows.shape[0] == 0:
        return student_logits.sum().float() * 0.0

    def chunk_loss(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        s_c, t_c = _coarse_student(s, ids), _coarse_teacher(lp)
        if temperature != 1.0:
            s_c, t_c = F.log_softmax(s_c / temperature, dim=-1), F.log_softmax(t_c / temperature, dim=-1)
        return per_token(s_c, t_c).sum()

    return _chunked_sum(chunk_loss, [s_rows, ids_rows, lp_rows], chunk_size) / s_rows.shape[0] * temperature**2


def sampled_kd_loss(student_logits: torch.Tensor, sample_ids: torch.Tensor, sample_logprobs: torch.Tensor,
                    mask: torch.Tensor | None, chunk_size: int = 1024) -> torch.Tensor:
    """Offline forward KL from k ids *drawn* from the teacher's distribution p (with replacement; generation's
    ``logit_targets: sampled``) and the teacher's raw log-probs of them: per token
    ``(1/k) sum_j [log p(x_j) - log q(x_j)]``, x_j ~ p, an unbiased estimate of KL(p || q), whose gradient
    ``softmax(z) - (draw counts / k)`` is unbiased for the full-vocabulary one (random-sampling KD, Anshumann et
    al., "Sparse Logit Sampling", ACL 2025); top-k targets are biased toward the head instead. Forward KL at T = 1
    only: the draws are of the untempered p. Shapes, masking and return as :func:`topk_kd_loss`.
    """
    lead = student_logits.shape[:-1]
    if sample_ids.shape != sample_logprobs.shape or sample_ids.shape[:-1] != lead:
        raise ValueError(f"sample_ids {tuple(sample_ids.shape)} and sample_logprobs {tuple(sample_logprobs.shape)} "
                         f"must both be [..., k] with leading shape {tuple(lead)} (the student's logits' positions)")
    if mask is not None and mask.shape != lead:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape {tuple(lead)}")
    s_rows = _select(student_logits, mask)
    ids_rows, lp_rows = _select(sample_ids, mask).long(), _select(sample_logprobs.detach(), mask)
    if s_rows.shape[0] == 0:
        return student_logits.sum().float() * 0.0

    def chunk_loss(s: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
        return (lp.float() - F.log_softmax(s.float(), dim=-1).gather(-1, ids)).mean(-1).sum()

    return _chunked_sum(chunk_loss, [s_rows, ids_rows, lp_rows], chunk_size) / s_rows.shape[0]


# ----------------------------------------------------------------------------------- another tokenizer (ULD)

def _uld_tokens(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per token [N]: sum_i |p_s(i) - p_t(i)| over both distributions sorted in decreasing order, the smaller
    vocabulary padded with zero probabilities."""
    ps = torch.softmax(s.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    pt = torch.softmax(t.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(ps.shape[-1], pt.shape[-1])
    ps, pt = F.pad(ps, (0, width - ps.shape[-1])), F.pad(pt, (0, width - pt.shape[-1]))
    return (ps - pt).abs().sum(-1)


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
             temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Universal Logit Distillation for a student whose vocabulary differs from the teacher's (Boizard et al.,
    2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
    arXiv:2402.12030): the Wasserstein-1 distance between the two next-token distributions when no token of one
    vocabulary is known to equal a token of the other, which reduces to the L1 distance between the two
    probability vectors sorted in decreasing order (the shorter one padded with zeros).

    ``student_logits [..., Vs]`` and ``teacher_logits [..., Vt]`` must describe the same positions of the same text
    (the trainer pairs positions where both tokenizers start a token at the same character); ``mask [...]`` selects
    pairs. It is blind to *which* token is which (any permutation of a vocabulary gives the same loss), so it is
    trained together with cross-entropy on the data (``distill.kd_weight < 1``). Not scaled by T². Returns the mean
    over masked positions (0-dim fp32), computed in chunks of ``chunk_size`` rows like :func:`kd_loss`.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must cover the same positions (the vocabularies may differ)")
    if mask is not None and mask.shape != student_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal the logits' leading shape "
                         f"{tuple(student_logits.shape[:-1])}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s_rows, t_rows = _select(student_logits, mask), _select(teacher_logits.detach(), mask)
    if s_rows.shape[0] == 0:
        return student_logits.sum().float() * 0.0
    return _chunked_sum(lambda s, t: _uld_tokens(s, t, temperature).sum(), [s_rows, t_rows],
                        chunk_size) / s_rows.shape[0]


# ------------------------------------------------------------------------------------------- hidden states

HIDDEN_KINDS = HIDDEN_LOSS_CHOICES


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None,
                      kind: HiddenLoss = "cosine") -> torch.Tensor:
    """Mean over masked positions of the distance between (projected) student and teacher hidden states.

    Both are ``[..., D]`` with the same D (project the student first when widths differ); ``mask`` is ``[...]``.
    ``cosine``: 1 - cos(s, t) per position, in [0, 2], scale-free (the residual stream's norm grows with depth).
    ``mse``: mean over the D channels of (s - t)², per position. fp32 math; the teacher is detached.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ; project the student to the teacher's width first")
    s, t = student_hidden.float(), teacher_hidden.detach().float()
    if kind == "cosine":
        per = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)
    elif kind == "mse":
        per = (s - t).pow(2).mean(-1)
    else:
        raise ValueError(f"unknown hidden loss {kind!r}; choose one of {', '.join(HIDDEN_KINDS)}")
    return _masked_mean(per, mask)
