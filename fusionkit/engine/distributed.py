"""Multi-process data parallelism (``torchrun``) for one training run, set up in one place.

``torchrun --nproc_per_node N -m fusionkit run RECIPE`` starts N processes; each trains a
replica of the model on its shard of every epoch's windows inside
``DistributedDataParallel`` (gradients are averaged across processes), so one optimizer step
sees ``N x training.batch_size`` windows. Before each validation every process takes rank 0's
buffers (BatchNorm running statistics, updated by each process on its own shard), so all of
them evaluate the same model, get the same numbers, and agree on the LR schedule and early
stopping; only rank 0 writes files. Backend: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["Dist"]


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device_type: str) -> Dist:
        """Join the process group described by torchrun's environment (no-op when absent)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(local)
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return cls(rank=rank, world_size=world, local_rank=local)

    @staticmethod
    def local_processes() -> int:
        """How many processes of the job share this machine (``LOCAL_WORLD_SIZE`` under
        torchrun, else 1): they split its CPU cores."""
        try:
            return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            return 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: its own GPU under torchrun."""
        return (
            torch.device("cuda", self.local_rank)
            if self.enabled and device.type == "cuda"
            else device
        )

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, perm: Tensor) -> Tensor:
        """This rank's windows of an epoch's permutation: every world-th one, the permutation
        padded by wrapping so that all ranks run the same number of steps."""
        if not self.enabled:
            return perm
        per_rank = math.ceil(perm.numel() / self.world_size)
        total = per_rank * self.world_size  # wrap as often as needed (fewer windows than ranks)
        padded = perm.repeat(math.ceil(total / max(1, perm.numel())))[:total]
        return padded[self.rank :: self.world_size]

    def windows_per_rank(self, n_windows: int) -> int:
        return math.ceil(n_windows / self.world_size)

    def mean(self, value: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(value)
            value = value / self.world_size
        return value

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (collective: every rank calls it)."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (e.g. the run directory it created)."""
        if not self.enabled:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rng(self, rng: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every rank's RNG state, keys suffixed by rank (collective: every rank calls it)."""
        if not self.enabled:
            return rng
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
        return {f"{k}.{r}": v for r, states in enumerate(gathered) for k, v in states.items()}

    def own_rng(self, rng: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's part of a state saved by :meth:`gather_rng`."""
        suffix = f".{self.rank}"
        if not any(k.endswith(suffix) for k in rng) or not self.enabled:
            return rng
        return {k[: -len(suffix)]: v for k, v in rng.items() if k.endswith(suffix)}
