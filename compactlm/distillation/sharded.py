"""Fully sharded training (``distill.strategy: fsdp``): torch's FSDP2 (``fully_shard``) and distributed checkpoint
(DCP). No sharding of our own: this module only says what is sharded and how it is saved.

* :func:`shard` — every decoder layer, then the whole model, as FSDP units; with gradients (the student) or frozen
  (the online teacher, gathered per layer for its forward and freed after). On CUDA parameters compute in bf16
  with fp32 gradient reduction (``MixedPrecisionPolicy``); on CPU everything stays fp32.
* :func:`save` / :func:`load` — a checkpoint's model and optimizer state as DCP shards (each rank writes its own,
  ``dcp/``), restored exactly into the same world size.
* :func:`full_state_dict` — the trained weights gathered to rank 0 (CPU), for publishing a normal HF directory.
* :func:`state_bytes` — this rank's parameters + gradients + optimizer state, the memory sharding divides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DCP_DIR = "dcp"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (one FSDP unit each): ``model.model.layers`` of an HF causal LM, else every
    module whose class name ends in ``DecoderLayer``."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is not None:
        return list(layers)
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard(model: torch.nn.Module, *, cuda: bool, frozen: bool = False,
          dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model` sharded in place over the default process group (see the module docstring); returns it. With
    `dtype`, each unit's parameters are converted to it just before FSDP takes the unit (and moves it to the
    device), so a model loaded in the dtype it is stored in (its file's pages, shared by the processes) is never
    held whole in the training dtype."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda and not frozen \
        else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    for layer in layers:
        if dtype is not None:
            layer.to(dtype)
        fully_shard(layer, mp_policy=mp, reshard_after_forward=True)
    if dtype is not None:  # the root unit: embeddings (tied to the head or not), final norm, head
        for p in model.parameters():
            if id(p) not in in_layers and p.dtype != dtype:
                p.data = p.data.to(dtype)
    fully_shard(model, mp_policy=mp, reshard_after_forward=True)
    return model


def clip_grad_norm(modules: list[torch.nn.Module], max_norm: float) -> float:
    """``clip_grad_norm_`` over sharded (DTensor) and plain parameters together: each module's gradient norm (a
    sharded one all-reduced), one total, every gradient scaled by the same factor. Returns the total norm."""
    import torch

    groups = [[p for p in m.parameters() if p.grad is not None] for m in modules]
    groups = [g for g in groups if g]
    norms = []
    for g in groups:
        n = torch.nn.utils.get_total_norm([p.grad for p in g])
        norms.append((n.full_tensor() if hasattr(n, "full_tensor") else n).float().cpu())
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    for g in groups:
        torch.nn.utils.clip_grads_with_norm_(g, max_norm, total.to(g[0].grad.device))
    return float(total)


def save(path: str | os.PathLike, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of `modules` and of the optimizer into ``path/dcp`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(_one_module(modules), optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(path) / DCP_DIR))


def load(path: str | os.PathLike, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Restore `modules` and the optimizer from ``path/dcp`` (collective; the same world size that saved it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    whole = _one_module(modules)
    model_sd, optim_sd = get_state_dict(whole, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_state_dict(whole, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _one_module(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The trained modules (student, hidden-KD projection) as one module, so their state keys are unique."""
    import torch

    return torch.nn.ModuleDict(modules)


def full_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    """The unsharded weights on CPU (collective: every rank calls it; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def state_bytes(modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds of the trained parameters, their gradients (as large as the parameters) and the
    optimizer state (AdamW: two moments each)."""
    import torch

    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    total = sum(2 * _local(p).numel() * _local(p).element_size() for p in params)
    for st in optimizer.state.values():
        total += sum(_local(v).numel() * _local(v).element_size() for v in st.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total
