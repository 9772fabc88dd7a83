"""On-policy distillation (GKD, Agarwal et al. 2024; MiniLLM; TRL's GKDTrainer): on a share ``fraction`` (λ) of the
steps, the student continues prompts of the data itself and learns the teacher's distribution on its own samples,
so it learns to recover from its own mistakes. The map::

    if is_on_policy(run, step):                       # a seeded coin per step
        batch = sample_batch(run, step, batch.epoch)  # prompts drawn per step; the live student samples them
    ... accumulate(run, batch, step)                  # step.py: teacher forward on the samples, loss = D(student,
                                                      # teacher) over the sampled tokens only (on_policy.loss)

Everything random here is a function of (seed, step): which steps are on-policy, which prompts, and the samples
(drawn inside ``torch.random.fork_rng`` seeded per step and process, or by vLLM requests seeded the same way), so a
run killed and resumed from a checkpoint takes exactly the steps an uninterrupted one does, with no sampler state to
save. The samples come from the student being trained: HF ``generate`` in this process (``on_policy.engine: hf``;
weights always current), or a vLLM engine started in this process (``engine: vllm``, sampler.py) whose
weights are the student's as of the last multiple of ``refresh_every`` (copied in by :func:`refresh`; checkpoints
fall on those multiples, so a resumed engine starts from the weights the interrupted one had). Sampling is not
counted in the step's training FLOPs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compactlm.distillation.step import Batch
from compactlm.models import cut_at_eos

if TYPE_CHECKING:
    from compactlm.distillation.setup import Run

#: Mixed into the per-step seeds, so on-policy draws never coincide with the data order's (data.row_stream).
_SALT = 0x0B5E55ED


def _seed(run: Run, step: int, what: int) -> int:
    """The seed of one random choice of `step`: `what` 0 = the coin, 1 = the prompts, 2 + 1009 x rank = a
    process's samples."""
    return (run.seed * 1_000_003 + step) * 7 + what + _SALT


def _generator(run: Run, step: int, what: int):
    import torch

    return torch.Generator().manual_seed(_seed(run, step, what))


def is_on_policy(run: Run, step: int) -> bool:
    """Whether 0-based `step` trains on the student's samples: a coin with P(heads) = on_policy.fraction, the same
    on every process and on every rerun."""
    op = run.cfg.on_policy
    if op is None or op.fraction <= 0.0:
        return False
    import torch

    return bool(torch.rand((), generator=_generator(run, step, 0)) < op.fraction)


def refresh(run: Run, step: int) -> None:
    """vLLM sampling: at each multiple of ``refresh_every`` whose window holds an on-policy step, copy the student's
    current weights into the engine (a no-op for HF sampling, which uses the live student)."""
    if run.sampler is None:
        return
    every = run.cfg.on_policy.refresh_every
    if step % every == 0 and any(is_on_policy(run, t) for t in range(step, min(step + every, run.cfg.steps))):
        run.sampler.load(run.student)


def sample_batch(run: Run, step: int, epoch: int) -> Batch:
    """This process's share of ``batch_size`` prompts (drawn for `step`), each continued by the student with up to
    ``max_new_tokens`` sampled tokens; rows are prompt (its last tokens when long) + sample, right-padded to
    ``seq_len``, with mask 1 on the sampled tokens (an EOS included, nothing after it)."""
    import torch

    op, cfg = run.cfg.on_policy, run.cfg
    picks = torch.randint(len(run.prompts), (cfg.batch_size,), generator=_generator(run, step, 1)).tolist()
    mine = picks[run.par.rank * run.local_batch:(run.par.rank + 1) * run.local_batch]
    keep = cfg.seq_len - op.max_new_tokens
    prompts = [run.prompts[i][-keep:] for i in mine]
    samples = (run.sampler.sample(prompts, op, run.eos_ids, _seed(run, step, 2 + 1_009 * run.par.rank))
               if run.sampler else _generate(run, prompts, step))
    ids = torch.full((len(prompts), cfg.seq_len), run.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, s) in enumerate(zip(prompts, samples)):
        ids[r, :len(p) + len(s)] = torch.tensor(p + s)
        mask[r, len(p):len(p) + len(s)] = 1
    counts = run.par.sum({"tokens": float(sum(len(p) + len(s) for p, s in zip(prompts, samples))),
                          "loss": float(mask[:, 1:].sum()), "sampled": float(sum(len(s) for s in samples))})
    return Batch(torch.tensor(mine), ids.to(run.device), mask.to(run.device), int(counts["tokens"]),
                 int(counts["loss"]), epoch, on_policy=True, sample_tokens=counts["sampled"] / cfg.batch_size)


def _generate(run: Run, prompts: list[list[int]], step: int) -> list[list[int]]:
    """The student's sampled continuations (token ids, through the first EOS) of left-padded `prompts`."""
    import torch

    op = run.cfg.on_policy
    width = max(len(p) for p in prompts)
    pad = run.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=run.device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=run.device)
    devices = [torch.device(run.device)] if run.cuda else []
    student = run.student
    was_training = student.training
    student.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), run.autocast():
            torch.manual_seed(_seed(run, step, 2 + 1_009 * run.par.rank))
            out = student.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=op.temperature,
                                   top_p=op.top_p, top_k=0, max_new_tokens=op.max_new_tokens, pad_token_id=pad,
                                   eos_token_id=sorted(run.eos_ids))
    finally:
        student.train(was_training)
    return [cut_at_eos(row, run.eos_ids) for row in out[:, width:].tolist()]

