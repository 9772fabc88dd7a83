"""One optimizer step of distillation, as named pieces: draw a batch, the loss of one micro-batch, accumulate the
micro-batches, the optimizer step.

The loss of a micro-batch (:func:`micro_batch_loss`) is::

    targets = teacher_targets(run, mb)               # online: teacher forward (no grad); offline: stored top-k/draws
    loss = (1 - kd_weight) * CE(student, data)       # completion tokens only (mask)
         + kd_weight * KD(student, targets; T)       # forward/reverse KL, JSD, TV (losses.py)
         + hidden_weight * mean over layer pairs of D(proj(student_hidden), teacher_hidden)

Every part is a mean over the micro-batch's loss tokens; :func:`accumulate` weights micro-batch i by its share of
the whole (all-process) batch's loss tokens, so accumulation and data parallelism give the gradient of one big
batch. :func:`teacher_targets` is the seam for other kinds of teachers (another tokenizer, on-policy samples).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compactlm.distillation import losses
from compactlm.distillation.checkpoint import checkpoint_root

if TYPE_CHECKING:
    import torch

    from compactlm.config import DistillConfig
    from compactlm.distillation.setup import Run

PARTS = ("loss", "kd_loss", "ce_loss", "hidden_loss")


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


@dataclass
class Batch:
    """One step's rows: counts over the whole (all-process) batch, and this process's share on its device."""

    rows: torch.Tensor  # dataset rows of this process's share [local_batch]
    ids: torch.Tensor  # [local_batch, seq_len]
    mask: torch.Tensor  # [local_batch, seq_len], 1 = completion token
    n_tokens: int  # input tokens of the whole batch
    n_loss: int  # loss tokens (predicted completion tokens) of the whole batch
    epoch: int
    on_policy: bool = False  # the student's own samples (onpolicy.py): the loss is on_policy.loss only
    sample_tokens: float = 0.0  # on-policy: mean sampled tokens per row (whole batch)


@dataclass
class MicroBatch:
    rows: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    weight: float  # share of the whole batch's loss tokens
    last: bool  # the last micro-batch of this process's share (gradients are synchronised after it)
    on_policy: bool = False


@dataclass
class Targets:
    """What the student matches on one micro-batch, aligned with its logits ``[:, :-1]``."""

    logits: torch.Tensor | None = None  # online: the teacher's logits
    topk_ids: torch.Tensor | None = None  # offline: the stored top-k ids and log-probs
    topk_logprobs: torch.Tensor | None = None
    hidden: tuple[torch.Tensor, ...] | None = None  # the teacher's hidden states (hidden-state KD)
    align_s: torch.Tensor | None = None  # another tokenizer: student / teacher positions compared (-1 = none)
    align_t: torch.Tensor | None = None


def draw_batch(run: Run, stream: Iterator[tuple[int, int]]) -> Batch:
    """The next ``batch_size`` rows of the seeded row stream (every process draws the same) and this process's
    contiguous share of them."""
    import torch

    picked = [next(stream) for _ in range(run.cfg.batch_size)]
    batch_rows = torch.tensor([r for _, r in picked])
    n_tokens = run.data.ids[batch_rows].numel()
    n_loss = int(run.data.mask[batch_rows][:, 1:].sum())
    rows = batch_rows[run.par.rank * run.local_batch:(run.par.rank + 1) * run.local_batch]
    return Batch(rows, run.data.ids[rows].to(run.device), run.data.mask[rows].to(run.device), n_tokens, n_loss,
                 picked[-1][0])


def micro_batches(run: Run, batch: Batch) -> Iterator[MicroBatch]:
    for start in range(0, run.local_batch, run.micro):
        mask = batch.mask[start:start + run.micro]
        weight = int(mask[:, 1:].sum()) / max(1, batch.n_loss)  # logits at t predict token t + 1
        yield MicroBatch(batch.rows[start:start + run.micro], batch.ids[start:start + run.micro], mask, weight,
                         start + run.micro >= run.local_batch, batch.on_policy)


def teacher_targets(run: Run, mb: MicroBatch) -> Targets:
    """The teacher's side of the loss: a teacher forward (online KD, hidden-state KD), the stored top-k
    (offline KD), or nothing (sequence-level KD: CE on teacher-written text)."""
    import torch

    if run.use_kd and run.offline:
        return Targets(topk_ids=run.data.topk_ids[mb.rows][:, 1:].to(run.device),
                       topk_logprobs=run.data.topk_logprobs[mb.rows][:, 1:].to(run.device))
    if run.teacher is None:
        return Targets()
    if run.cross_tokenizer:  # the same text in the teacher's tokens; logits compared at aligned positions
        with run.autocast(), torch.no_grad():
            out = run.teacher(input_ids=run.data.teacher_ids[mb.rows].to(run.device), use_cache=False)
        return Targets(logits=out.logits, align_s=run.data.align_s[mb.rows].to(run.device),
                       align_t=run.data.align_t[mb.rows].to(run.device))
    hidden = run.use_hidden and not mb.on_policy  # on-policy batches have no hidden-state term
    with run.autocast(), torch.no_grad():
        out = run.teacher(input_ids=mb.ids, use_cache=False, output_hidden_states=hidden)
    return Targets(logits=out.logits[:, :-1], hidden=out.hidden_states if hidden else None)


def _kd(run: Run, s_logits: torch.Tensor, t: Targets, mask: torch.Tensor) -> torch.Tensor:
    c = run.cfg
    if t.align_s is not None:  # another tokenizer: ULD where both predict a token at the same character
        from compactlm.distillation.crosstok import gather_positions

        return losses.uld_loss(gather_positions(s_logits, t.align_s), gather_positions(t.logits, t.align_t),
                               t.align_s >= 0, c.temperature, c.chunk_size)
    if t.topk_ids is not None and run.data.targets == "sampled":
        return losses.sampled_kd_loss(s_logits, t.topk_ids, t.topk_logprobs, mask, c.chunk_size)
    if t.topk_ids is not None:
        return losses.topk_kd_loss(s_logits, t.topk_ids, t.topk_logprobs, mask, c.loss, c.temperature, c.chunk_size,
                                   c.jsd_beta)
    return losses.kd_loss(s_logits, t.logits, mask, c.loss, c.temperature, c.chunk_size, c.jsd_beta)


def _hidden(run: Run, s_hidden: tuple[torch.Tensor, ...], t_hidden: tuple[torch.Tensor, ...],
            mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Mean over the layer pairs of the hidden-state distance, the student's states projected to the teacher's
    width when they differ."""
    import torch

    hid = like.new_zeros((), dtype=torch.float32)
    for s_i, t_i in run.pairs:
        h_s = s_hidden[s_i][:, :-1]
        if run.projection is not None:
            h_s = run.projection(h_s.float())
        hid = hid + losses.hidden_state_loss(h_s, t_hidden[t_i][:, :-1], mask, run.cfg.hidden_loss)
    return hid / len(run.pairs)


