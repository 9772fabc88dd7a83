"""Logit (and hidden-state) distillation of a student from its teacher, online or from stored top-k log-probs.

The map (each line is one named function; the loop is :func:`distill`)::

    run = setup(...)                                  # setup.py: check inputs, pack data, load models, AdamW
    state = resume(run)                               # checkpoint.py: newest checkpoint of this run, or fresh
    for step in steps:
        batch = draw_batch(run, rows)                 # step.py: seeded rows, this process's share
        refresh(run, step)                            # onpolicy.py: engine vllm: the student's weights into it
        if is_on_policy(run, step):                   # onpolicy.py: a seeded coin with P = on_policy.fraction
            batch = sample_batch(run, step, ...)      #   the student continues seeded prompts; KD on its tokens
        totals = accumulate(run, batch)               # step.py: per micro-batch
            loss = (1 - kd_weight) * CE(student, data) + kd_weight * KD(student, teacher; T)
                 + hidden_weight * D(proj(student_hidden), teacher_hidden)      # completion tokens only
            loss.backward()                           # DDP syncs on the last micro-batch (parallel.py)
        optimizer_step(run, step, lr_at(step))        # clip, finite check, AdamW; warmup + cosine decay
        record(...)                                   # metrics, train_log.jsonl, log_fn
        checkpoint(...)                               # every checkpoint_every steps, atomic, in <out_dir>.ckpt/
    publish(run, state)                               # HF directory + train_log.jsonl + manifest.json, atomic

Data is a generated dataset (prompt + teacher completion per row), packed into ``seq_len`` rows; only completion
tokens count (``loss_mask``). ``kd_weight=0`` is sequence-level KD (plain fine-tuning on teacher-written text):
then the teacher is not even loaded, and a student with a different tokenizer is trained on the re-tokenized
text. ``mode="offline"`` replaces the teacher forward by the top-k log-probs stored by generation
(:func:`~compactlm.distillation.losses.topk_kd_loss`, which documents how the tail mass is handled), or by the k
ids it drew from the teacher (``generate.logit_targets: sampled``; the unbiased
:func:`~compactlm.distillation.losses.sampled_kd_loss`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from compactlm import progress
from compactlm.artifacts import fingerprint as fingerprint_of
from compactlm.artifacts import publish_dir
from compactlm.config import DistillConfig
from compactlm.distillation import checkpoint as ckpt
from compactlm.distillation.data import row_stream
from compactlm.distillation.flops import peak_flops, train_flops_per_token
from compactlm.distillation.lora import merged
from compactlm.distillation.onpolicy import is_on_policy, refresh, sample_batch
from compactlm.distillation.setup import Run, setup
from compactlm.distillation.step import Batch, accumulate, draw_batch, lr_at, optimizer_step
from compactlm.formats.pruning import RECORD_FILE
from compactlm.models import copy_model_side_files, count_params, load_model, stored_dtype

LogFn = Callable[[dict[str, float], int], None]


def distill(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, data_dir: str | os.PathLike,
            cfg: DistillConfig, out_dir: str | os.PathLike, *, seed: int = 0, device: str = "cpu",
            log_fn: LogFn | None = None) -> dict:
    """Distill `teacher_dir` into `student_dir` on the generated dataset `data_dir`; publish to `out_dir`.

    Writes (atomically, via :func:`compactlm.artifacts.publish_dir`) an HF model directory: safetensors weights
    in the student's original dtype, config, generation config, the student's tokenizer files and chat template,
    its ``pruning.json`` if any, ``train_log.jsonl`` (one JSON object per logged step) and ``manifest.json``
    (config, inputs, final metrics). Nothing is published on error.

    Modes: ``cfg.mode="online"`` runs the teacher on every batch; ``"offline"`` reads the teacher's top-k
    log-probs from the dataset (:func:`~compactlm.distillation.losses.topk_kd_loss`) and never loads the teacher
    (its config is still read to check the vocabulary). ``cfg.hidden_weight > 0`` adds hidden-state KD
    (:mod:`compactlm.distillation.hidden`; online only).

    Processes: with ``cfg.strategy`` ddp or fsdp, called outside torchrun, this starts ``cfg.nproc`` processes
    (:mod:`compactlm.distillation.launch`) that each call it again, and returns rank 0's summary; `log_fn` gets rank
    0's metrics. fsdp shards the student (and the online teacher) over them (:mod:`compactlm.distillation.sharded`).

    Checkpoints: with ``cfg.checkpoint_every = N`` a checkpoint is written every N steps into
    ``<out_dir>.ckpt/`` (:mod:`compactlm.distillation.checkpoint`). Calling ``distill`` again with the same
    arguments after a crash resumes from the newest one; on CPU the final weights and the loss curve are
    bit-identical to an uninterrupted run. The checkpoint directory is removed once ``out_dir`` is published.
    A non-finite loss or gradient stops training before the update, so the last checkpoint stays good.

    `log_fn(metrics, step)` is called every `cfg.log_every` steps and at the last step with ``loss``, ``ce_loss``,
    ``lr``, ``grad_norm``, ``tokens_per_s`` and ``model_tflops`` (all processes together; see
    :mod:`compactlm.distillation.flops`), ``tokens_seen``, ``epoch`` and, when used, ``kd_loss`` /
    ``hidden_loss``, and ``mfu`` (0-1) when the peak FLOP/s is known (a known GPU or ``cfg.peak_tflops``). After a
    resume it is called for the new steps only (``train_log.jsonl`` has them all).

    Returns the summary: final ``loss``/``kd_loss``/``ce_loss``/``hidden_loss`` (None when unused),
    ``initial_loss``, ``steps``, ``tokens`` (input tokens trained on), ``loss_tokens`` (completion tokens),
    ``seconds``, ``tokens_per_s``, ``epochs``, ``params`` (of the published model), ``trainable_params`` (the
    adapters' with ``cfg.lora``), ``resumed_from`` (step, 0 = fresh), ``out_dir``; with vLLM on-policy sampling
    ``sampler_start_s`` (the engine's start, not in ``seconds``) and ``sampler_loads`` (weight copies).

    Raises:
        DistillError (a ValueError): vocabulary mismatch with kd_weight > 0 or hidden_weight > 0, token ids
            outside the student's vocabulary, too little data for one sequence, offline mode on data without
            top-k log-probs, a pruning record that does not fit the teacher, ``lora.targets`` naming no layer.
        FloatingPointError: the loss or gradient became NaN/inf (lower lr, check the data, raise temperature).
    """
    from compactlm.distillation.launch import needs_launch, run_ranks

    if needs_launch(cfg):  # strategy ddp / fsdp: start cfg.nproc torchrun processes and wait for them
        return run_ranks(teacher_dir, student_dir, data_dir, cfg, out_dir, seed=seed, device=device, log_fn=log_fn)
    run = setup(teacher_dir, student_dir, data_dir, cfg, out_dir, seed=seed, device=device)
    try:
        fingerprint = _fingerprint(run)
        state = resume(run, fingerprint)
        start_step = int(state.get("step", 0))
        rows = row_stream(run.data.rows, seed)
        for _ in range(cfg.skip_rows + state["rows_drawn"]):  # rows an earlier stage or a stopped run used
            next(rows)
        flops_per_token = train_flops_per_token(run.s_conf, cfg.seq_len, run.t_conf if run.needs_teacher else None)
        peak = peak_flops(run.device, cfg.peak_tflops)
        t_session = time.perf_counter()
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            refresh(run, step)  # vLLM sampling: the student's weights into the engine every refresh_every steps
            batch = draw_batch(run, rows)  # drawn on on-policy steps too: the data order never depends on λ
            if is_on_policy(run, step):
                batch = sample_batch(run, step, batch.epoch)
            totals = accumulate(run, batch, step)
            grad_norm = optimizer_step(run, step, lr_at(step, cfg))
            metrics = {**totals, "lr": lr_at(step, cfg), "grad_norm": grad_norm}
            record(run, state, step, batch, metrics, time.perf_counter() - t0, flops_per_token, peak, log_fn)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                checkpoint(run, state, step + 1, fingerprint, state["seconds"] + time.perf_counter() - t_session)
        summary = _summary(run, state, start_step, state["seconds"] + time.perf_counter() - t_session)
        publish(run, state, summary)
        return summary
    finally:
        if run.sampler is not None:
            run.sampler.close()
        run.par.close()


def fresh_state() -> dict[str, Any]:
    """The loop's counters (JSON: it is saved in every checkpoint's state.json)."""
    return {"rows_drawn": 0, "tokens_seen": 0, "loss_tokens": 0, "first_loss": None, "last": {},
            "log_lines": [], "seconds": 0.0, "epoch": 0, "on_policy_steps": 0}


def _fingerprint(run: Run) -> str:
    """What a checkpoint must have been written by to be resumed: config (less checkpoint_every), seed, device,
    the inputs' fingerprints and the world size. Empty when checkpoints are off."""
    if not run.cfg.checkpoint_every:
        return ""
    return ckpt.run_fingerprint({
        "config": run.cfg.model_dump(mode="json", exclude={"checkpoint_every"}), "seed": run.seed,
        "device": run.device,
        "teacher": fingerprint_of(run.teacher_dir) if run.needs_teacher else str(run.teacher_dir),
        "student": fingerprint_of(run.student_dir), "data": fingerprint_of(run.data_dir), "world": run.par.world,
    })


def resume(run: Run, fingerprint: str) -> dict[str, Any]:
    """The newest checkpoint of this run loaded into the student, projection and optimizer (its state), or a
    fresh state."""
    latest = ckpt.latest(ckpt.checkpoint_root(run.out_dir), fingerprint) if run.cfg.checkpoint_every else None
    if latest is None:
        return fresh_state()
    return ckpt.load(latest, run.trainable(), run.optimizer, sharded=run.par.fsdp, rank=run.par.rank)


def record(run: Run, state: dict[str, Any], step: int, batch: Batch, metrics: dict[str, float], dt: float,
           flops_per_token: float, peak: float | None, log_fn: LogFn | None) -> None:
    """Count the step into `state`, keep its metrics, and every ``log_every`` steps (and the last) add them to
    the training log and hand them to `log_fn` (rank 0)."""
    cfg = run.cfg
    state["rows_drawn"] += cfg.batch_size
    state["epoch"] = batch.epoch
    state["tokens_seen"] += batch.n_tokens
    state["loss_tokens"] += batch.n_loss
    if state["first_loss"] is None:
        state["first_loss"] = metrics["loss"]
    last = {**metrics, "tokens_per_s": batch.n_tokens / dt,
            "model_tflops": batch.n_tokens * flops_per_token / dt / 1e12,  # n_tokens: the all-process batch
            "tokens_seen": float(state["tokens_seen"]), "epoch": float(state["epoch"])}
    if peak is not None:
        last["mfu"] = last["model_tflops"] * 1e12 / (peak * run.par.world)
    if cfg.on_policy is not None:
        state["on_policy_steps"] = state.get("on_policy_steps", 0) + int(batch.on_policy)
        last |= {"on_policy": float(batch.on_policy), "on_policy_fraction": state["on_policy_steps"] / (step + 1)}
        if batch.on_policy:
            last["sample_tokens"] = batch.sample_tokens
    if not run.use_kd and not batch.on_policy:
        last.pop("kd_loss")
    if not run.use_hidden:
        last.pop("hidden_loss")
    state["last"] = last
    if run.par.is_main:
        progress.report("distill", step + 1, cfg.steps, loss=metrics["loss"], tok_s=last["tokens_per_s"])
    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        state["log_lines"].append({"step": step + 1, **last})
        if log_fn is not None and run.par.is_main:
            log_fn(dict(last), step + 1)


def checkpoint(run: Run, state: dict[str, Any], step: int, fingerprint: str, seconds: float) -> None:
    """Save checkpoint `step` (rank 0, the others wait; under FSDP every process writes its shards)."""
    full = {**state, "fingerprint": fingerprint, "seconds": seconds}
    if run.par.fsdp:
        ckpt.save_sharded(ckpt.checkpoint_root(run.out_dir), step, run.trainable(), run.optimizer, full,
                          run.par.rank, run.par.barrier)
    elif run.par.is_main:
        ckpt.save(ckpt.checkpoint_root(run.out_dir), step, run.trainable(), run.optimizer, full)
    run.par.barrier()


def _summary(run: Run, state: dict[str, Any], start_step: int, seconds: float) -> dict[str, Any]:
    last, tokens = state["last"], state["tokens_seen"]
    trainable = sum(p.numel() for p in run.student.parameters() if p.requires_grad)
    adapters = trainable if run.cfg.lora is not None else 0  # LoRA's, gone once merged into the weights
    summary = {
        "loss": last["loss"], "kd_loss": last.get("kd_loss"), "ce_loss": last["ce_loss"],
        "hidden_loss": last.get("hidden_loss"), "initial_loss": state["first_loss"], "steps": run.cfg.steps,
        "tokens": tokens, "loss_tokens": state["loss_tokens"], "seconds": round(seconds, 3),
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "epochs": tokens / run.data.ids.numel(),
        "params": count_params(run.student) - adapters, "trainable_params": trainable, "resumed_from": start_step,
        "out_dir": str(run.out_dir),
    }
    if run.sampler is not None:  # on_policy.engine vllm: its start (before the steps) and its weight copies
        summary |= {"sampler_start_s": round(run.sampler.start_seconds, 3), "sampler_loads": run.sampler.loads}
    from compactlm.distillation.sharded import state_bytes

    summary["state_mib_per_rank"] = round(state_bytes(run.trainable(), run.optimizer) / 2**20, 3)
    if run.device.startswith("cuda"):  # this process's allocator peak (what the plan's GPU rows predict)
        import torch

        summary["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**20, 1)
    if run.par.world > 1 or run.par.fsdp:
        summary["world_size"], summary["strategy"] = run.par.world, run.par.strategy
        summary["ranks_in_sync"] = run.par.same_weights_everywhere(run.student)
        if not summary["ranks_in_sync"]:
            raise RuntimeError("data-parallel processes ended with different student weights; nothing was "
                               "published (a bug: please report it with the recipe)")
    return summary


def publish(run: Run, state: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write the student (in its config's dtype) with its tokenizer, pruning record, training log and manifest to
    ``out_dir`` atomically (rank 0), then drop the checkpoints."""
    import torch

    manifest = {
        "stage": "distill", "teacher": str(run.teacher_dir), "student": str(run.student_dir),
        "data": str(run.data_dir), "config": run.cfg.model_dump(mode="json"), "seed": run.seed,
        "device": run.device, "train_rows": run.data.rows, "sequence_level": not run.use_kd,
        "retokenized": not run.shared_vocab, "cross_tokenizer_kd": "uld" if run.cross_tokenizer else None,
        "metrics": summary,
    }
    run.teacher = run.model = None
    student = _gathered(run) if run.par.fsdp else merged(run.student).eval()  # LoRA: adapters folded in
    if run.par.is_main:
        student.to(getattr(torch, stored_dtype(run.s_conf)))
        with publish_dir(run.out_dir, manifest) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            copy_model_side_files(run.student_dir, tmp, extra=(RECORD_FILE,))
            with open(tmp / "train_log.jsonl", "w") as f:
                for line in state["log_lines"]:
                    f.write(json.dumps(line) + "\n")
        ckpt.remove(ckpt.checkpoint_root(run.out_dir))
    run.par.barrier()


def _gathered(run: Run):
    """FSDP: the trained weights gathered into a plain copy of the student on rank 0 (every process takes part;
    the others get None)."""
    from compactlm.distillation.sharded import full_state_dict

    weights = full_state_dict(run.student)
    if not run.par.is_main:
        return None
    student = load_model(run.student_dir, dtype="float32", device="cpu")
    student.load_state_dict(weights)
    return student.eval()

