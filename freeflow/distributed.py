"""Process groups for ``torchrun``: one rank per GPU (NCCL) or per CPU process (gloo), shared by the CLIs.

Every rank draws the same global random stream and keeps its own rows, so results do not depend on the
number of processes; these helpers say which rows are a rank's and combine what the ranks computed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, n: int) -> torch.Tensor:
        """This rank's rows of a global batch of ``n``, strided (``rank, rank + world, ...``)."""
        return torch.arange(self.rank, n, self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_processes() -> Processes:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: NCCL on CUDA, gloo on CPU; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world == 1:
        return Processes(0, 1, device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_mean_(tensors, world: int) -> None:
    """Average tensors (gradients) across processes in place, through one flat buffer: one collective."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all processes (a new tensor)."""
    out = t.clone()
    dist.all_reduce(out)
    return out
