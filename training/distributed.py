"""One process or many: the same training script runs alone or under `torchrun` (DDP).

    pg2-train fit ...                                               # one process
    torchrun --standalone --nproc_per_node 8 -m training.cli fit ...  # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m training.cli fit ...  # two nodes

NCCL on CUDA, gloo on CPU. Only rank 0 prints progress and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> Distributed:
    """Join the torchrun job described by the environment, or run alone.

    `device` is "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
    Under torchrun each process takes GPU LOCAL_RANK.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} requested but CUDA is not available; use --device cpu")
        if world_size > 1:
            target = torch.device("cuda", local_rank)
        elif target.index is None:
            target = torch.device("cuda", 0)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo",
                                device_id=target if target.type == "cuda" else None)
    return Distributed(rank, world_size, local_rank, target)


def any_rank(flag: bool, job: Distributed) -> bool:
    """True if `flag` is set on any rank (so every rank stops at the same step)."""
    if not job.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=job.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(job: Distributed) -> None:
    if job.enabled:
        dist.barrier()


def shutdown(job: Distributed) -> None:
    """Leave the process group (a no-op for one process)."""
    if job.enabled and dist.is_initialized():
        dist.destroy_process_group()