def micro_batch_loss(run: Run, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss to backpropagate, its parts) for one micro-batch; see the module docstring."""
    import torch

    c = run.cfg
    if mb.on_policy:
        return on_policy_loss(run, mb)
    with run.autocast():
        s_out = run.model(input_ids=mb.ids, use_cache=False, output_hidden_states=run.use_hidden)
    s_logits = s_out.logits[:, :-1]
    labels, mask = mb.ids[:, 1:], mb.mask[:, 1:].bool()
    if c.kd_weight < 1.0:
        ce = losses.chunked_cross_entropy(s_logits, labels, mask, c.chunk_size)
        loss = (1.0 - c.kd_weight) * ce
    else:  # CE has weight 0: computed for the log only, without a graph (saves its backward)
        with torch.no_grad():
            ce = losses.chunked_cross_entropy(s_logits.detach(), labels, mask, c.chunk_size)
        loss = s_logits.new_zeros((), dtype=torch.float32)
    parts = {"ce_loss": ce}
    t = teacher_targets(run, mb)
    if run.use_kd:
        parts["kd_loss"] = _kd(run, s_logits, t, mask)
        loss = loss + c.kd_weight * parts["kd_loss"]
    if run.use_hidden:
        parts["hidden_loss"] = _hidden(run, s_out.hidden_states, t.hidden, mask, s_logits)
        loss = loss + c.hidden_weight * parts["hidden_loss"]
    return loss, parts


def on_policy_loss(run: Run, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's own samples: on_policy.loss between student and teacher on the sampled tokens (no CE, no
    hidden term); logged with the student's and the teacher's NLL of those tokens (how likely the teacher finds
    what the student writes)."""
    import torch

    c = run.cfg
    with run.autocast():
        s_logits = run.model(input_ids=mb.ids, use_cache=False).logits[:, :-1]
    t = teacher_targets(run, mb)
    labels, mask = mb.ids[:, 1:], mb.mask[:, 1:].bool()
    kd = losses.kd_loss(s_logits, t.logits, mask, c.on_policy.loss, c.temperature, c.chunk_size, c.jsd_beta)
    with torch.no_grad():
        ce = losses.chunked_cross_entropy(s_logits.detach(), labels, mask, c.chunk_size)
        nll = losses.chunked_cross_entropy(t.logits, labels, mask, c.chunk_size)
    return kd, {"kd_loss": kd, "ce_loss": ce, "teacher_nll": nll}


