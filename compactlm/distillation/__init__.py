"""Knowledge distillation of a pruned student from its teacher.

Logit KD online (teacher forward per batch) or offline (the teacher's top-k or sampled log-probs stored by
generation),
optional hidden-state KD, resumable checkpoints, data parallel under torchrun. Importing this package is cheap:
``distill`` and the losses load torch/transformers on first access.

    from compactlm.distillation import distill
    summary = distill(teacher_dir, student_dir, data_dir, cfg, out_dir, seed=0, device="cpu")
    summary = correct_teacher(teacher_dir, data_dir, correct_cfg, out_dir)  # the teacher fine-tuned first
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compactlm.distillation.correct import correct_teacher  # noqa: F401
    from compactlm.distillation.losses import (  # noqa: F401
        forward_kl,
        generalized_jsd,
        hidden_state_loss,
        kd_loss,
        reverse_kl,
        sampled_kd_loss,
        topk_kd_loss,
        total_variation,
    )
    from compactlm.distillation.setup import DistillError  # noqa: F401
    from compactlm.distillation.trainer import distill  # noqa: F401

__all__ = ["distill", "correct_teacher", "DistillError", "kd_loss", "topk_kd_loss", "sampled_kd_loss",
           "hidden_state_loss", "forward_kl", "reverse_kl", "generalized_jsd", "total_variation"]


def __getattr__(name: str) -> Any:
    if name == "distill":
        from compactlm.distillation.trainer import distill

        return distill
    if name == "correct_teacher":
        from compactlm.distillation.correct import correct_teacher

        return correct_teacher
    if name == "DistillError":
        from compactlm.distillation.setup import DistillError

        return DistillError
    if name in __all__:
        from compactlm.distillation import losses

        return getattr(losses, name)
    raise AttributeError(f"module 'compactlm.distillation' has no attribute {name!r}")
