"""Online logit distillation: the teacher runs beside the student on the same packed batches.

One optimizer step:

    teacher_logits = teacher(ids)                     # no grad, bf16 on GPU / fp32 on CPU
    student_logits = student(ids)                     # bf16 autocast on GPU
    loss = kd_weight * KD(student, teacher; T) + (1 - kd_weight) * CE(student, data)   # completion tokens only
    loss.backward(); clip_grad_norm_; AdamW.step()    # linear warmup, cosine decay

Data is a generated dataset (prompt + teacher completion per row), packed into ``seq_len`` rows; only completion
tokens count (``loss_mask``). ``kd_weight=0`` is sequence-level KD (plain fine-tuning on teacher-written text):
then the teacher is not even loaded, and a student with a different tokenizer is trained on the re-tokenized
text. ``mode="offline"`` (KD from the top-k log-probs stored in the dataset) would replace ``_teacher_logits``'s
forward pass by a sparse target; the loss/optimizer loop stays as is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from compactlm.artifacts import publish_dir
from compactlm.config import DistillConfig
from compactlm.datasets import iter_examples, pack, read_generated
from compactlm.models import count_params, load_model, load_tokenizer, pick_device

if TYPE_CHECKING:
    import torch

LogFn = Callable[[dict[str, float], int], None]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
)
EXTRA_FILES = ("pruning.json",)


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


def _teacher_logits(teacher, ids: torch.Tensor) -> torch.Tensor:
    """Online mode: the teacher's logits for the batch (no grad)."""
    import torch

    with torch.no_grad():
        return teacher(input_ids=ids, use_cache=False).logits


# ------------------------------------------------------------------------------------------------- public

