"""Teacher correction (Minitron; Sreenivas et al. 2024): a short fine-tune of the teacher on the training data, so
that it fits data it was not trained on before it is scored, pruned and distilled from. It is the distill trainer
on the teacher itself with the data's next token as the only target (``CorrectConfig.training()``: kd_weight 0, so
no second model is loaded); the output is a model directory like the teacher's, tokenizer included. With
``correct.lora`` only low-rank adapters train, merged into the weights when the teacher is published.

    from compactlm.distillation import correct_teacher
    summary = correct_teacher(teacher_dir, data_dir, CorrectConfig(steps=20), out_dir, seed=0, device="cpu")
"""

from __future__ import annotations

import os

from compactlm.config import CorrectConfig
from compactlm.distillation.setup import DistillError
from compactlm.distillation.trainer import LogFn, distill


def correct_teacher(teacher_dir: str | os.PathLike, data_dir: str | os.PathLike, cfg: CorrectConfig,
                    out_dir: str | os.PathLike, *, seed: int = 0, device: str = "cpu",
                    log_fn: LogFn | None = None) -> dict:
    """Fine-tune `teacher_dir` on the generated dataset `data_dir` and publish the corrected teacher to `out_dir`
    (atomically, resumable from its checkpoints like any distill run); returns the trainer's summary."""
    try:
        return distill(teacher_dir, teacher_dir, data_dir, cfg.training(), out_dir, seed=seed, device=device,
                       log_fn=log_fn)
    except DistillError as e:  # the trainer names its own section; here the user wrote correct.*
        raise DistillError(str(e).replace("distill.", "correct.")) from None
