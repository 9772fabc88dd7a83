"""Logit (and hidden-state) distillation of a student from its teacher, online or from stored top-k log-probs.

One optimizer step:

    teacher_logits, teacher_hidden = teacher(ids)     # online: no grad, bf16 on GPU / fp32 on CPU
                                                      # offline: the dataset's top-k log-probs instead
    student_logits, student_hidden = student(ids)     # bf16 autocast on GPU
    loss = kd_weight * KD(student, teacher; T) + (1 - kd_weight) * CE(student, data)   # completion tokens only
         + hidden_weight * mean over mapped layers of D(proj(student_hidden), teacher_hidden)
    loss.backward(); clip_grad_norm_; AdamW.step()    # linear warmup, cosine decay
    every checkpoint_every steps: atomic checkpoint in <out_dir>.ckpt/ (resume = call distill again)

Data is a generated dataset (prompt + teacher completion per row), packed into ``seq_len`` rows; only completion
tokens count (``loss_mask``). ``kd_weight=0`` is sequence-level KD (plain fine-tuning on teacher-written text):
then the teacher is not even loaded, and a student with a different tokenizer is trained on the re-tokenized
text. ``mode="offline"`` replaces the teacher forward by the top-k log-probs stored by generation
(:func:`~compactlm.distillation.losses.topk_kd_loss`, which documents how the tail mass is handled).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from compactlm.artifacts import fingerprint as fingerprint_of
from compactlm.artifacts import publish_dir
from compactlm.config import DistillConfig
from compactlm.datasets import iter_examples, read_generated
from compactlm.distillation.data import PackedData, pack_plain, pack_with_topk
from compactlm.models import copy_model_side_files, count_params, load_model, load_tokenizer, pick_device

if TYPE_CHECKING:
    import torch

LogFn = Callable[[dict[str, float], int], None]



class DistillError(ValueError):
    """Distillation cannot run with these inputs; the message says what to change."""


# ------------------------------------------------------------------------------------------------ helpers

def _lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate for 0-based `step`: linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def _row_stream(n_rows: int, seed: int) -> Iterator[tuple[int, int]]:
    """(epoch, row) forever: a fresh seeded permutation per epoch, so small datasets cycle deterministically."""
    import torch

    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        for row in torch.randperm(n_rows, generator=g).tolist():
            yield epoch, row
        epoch += 1


def _same_vocab(teacher_dir: Path, student_dir: Path, teacher_vocab: int | None, student_vocab: int) -> bool:
    """True when the teacher and student share their vocabulary (config size and tokenizer token->id map)."""
    if teacher_vocab is not None and teacher_vocab != student_vocab:
        return False
    t_file, s_file = teacher_dir / "tokenizer.json", student_dir / "tokenizer.json"
    if t_file.is_file() and s_file.is_file() and t_file.read_bytes() == s_file.read_bytes():
        return True  # fast path: loading two 100k-token tokenizers takes seconds
    try:
        t_tok, s_tok = load_tokenizer(teacher_dir), load_tokenizer(student_dir)
    except Exception:  # a dir without tokenizer: the config sizes are all we can compare
        return True
    return t_tok.get_vocab() == s_tok.get_vocab()


def _config_json(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise DistillError(f"{model_dir} has no config.json: give an HF model directory")
    return json.loads(path.read_text())


def _retokenized_examples(data_dir: Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Examples re-tokenized from the text columns, for a student whose tokenizer differs from the teacher's."""
    rows = read_generated(data_dir, columns=["prompt_text", "completion", "finish_reason"])
    eos = tokenizer.eos_token_id
    out = []
    for r in rows:
        p = tokenizer(r["prompt_text"], add_special_tokens=False)["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        if r["finish_reason"] == "stop" and eos is not None:
            c = c + [eos]
        out.append((p + c, [0] * len(p) + [1] * len(c)))
    return out


def _saved_dtype(config: dict):
    import torch

    name = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _n_layers(config: dict) -> int:
    return int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers"))


def _hidden_size(config: dict) -> int:
    return int(config.get("hidden_size") or config.get("text_config", {}).get("hidden_size"))


def _teacher_forward(teacher, ids: torch.Tensor, hidden: bool):
    """Online mode: the teacher's logits (and hidden states when asked) for the batch, without grad."""
    import torch

    with torch.no_grad():
        out = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    return out.logits, (out.hidden_states if hidden else None)


def _load_data(cfg: DistillConfig, data_dir: Path, student_dir: Path, shared: bool, offline_kd: bool, seed: int,
               s_vocab: int) -> PackedData:
    """Pack the dataset (with top-k targets for offline KD), validating ids against the student's vocabulary."""
    try:
        if offline_kd:
            data = pack_with_topk(data_dir, cfg.seq_len, seed=seed)
        else:
            examples = (list(iter_examples(data_dir)) if shared
                        else _retokenized_examples(data_dir, load_tokenizer(student_dir)))
            data = pack_plain(examples, cfg.seq_len, seed=seed)
    except ValueError as e:
        raise DistillError(f"{data_dir}: {e} (distill.seq_len={cfg.seq_len}, distill.mode={cfg.mode})") from None
    if int(data.ids.max()) >= s_vocab or int(data.ids.min()) < 0:
        raise DistillError(f"{data_dir} has token ids outside the student's vocabulary [0, {s_vocab}); was the "
                           "dataset generated by a teacher with another tokenizer?")
    if data.topk_ids is not None and (int(data.topk_ids.max()) >= s_vocab or int(data.topk_ids.min()) < 0):
        raise DistillError(f"{data_dir}: stored topk_ids fall outside the student's vocabulary [0, {s_vocab})")
    return data


# ------------------------------------------------------------------------------------------------- public

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

    Checkpoints: with ``cfg.checkpoint_every = N`` a checkpoint is written every N steps into
    ``<out_dir>.ckpt/`` (:mod:`compactlm.distillation.checkpoint`). Calling ``distill`` again with the same
    arguments after a crash resumes from the newest one; on CPU the final weights and the loss curve are
    bit-identical to an uninterrupted run. The checkpoint directory is removed once ``out_dir`` is published.
    A non-finite loss or gradient stops training before the update, so the last checkpoint stays good.

    `log_fn(metrics, step)` is called every `cfg.log_every` steps and at the last step with ``loss``, ``ce_loss``,
    ``lr``, ``grad_norm``, ``tokens_per_s`` and ``model_tflops`` (all processes together; see
    :mod:`compactlm.distillation.flops`), ``tokens_seen``, ``epoch`` and, when used, ``kd_loss`` /
    ``hidden_loss``, and ``mfu`` (0-1) when the peak FLOP/s is known (a known GPU or ``cfg.peak_tflops``). After a resume it is called for the new steps only (``train_log.jsonl`` has them all).

    Returns the summary: final ``loss``/``kd_loss``/``ce_loss``/``hidden_loss`` (None when unused),
    ``initial_loss``, ``steps``, ``tokens`` (input tokens trained on), ``loss_tokens`` (completion tokens),
    ``seconds``, ``tokens_per_s``, ``epochs``, ``params``, ``resumed_from`` (step, 0 = fresh), ``out_dir``.

    Raises:
        DistillError (a ValueError): vocabulary mismatch with kd_weight > 0 or hidden_weight > 0, token ids
            outside the student's vocabulary, too little data for one sequence, offline mode on data without
            top-k log-probs, a pruning record that does not fit the teacher.
        FloatingPointError: the loss or gradient became NaN/inf (lower lr, check the data, raise temperature).
    """
    import torch

    from compactlm.distillation import checkpoint as ckpt
    from compactlm.distillation.flops import peak_flops, train_flops_per_token
    from compactlm.distillation.hidden import kept_channels, layer_map, make_projection, state_pairs
    from compactlm.distillation.losses import chunked_cross_entropy, hidden_state_loss, kd_loss, topk_kd_loss

    teacher_dir, student_dir, data_dir = Path(teacher_dir), Path(student_dir), Path(data_dir)
    out_dir = Path(out_dir)
    device = pick_device(device)
    world, rank, owns_group, device = _init_distributed(device)
    offline = cfg.mode == "offline"
    if offline and cfg.hidden_weight > 0:
        raise DistillError("distill.hidden_weight > 0 needs the teacher's hidden states: use mode: online")
    use_kd = cfg.kd_weight > 0
    use_hidden = cfg.hidden_weight > 0
    load_teacher = (use_kd and not offline) or use_hidden
    torch.manual_seed(seed)

    # -- vocabularies and data -------------------------------------------------------------------------
    s_conf = _config_json(student_dir)
    t_conf = _config_json(teacher_dir)
    s_vocab = int(s_conf.get("vocab_size") or s_conf.get("text_config", {}).get("vocab_size"))
    t_vocab = t_conf.get("vocab_size") or t_conf.get("text_config", {}).get("vocab_size")
    shared = _same_vocab(teacher_dir, student_dir, t_vocab, s_vocab)
    if (use_kd or use_hidden) and not shared:
        raise DistillError(
            f"teacher ({teacher_dir}, vocab {t_vocab}) and student ({student_dir}, vocab {s_vocab}) do not share a "
            "vocabulary, and logit KD compares next-token distributions over the same vocabulary (hidden-state KD "
            "needs the same tokens). Use a student derived from the teacher (pruning keeps the vocabulary), or "
            "sequence-level KD: plain fine-tuning on the teacher-written data with distill.kd_weight=0"
        )
    data = _load_data(cfg, data_dir, student_dir, shared, offline and use_kd, seed, s_vocab)
    n_rows = data.rows

    pairs: list[tuple[int, int]] = []
    if use_hidden:
        n_t = _n_layers(t_conf)
        try:
            pairs = state_pairs(layer_map(student_dir, _n_layers(s_conf), n_t), n_t)
        except ValueError as e:
            raise DistillError(str(e)) from None

    local_batch = cfg.batch_size // world
    if cfg.batch_size % world:
        raise DistillError(f"distill.batch_size={cfg.batch_size} must be a multiple of the {world} data-parallel "
                           f"processes (each takes batch_size / {world} rows)")
    micro = min(cfg.micro_batch_size or local_batch, local_batch)
    if local_batch % micro:
        raise DistillError(f"distill.micro_batch_size={micro} must divide the per-process batch {local_batch} "
                           f"(batch_size {cfg.batch_size} / {world} processes)")

    # -- models ----------------------------------------------------------------------------------------
    cuda = device.startswith("cuda")
    student = load_model(student_dir, dtype="float32", device=device).train()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = None
    if load_teacher:
        teacher = load_model(teacher_dir, dtype="bfloat16" if cuda else "float32", device=device).eval()
        teacher.requires_grad_(False)
    projection = None
    if use_hidden:
        projection = make_projection(_hidden_size(s_conf), _hidden_size(t_conf), kept_channels(student_dir))
        if projection is not None:
            projection = projection.to(device).train()

    params = [p for p in student.parameters() if p.requires_grad]
    matrices = [p for p in params if p.dim() >= 2] + (list(projection.parameters()) if projection else [])
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    trainable = {"student": student, **({"projection": projection} if projection is not None else {})}
    model = student
    if world > 1:  # gradients of the student are averaged by DDP; the projection's by an all-reduce below
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[device] if cuda else None)

    # -- resume ----------------------------------------------------------------------------------------
    ckpt_root = ckpt.checkpoint_root(out_dir)
    fingerprint = ckpt.run_fingerprint({
        "config": cfg.model_dump(mode="json", exclude={"checkpoint_every"}), "seed": seed, "device": device,
        "teacher": fingerprint_of(teacher_dir) if load_teacher else str(teacher_dir),
        "student": fingerprint_of(student_dir), "data": fingerprint_of(data_dir), "world": world,
    }) if cfg.checkpoint_every else ""
    state: dict = {"rows_drawn": 0, "tokens_seen": 0, "loss_tokens": 0, "first_loss": None, "last": {},
                   "log_lines": [], "seconds": 0.0, "epoch": 0}
    start_step = 0
    resume_from = ckpt.latest(ckpt_root, fingerprint) if cfg.checkpoint_every else None
    if resume_from is not None:
        state = ckpt.load(resume_from, trainable, optimizer)
        start_step = int(state["step"])

    # -- train -----------------------------------------------------------------------------------------
    stream = _row_stream(n_rows, seed)
    for _ in range(state["rows_drawn"]):
        next(stream)
    flops_per_token = train_flops_per_token(s_conf, cfg.seq_len, t_conf if load_teacher else None)
    peak = peak_flops(device, cfg.peak_tflops)
    t_session = time.perf_counter()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        lr = _lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        picked = [next(stream) for _ in range(cfg.batch_size)]
        state["rows_drawn"] += cfg.batch_size
        state["epoch"] = picked[-1][0]
        batch_rows = torch.tensor([r for _, r in picked])
        n_tokens = data.ids[batch_rows].numel()
        n_loss = int(data.mask[batch_rows][:, 1:].sum())  # loss tokens of the whole (all-process) batch
        rows = batch_rows[rank * local_batch:(rank + 1) * local_batch]  # this process's share
        ids, mask = data.ids[rows].to(device), data.mask[rows].to(device)
        totals = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0, "hidden_loss": 0.0}
        for start in range(0, local_batch, micro):
            last_micro = start + micro >= local_batch
            sync = contextlib.nullcontext() if world == 1 or last_micro else model.no_sync()
            with sync:  # DDP: all-reduce the gradients once, on the last micro-batch
                mb_ids, mb_mask = ids[start:start + micro], mask[start:start + micro]
                labels, m = mb_ids[:, 1:], mb_mask[:, 1:].bool()  # logits at t predict token t + 1
                weight = int(m.sum()) / max(1, n_loss)  # micro-batch share of the batch's loss tokens
                with autocast:
                    s_out = model(input_ids=mb_ids, use_cache=False, output_hidden_states=use_hidden)
                s_logits = s_out.logits[:, :-1]
                if cfg.kd_weight < 1.0:
                    ce = chunked_cross_entropy(s_logits, labels, m, cfg.chunk_size)
                    loss = (1.0 - cfg.kd_weight) * ce
                else:  # CE has weight 0: computed for the log only, without a graph (saves its backward)
                    with torch.no_grad():
                        ce = chunked_cross_entropy(s_logits.detach(), labels, m, cfg.chunk_size)
                    loss = s_logits.new_zeros((), dtype=torch.float32)
                t_logits = t_hidden = None
                if teacher is not None:
                    with autocast:
                        t_logits, t_hidden = _teacher_forward(teacher, mb_ids, use_hidden)
                if use_kd:
                    if offline:
                        mb_rows = rows[start:start + micro]
                        tk_ids = data.topk_ids[mb_rows][:, 1:].to(device)
                        tk_lp = data.topk_logprobs[mb_rows][:, 1:].to(device)
                        kd = topk_kd_loss(s_logits, tk_ids, tk_lp, m, cfg.loss, cfg.temperature, cfg.chunk_size,
                                          cfg.jsd_beta)
                    else:
                        kd = kd_loss(s_logits, t_logits[:, :-1], m, cfg.loss, cfg.temperature, cfg.chunk_size,
                                     cfg.jsd_beta)
                    loss = loss + cfg.kd_weight * kd
                    totals["kd_loss"] += weight * kd.item()
                if use_hidden:
                    hid = s_logits.new_zeros((), dtype=torch.float32)
                    for s_i, t_i in pairs:
                        h_s = s_out.hidden_states[s_i][:, :-1]
                        if projection is not None:
                            h_s = projection(h_s.float())
                        hid = hid + hidden_state_loss(h_s, t_hidden[t_i][:, :-1], m, cfg.hidden_loss)
                    hid = hid / len(pairs)
                    loss = loss + cfg.hidden_weight * hid
                    totals["hidden_loss"] += weight * hid.item()
                del t_logits, t_hidden
                loss_value = loss.item()
                if world == 1 and not math.isfinite(loss_value):
                    raise FloatingPointError(_nonfinite_msg(loss_value, step, ckpt_root, cfg, data_dir))
                (loss * (weight * world)).backward()  # DDP averages over processes; weights sum to 1 globally
                totals["loss"] += weight * loss_value
                totals["ce_loss"] += weight * ce.item()
        if world > 1:
            totals = _all_reduce_sum(totals, device)
            if projection is not None:
                _average_grads(projection.parameters(), world)
            if not math.isfinite(totals["loss"]):  # same value on every process: all stop together
                raise FloatingPointError(_nonfinite_msg(totals["loss"], step, ckpt_root, cfg, data_dir))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            [p for module in trainable.values() for p in module.parameters()], cfg.grad_clip))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"non-finite gradient norm at step {step + 1}; the update was not applied and nothing was "
                f"published{_ckpt_note(ckpt_root)}. Lower distill.lr (now {cfg.lr}) or check the data"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        state["tokens_seen"] += n_tokens
        state["loss_tokens"] += n_loss
        if state["first_loss"] is None:
            state["first_loss"] = totals["loss"]
        last = {**totals, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": n_tokens / dt,
                "model_tflops": n_tokens * flops_per_token / dt / 1e12,  # n_tokens: the all-process batch
                "tokens_seen": float(state["tokens_seen"]), "epoch": float(state["epoch"])}
        if peak is not None:
            last["mfu"] = last["model_tflops"] * 1e12 / (peak * world)
        if not use_kd:
            last.pop("kd_loss")
        if not use_hidden:
            last.pop("hidden_loss")
        state["last"] = last
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            state["log_lines"].append({"step": step + 1, **last})
            if log_fn is not None and rank == 0:
                log_fn(dict(last), step + 1)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            snapshot = {**state, "fingerprint": fingerprint,
                        "seconds": state["seconds"] + time.perf_counter() - t_session}
            if rank == 0:
                ckpt.save(ckpt_root, step + 1, trainable, optimizer, snapshot)
            _barrier(world)
    seconds = state["seconds"] + time.perf_counter() - t_session

    last = state["last"]
    tokens_seen = state["tokens_seen"]
    summary = {
        "loss": last["loss"], "kd_loss": last.get("kd_loss"), "ce_loss": last["ce_loss"],
        "hidden_loss": last.get("hidden_loss"), "initial_loss": state["first_loss"], "steps": cfg.steps,
        "tokens": tokens_seen, "loss_tokens": state["loss_tokens"], "seconds": round(seconds, 3),
        "tokens_per_s": tokens_seen / seconds if seconds > 0 else 0.0, "epochs": tokens_seen / data.ids.numel(),
        "params": count_params(student), "resumed_from": start_step, "out_dir": str(out_dir),
    }
    if world > 1:
        summary["world_size"] = world
        summary["ranks_in_sync"] = _same_weights_everywhere(student, device)
        if not summary["ranks_in_sync"]:
            raise RuntimeError("data-parallel processes ended with different student weights; nothing was "
                               "published (a bug: please report it with the recipe)")

    # -- publish ---------------------------------------------------------------------------------------
    manifest = {
        "stage": "distill", "teacher": str(teacher_dir), "student": str(student_dir), "data": str(data_dir),
        "config": cfg.model_dump(mode="json"), "seed": seed, "device": device, "train_rows": n_rows,
        "sequence_level": not use_kd, "retokenized": not shared, "metrics": summary,
    }
    del teacher, model
    student.eval()
    student.to(_saved_dtype(s_conf))
    if rank == 0:
        with publish_dir(out_dir, manifest) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            copy_model_side_files(student_dir, tmp, extra=("pruning.json",))
            with open(tmp / "train_log.jsonl", "w") as f:
                for line in state["log_lines"]:
                    f.write(json.dumps(line) + "\n")
        ckpt.remove(ckpt_root)
    _barrier(world)
    if owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return summary


def _ckpt_note(root: Path) -> str:
    return f" (the last good checkpoint stays in {root})" if root.is_dir() else ""


def _nonfinite_msg(value: float, step: int, root: Path, cfg: DistillConfig, data_dir: Path) -> str:
    return (f"non-finite distillation loss ({value}) at step {step + 1}; nothing was published{_ckpt_note(root)}. "
            f"Lower distill.lr (now {cfg.lr}), check the data in {data_dir}, or raise the temperature")


# ---------------------------------------------------------------------------------------- data parallel
# Launched with torchrun (WORLD_SIZE > 1): every process reads the same data and draws the same batch rows
# (same seed), takes its contiguous share of each batch, and scales its loss by its share of the batch's loss
# tokens times the world size, so DDP's gradient average equals the single-process gradient of the whole batch.
# Rank 0 alone logs, checkpoints and publishes; the others wait at barriers.

def _init_distributed(device: str) -> tuple[int, int, bool, str]:
    """(world size, rank, whether we created the process group, device for this process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, False, device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_world_size(), dist.get_rank(), owns, device


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_sum(values: dict[str, float], device: str) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def _average_grads(params, world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def _same_weights_everywhere(model, device: str) -> bool:
    """All processes hold bit-identical weights (compares per-tensor float64 sums and sums of squares)."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        mine = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()])
                            for p in model.parameters()]).flatten().to(device)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
