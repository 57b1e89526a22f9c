"""torchrun plumbing for the trainer: one process is world size 1 and every call is a no-op.

Under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_distributed` joins (or starts) the process
group; each process then takes its slice of every global batch and DDP averages the gradients.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .util import resolve_device

__all__ = ["Distributed", "init_distributed"]


@dataclass
class Distributed:
    """This process's place in the group: rank, world size, and whether it started the group."""
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes the run folder."""
        return self.rank == 0

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) ``t`` over the processes, in place; returns it."""
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's BatchNorm statistics everywhere (DDP runs with broadcast_buffers=False)."""
        if self.world > 1:
            import torch.distributed as dist
            for b in module.buffers():
                dist.broadcast(b, 0)

    def gather_object(self, obj) -> list:
        """Every process's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every process."""
        if self.world == 1:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, barrier: bool = True) -> None:
        """End the group we started; no barrier after an error (the others may never come)."""
        if self.owns_group:
            import torch.distributed as dist
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


def init_distributed(device_spec: str) -> tuple[Distributed, torch.device]:
    """This process's :class:`Distributed` and device (``train.device``; under torchrun
    ``cuda`` means the GPU of ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), resolve_device(device_spec, key="train.device")
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local, key="train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), owns), device
