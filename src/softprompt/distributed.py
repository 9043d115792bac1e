"""Several processes with torch.distributed, as launched by `torchrun` or `accelerate launch` (both set RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). No engine of our own: data parallelism is one all-reduce of the
prompt's gradient per step; big frozen bases are sharded with PyTorch FSDP2 (`fully_shard`).

Every process reads the whole dataset and computes the same global batches; process r trains on rows
r, r+W, r+2W, ... of each batch, and the loss is normalised by the whole batch's answer tokens, so the summed
gradient is the one-process gradient whatever the number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import SoftPromptError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1 or (dist.is_available() and dist.is_initialized())

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_world(device: str = "auto") -> tuple[World, str]:
    """Join the process group the launcher described (if any); returns the world and this process's device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # torchrun / accelerate launch, even with 1 process
    if not launched and not (dist.is_available() and dist.is_initialized()):
        return World(), device
    if not dist.is_available():
        raise SoftPromptError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    if use_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif device == "auto":
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


def shard_frozen_base(model, world: World) -> None:
    """FSDP2: shard each transformer block's frozen weights across processes (the blocks hold nearly all of a
    big model). Embeddings, final norm and head stay replicated so the prompt can be injected outside the
    sharded blocks; the soft prompt itself is replicated and all-reduced like in plain data parallelism."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    if not world.active:
        raise SoftPromptError("--fsdp needs a process group: launch with torchrun or accelerate launch")
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise SoftPromptError(f"--fsdp: {type(model).__name__} names no transformer block class (_no_split_modules)")
    for block in blocks:
        fully_shard(block)
