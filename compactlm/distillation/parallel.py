"""How the student is spread over processes: one process, or data parallel (DDP) under ``torchrun``.

Launched with torchrun (``WORLD_SIZE > 1``) every process reads the same data and draws the same batch rows (same
seed), takes its contiguous share of each batch, and scales its loss by its share of the batch's loss tokens times
the world size, so DDP's gradient average equals the single-process gradient of the whole batch. Rank 0 alone
logs, checkpoints and publishes; the others wait at barriers.

:class:`Parallel` is the one place the trainer asks "how many of us are there and how do we agree": wrapping the
student, when gradients are synchronised, summing metrics, barriers, and the end-of-run consistency check. A
sharded strategy (FSDP) plugs in here: it changes :meth:`Parallel.wrap`, how checkpoints are saved and how the
full weights are gathered for publishing, and nothing in the loss or the loop.
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

    @classmethod
    def start(cls, device: str) -> Parallel:
        """One process, or join the torchrun process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(1, 0, device, False)
        import torch
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_world_size(), dist.get_rank(), device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, student: torch.nn.Module) -> torch.nn.Module:
        """The module the forward pass calls: the student itself, or DDP around it."""
        if self.world == 1:
            return student
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[self.device] if self.device.startswith("cuda") else None)

    def sync(self, model: torch.nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
        """Gradient synchronisation happens once per step: on the last micro-batch (DDP's ``no_sync`` before)."""
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
        """All processes hold bit-identical weights (compares per-tensor float64 sums and sums of squares)."""
        if self.world == 1:
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
        return {"world_size": self.world, "rank": self.rank, "device": self.device}
