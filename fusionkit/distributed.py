"""Multi-process data parallelism (``torchrun``) for one training run.

``torchrun --nproc_per_node N -m fusionkit run RECIPE`` starts N processes; each trains a
replica of the model on its shard of every epoch's windows inside
``DistributedDataParallel`` (gradients are averaged across processes), so one optimizer step
sees ``N x training.batch_size`` windows. Every process evaluates the full validation split
(the same numbers everywhere, so the LR schedule and early stopping agree without
communication); only rank 0 writes files. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "barrier", "init_from_env", "share_from_main", "shutdown"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment (no-op when absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def share_from_main(info: DistInfo, value: object) -> object:
    """Rank 0's ``value`` on every rank (e.g. the run directory it created)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
