"""One process or many: the same training script runs alone or under `torchrun` (DDP).

    pg2-train fit ...                                               # one process
    torchrun --standalone --nproc_per_node 8 -m training.cli fit ...  # one node, 8 GPUs
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 -m training.cli fit ...  # two nodes

NCCL on CUDA, gloo on CPU. Only rank 0 prints progress and writes files. With N processes of
batch B a step is the step of one process with batch N·B (docs/training.md: what is guaranteed):
DDP averages the gradients, D's batch norm takes its statistics over all N·B samples
(`SynchronizedBatchNorm2d`), and the logged losses are averaged over the ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn

from pg2_server.errors import SetupError


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
            raise SetupError(f"--device {device} requested but CUDA is not available; use --device cpu")
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


def from_main(value, job: Distributed):
    """Rank 0's `value` on every rank (a picklable object; `value` itself for one process)."""
    if not job.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=job.device if job.device.type == "cuda" else None)
    return box[0]


def gather_from_ranks(value, job: Distributed) -> list:
    """Every rank's `value` (a picklable object), in rank order, on every rank."""
    if not job.enabled:
        return [value]
    values = [None] * job.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(job: Distributed) -> None:
    if job.enabled:
        dist.barrier()


def shutdown(job: Distributed) -> None:
    """Leave the process group (a no-op for one process)."""
    if job.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(values: torch.Tensor, job: Distributed) -> torch.Tensor:
    """The element-wise mean of `values` over all ranks (the tensor itself for one process)."""
    if not job.enabled:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / job.world_size


class SynchronizedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the whole batch of all ranks, gradients included.

    torch.nn.SyncBatchNorm does the same on GPUs only; this one runs on any backend (gloo on CPU
    too), so the tested path is the one that trains. Every rank must call it with the same batch
    size. Outside a process group it is a plain BatchNorm2d, and its state dict is one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = x.numel() // x.shape[1] * dist.get_world_size()
        values = x.float()
        # Two passes (mean, then the centred squares), like the single-process kernel: E[x²] − E[x]²
        # loses digits. The autograd-aware all_reduce sums the gradients of every rank's samples.
        mean = dist_functional.all_reduce(values.sum((0, 2, 3))) / count
        centred = values - mean[None, :, None, None]
        variance = dist_functional.all_reduce((centred * centred).sum((0, 2, 3))) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(variance.detach() * count / max(count - 1, 1), momentum)
        out = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out.to(x.dtype)


def synchronize_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a SynchronizedBatchNorm2d with its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SynchronizedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                             child.track_running_stats, device=child.weight.device
                                             if child.affine else None)
            synced.load_state_dict(child.state_dict())
            setattr(module, name, synced)
        else:
            synchronize_batch_norm(child)
    return module