def accumulate(run: Run, batch: Batch, step: int) -> dict[str, float]:
    """Forward and backward every micro-batch of this process's share; returns the batch's loss and its parts
    (summed over processes). Raises FloatingPointError on a non-finite loss, before any update."""
    totals = dict.fromkeys(PARTS, 0.0)
    world = run.par.world
    for mb in micro_batches(run, batch):
        with run.par.sync(run.model, mb.last):
            loss, parts = micro_batch_loss(run, mb)
            value = loss.item()
            if world == 1 and not math.isfinite(value):
                raise FloatingPointError(nonfinite_message(run, value, step))
            (loss * (mb.weight * world)).backward()  # DDP averages over processes; weights sum to 1 globally
        totals["loss"] += mb.weight * value
        for name, part in parts.items():
            totals[name] = totals.get(name, 0.0) + mb.weight * part.item()
    if world > 1:
        totals = run.par.sum(totals)
        if run.projection is not None:
            run.par.average_grads(run.projection.parameters())
        if not math.isfinite(totals["loss"]):  # same value on every process: all stop together
            raise FloatingPointError(nonfinite_message(run, totals["loss"], step))
    return totals


def optimizer_step(run: Run, step: int, lr: float) -> float:
    """Clip, check and apply the accumulated gradients at learning rate `lr`; returns the gradient norm."""
    import torch

    if run.par.fsdp:  # sharded gradients: their norm is all-reduced
        from compactlm.distillation.sharded import clip_grad_norm

        grad_norm = clip_grad_norm(list(run.trainable().values()), run.cfg.grad_clip)
    else:
        params = [p for module in run.trainable().values() for p in module.parameters()]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip))
    if not math.isfinite(grad_norm):
        raise FloatingPointError(
            f"non-finite gradient norm at step {step + 1}; the update was not applied and nothing was "
            f"published{_ckpt_note(run)}. Lower distill.lr (now {run.cfg.lr}) or check the data")
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.cuda:
        torch.cuda.synchronize()
    return grad_norm


def _ckpt_note(run: Run) -> str:
    root = checkpoint_root(run.out_dir)
    return f" (the last good checkpoint stays in {root})" if root.is_dir() else ""


def nonfinite_message(run: Run, value: float, step: int) -> str:
    return (f"non-finite distillation loss ({value}) at step {step + 1}; nothing was published{_ckpt_note(run)}. "
            f"Lower distill.lr (now {run.cfg.lr}), check the data in {run.data_dir}, or raise the temperature")
