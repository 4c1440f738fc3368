r"""torch.distributed for training: one code path from one process to many nodes.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``)::

    # one machine, 2 processes (CPU: gloo; GPUs: nccl, one GPU per process)
    torchrun --nproc_per_node=2 -m medseg.cli train DATASET --out model
    # two machines with 4 GPUs each: run on both, node_rank 0 and 1
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
        --rdzv_backend=c10d --rdzv_endpoint=host0:29500 -m medseg.cli train DATASET --out model

Without those variables everything runs in one process and the helpers below are no-ops.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_gather_objects", "barrier", "broadcast_object", "cleanup", "init_distributed", "mean"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank: Global rank (0 writes checkpoints and logs).
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: ``cuda:<local_rank>`` on GPU nodes, else ``cpu``; None when not distributed.
        backend: ``nccl``, ``gloo`` or ``""`` (single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when a process group is running with more than one process."""
        return self.world_size > 1


def init_distributed(*, timeout_minutes: float = 120.0) -> DistInfo:
    """Join the process group ``torchrun`` describes in the environment (NCCL on CUDA, else gloo).

    Returns a single-process :class:`DistInfo` when ``WORLD_SIZE`` is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def cleanup(info: DistInfo) -> None:
    """Leave the process group (if this module joined one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.enabled:
        dist.barrier()


def broadcast_object(info: DistInfo, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (picklable objects)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(info: DistInfo, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not info.enabled:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def mean(info: DistInfo, value: float, device: torch.device) -> float:
    """Mean of a scalar over ranks."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size
