"""LoRA training (``distill.lora``, ``correct.lora``): the model's linear layers get peft low-rank adapters, only
the adapters train (the optimizer sees the parameters that require grad), checkpoints hold the wrapped model's state
like any other, and :func:`merged` folds the adapters into the weights before the model is published, so the output
is the base architecture with no peft keys or files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compactlm.config import LoraConfig

if TYPE_CHECKING:
    import torch


def with_lora(model: torch.nn.Module, cfg: LoraConfig, field: str) -> torch.nn.Module:
    """`model` wrapped with rank ``cfg.rank`` adapters on ``cfg.targets`` (every linear layer but the output head
    when empty); its own weights frozen. ValueError, naming `field` (``distill.lora``) and the model's linear layer
    names, when a target matches none of them."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(cfg.targets) or "all-linear"
    spec = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                          task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, spec)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ValueError(f"{field}.targets {cfg.targets}: {e}. This model's linear layers are named {names}; "
                        f"list some of them, or leave targets empty for all") from None


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model with its adapters folded into the weights (`model` itself when it has none)."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model
