"""How the student is spread over processes: one process, data parallel (DDP: a full replica per process) or fully
sharded (FSDP2: each process holds 1/N of the weights, gradients and optimizer state; :mod:`sharded`) under
``torchrun`` (``distill.strategy``; :mod:`compactlm.distillation.launch` starts the processes).

Launched with torchrun (``WORLD_SIZE > 1``) every process reads the same data and draws the same batch rows (same
seed), takes its contiguous share of each batch, and scales its loss by its share of the batch's loss tokens times
the world size, so DDP's gradient average equals the single-process gradient of the whole batch. Rank 0 alone
logs and publishes; the others wait at barriers. FSDP reduces gradients with the same average, so the loss
scaling is the same; its checkpoints are written by every process (DCP shards) and the weights are gathered to
rank 0 for publishing.

:class:`Parallel` is the one place the trainer asks "how many of us are there and how do we agree": wrapping the
student (and sharding the teacher), when gradients are synchronised, summing metrics, barriers, and the end-of-run
consistency check. Nothing in the loss or the loop depends on the strategy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class Parallel:
    """This process's place in the run: world size, rank, its device, and whether it made the process group."""

    world: int = 1
    rank: int = 0
    device: str = "cpu"
    owns_group: bool = False
    strategy: str = "single"  # single | ddp | fsdp (ddp with one process is single)

    @classmethod
    def start(cls, device: str, strategy: str = "ddp") -> Parallel:
        """One process, or join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1, or
        with `strategy` fsdp under torchrun at any world size (FSDP needs a group even for one process)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        fsdp = strategy == "fsdp" and "RANK" in os.environ
        if world <= 1 and not fsdp:
            return cls(1, 0, device, False, "single")
        import torch
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_world_size(), dist.get_rank(), device, owns, "fsdp" if fsdp else "ddp")

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        """The module the forward pass calls: the student itself, DDP around it, or the student sharded in place
        (FSDP; before the optimizer is built, which then holds the shards)."""
        if self.fsdp:
            import torch

            from compactlm.distillation.sharded import shard

            return shard(student, cuda=self.device.startswith("cuda"), dtype=torch.float32)
        if self.world == 1:
            return student
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[self.device] if self.device.startswith("cuda") else None)

    def shard_teacher(self, teacher: torch.nn.Module) -> torch.nn.Module:
        """The frozen teacher, sharded too under FSDP (each layer gathered for its forward, then freed)."""
        if not self.fsdp:
            return teacher
        import torch

        from compactlm.distillation.sharded import shard

        cuda = self.device.startswith("cuda")
        return shard(teacher, cuda=cuda, frozen=True, dtype=torch.bfloat16 if cuda else torch.float32)

    def sync(self, model: torch.nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
        """Gradient synchronisation happens once per step: on the last micro-batch (DDP's ``no_sync`` before,
        FSDP's reduce-scatter switched off before)."""
        if self.fsdp:
            model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if self.world == 1 or last_micro else model.no_sync()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over the processes (float64)."""
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(values, t.tolist()))

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average gradients of parameters DDP does not own (the hidden-state projection)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def same_weights_everywhere(self, model: torch.nn.Module) -> bool:
        """All processes hold bit-identical weights (compares per-tensor float64 sums and sums of squares); FSDP
        holds one copy, in shards."""
        if self.world == 1 or self.fsdp:
            return True
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            mine = torch.stack([torch.stack([p.double().sum(), p.double().pow(2).sum()])
                                for p in model.parameters()]).flatten().to(self.device)
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def close(self) -> None:
        """Leave the process group if this run created it."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "rank": self.rank, "device": self.device, "strategy": self.strategy}
