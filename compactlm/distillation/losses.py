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
of ``chunk_size`` tokens under activation checkpointing, so the fp32 softmax intermediates of only one chunk
exist at a time, in the forward *and* the backward pass (cf. torchtune's chunked KD loss). With a 128k vocabulary
and chunk_size=1024, that is ~0.5 GB per intermediate instead of ``tokens x V x 4`` bytes for the whole batch.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KDKind = Literal["forward_kl", "reverse_kl", "jsd", "tv"]
KD_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tv")


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


def _chunked_sum(fn: Callable[..., torch.Tensor], tensors: list[torch.Tensor], chunk_size: int) -> torch.Tensor:
    """Sum of fn(*chunk) over row chunks; checkpointed when a gradient is needed, so only one chunk's
    intermediates are alive at a time in backward as well."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = tensors[0].shape[0]
    total = tensors[0].new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    for start in range(0, n, chunk_size):
        chunk = [t[start:start + chunk_size] for t in tensors]
        total = total + (checkpoint(fn, *chunk, use_reentrant=False) if needs_grad else fn(*chunk))
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