def distill(teacher_dir: str | os.PathLike, student_dir: str | os.PathLike, data_dir: str | os.PathLike,
            cfg: DistillConfig, out_dir: str | os.PathLike, *, seed: int = 0, device: str = "cpu",
            log_fn: LogFn | None = None) -> dict:
    """Distill `teacher_dir` into `student_dir` on the generated dataset `data_dir`; publish to `out_dir`.

    Writes (atomically, via :func:`compactlm.artifacts.publish_dir`) an HF model directory: safetensors weights
    in the student's original dtype, config, generation config, the student's tokenizer files and chat template,
    its ``pruning.json`` if any, ``train_log.jsonl`` (one JSON object per logged step) and ``manifest.json``
    (config, inputs, final metrics). Nothing is published on error.

    `log_fn(metrics, step)` is called every `cfg.log_every` steps and at the last step with ``loss``, ``ce_loss``,
    ``lr``, ``grad_norm``, ``tokens_per_s``, ``tokens_seen``, ``epoch`` and, when kd_weight > 0, ``kd_loss``.

    Returns the summary: final ``loss``/``kd_loss``/``ce_loss`` (kd_loss None when kd_weight = 0),
    ``initial_loss``, ``steps``, ``tokens`` (input tokens trained on), ``loss_tokens`` (completion tokens),
    ``seconds``, ``tokens_per_s``, ``epochs``, ``params``, ``out_dir``.

    Raises:
        DistillError (a ValueError): vocabulary mismatch with kd_weight > 0, token ids outside the student's
            vocabulary, too little data for one sequence, unsupported mode.
        FloatingPointError: the loss became NaN/inf (lower lr, raise grad_clip strictness, check the data).
    """
    import torch

    from compactlm.distillation.losses import chunked_cross_entropy, kd_loss

    teacher_dir, student_dir, data_dir = Path(teacher_dir), Path(student_dir), Path(data_dir)
    if cfg.mode != "online":
        raise DistillError(f"distill.mode={cfg.mode!r} is not implemented; use mode: online")
    device = pick_device(device)
    use_teacher = cfg.kd_weight > 0
    torch.manual_seed(seed)

    # -- vocabularies and data -------------------------------------------------------------------------
    s_conf = _config_json(student_dir)
    t_conf = _config_json(teacher_dir)
    s_vocab = int(s_conf.get("vocab_size") or s_conf.get("text_config", {}).get("vocab_size"))
    t_vocab = t_conf.get("vocab_size") or t_conf.get("text_config", {}).get("vocab_size")
    shared = _same_vocab(teacher_dir, student_dir, t_vocab, s_vocab)
    if use_teacher and not shared:
        raise DistillError(
            f"teacher ({teacher_dir}, vocab {t_vocab}) and student ({student_dir}, vocab {s_vocab}) do not share a "
            "vocabulary, and logit KD compares next-token distributions over the same vocabulary. Use a student "
            "derived from the teacher (pruning keeps the vocabulary), or sequence-level KD: plain fine-tuning on "
            "the teacher-written data with distill.kd_weight=0"
        )
    examples = (list(iter_examples(data_dir)) if shared
                else _retokenized_examples(data_dir, load_tokenizer(student_dir)))
    try:
        ids_all, mask_all = pack(examples, cfg.seq_len, seed=seed)
    except ValueError as e:
        raise DistillError(f"{data_dir}: {e} (distill.seq_len={cfg.seq_len})") from None
    if int(ids_all.max()) >= s_vocab or int(ids_all.min()) < 0:
        raise DistillError(f"{data_dir} has token ids outside the student's vocabulary [0, {s_vocab}); was the "
                           "dataset generated by a teacher with another tokenizer?")
    n_rows = ids_all.shape[0]

    # -- models ----------------------------------------------------------------------------------------
    cuda = device.startswith("cuda")
    student = load_model(student_dir, dtype="float32", device=device).train()
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = None
    if use_teacher:
        teacher = load_model(teacher_dir, dtype="bfloat16" if cuda else "float32", device=device).eval()
        teacher.requires_grad_(False)

    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=cuda)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    micro = cfg.micro_batch_size or cfg.batch_size

    # -- train -----------------------------------------------------------------------------------------
    stream = _row_stream(n_rows, seed)
    log_lines: list[dict] = []
    tokens_seen = loss_tokens = 0
    first_loss: float | None = None
    last: dict[str, float] = {}
    epoch = 0
    t_start = time.perf_counter()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        lr = _lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        picked = [next(stream) for _ in range(cfg.batch_size)]
        epoch = picked[-1][0]
        rows = torch.tensor([r for _, r in picked])
        ids, mask = ids_all[rows].to(device), mask_all[rows].to(device)
        n_loss = int(mask[:, 1:].sum())
        totals = {"loss": 0.0, "kd_loss": 0.0, "ce_loss": 0.0}
        for start in range(0, cfg.batch_size, micro):
            mb_ids, mb_mask = ids[start:start + micro], mask[start:start + micro]
            labels, m = mb_ids[:, 1:], mb_mask[:, 1:].bool()  # logits at t predict token t + 1
            weight = int(m.sum()) / max(1, n_loss)  # micro-batch share of the batch's loss tokens
            with autocast:
                s_logits = student(input_ids=mb_ids, use_cache=False).logits[:, :-1]
            ce = chunked_cross_entropy(s_logits, labels, m, cfg.chunk_size)
            loss = (1.0 - cfg.kd_weight) * ce
            if teacher is not None:
                with autocast:
                    t_logits = _teacher_logits(teacher, mb_ids)[:, :-1]
                kd = kd_loss(s_logits, t_logits, m, cfg.loss, cfg.temperature, cfg.chunk_size, cfg.jsd_beta)
                loss = loss + cfg.kd_weight * kd
                totals["kd_loss"] += weight * kd.item()
                del t_logits
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"non-finite distillation loss ({loss_value}) at step {step + 1}; nothing was published. "
                    f"Lower distill.lr (now {cfg.lr}), check the data in {data_dir}, or raise the temperature"
                )
            (loss * weight).backward()
            totals["loss"] += weight * loss_value
            totals["ce_loss"] += weight * ce.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0

        tokens_seen += ids.numel()
        loss_tokens += n_loss
        if first_loss is None:
            first_loss = totals["loss"]
        last = {**totals, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": ids.numel() / dt,
                "tokens_seen": float(tokens_seen), "epoch": float(epoch)}
        if not use_teacher:
            last.pop("kd_loss")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log_lines.append({"step": step + 1, **last})
            if log_fn is not None:
                log_fn(dict(last), step + 1)
    seconds = time.perf_counter() - t_start

    summary = {
        "loss": last["loss"], "kd_loss": last.get("kd_loss"), "ce_loss": last["ce_loss"],
        "initial_loss": first_loss, "steps": cfg.steps, "tokens": tokens_seen, "loss_tokens": loss_tokens,
        "seconds": round(seconds, 3), "tokens_per_s": tokens_seen / seconds if seconds > 0 else 0.0,
        "epochs": tokens_seen / ids_all.numel(), "params": count_params(student), "out_dir": str(out_dir),
    }

    # -- publish ---------------------------------------------------------------------------------------
    manifest = {
        "stage": "distill", "teacher": str(teacher_dir), "student": str(student_dir), "data": str(data_dir),
        "config": cfg.model_dump(mode="json"), "seed": seed, "device": device, "train_rows": n_rows,
        "sequence_level": not use_teacher, "retokenized": not shared, "metrics": summary,
    }
    del teacher
    student.eval()
    student.to(_saved_dtype(s_conf))
    with publish_dir(out_dir, manifest) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES + EXTRA_FILES:
            if (student_dir / name).is_file():
                shutil.copy2(student_dir / name, tmp / name)
        with open(tmp / "train_log.jsonl", "w") as f:
            for line in log_lines:
                f.write(json.dumps(line) + "\n")
    return summary
