"""torch.distributed glue: which rank am I, which tasks are mine, sum meta-gradients.

Meta-training shards each meta-batch's tasks across ranks (task ``i`` goes to rank
``i % world_size``); every rank computes its tasks' meta-gradients and the sums are all-reduced
directly (DDP's wrapper does not support the double backward of MAML/iMAML).  Tasks are drawn
from ``(seed, step, index)`` alone, so the meta-batch is the same whatever the number of ranks.
Started by ``torchrun``, which sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``; gloo on CPU,
NCCL on GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_tasks(self, meta_batch_size: int) -> range:
        """Indices of this rank's tasks within a meta-batch."""
        return range(self.rank, meta_batch_size, self.size)


def init_from_env(device: torch.device) -> World:
    """Join the process group torchrun describes in the environment (or run alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def all_reduce_sum(tensors: list[Tensor], world: World) -> None:
    """Sum ``tensors`` in place over all ranks, as one flat buffer (one collective call)."""
    if world.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    """Leave the process group after a run that ended normally on every rank.

    All ranks meet at a barrier first: a rank tearing gloo down while another is still sending
    aborted the other ("terminate called without an active exception", about 1 run in 8 here).
    Not called after an error: waiting for ranks that may never arrive would hang, and torchrun
    stops the others anyway.
    """
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
