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

import atexit
import gc
import hashlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fusionkit.core.errors import FusionkitError

__all__ = ["Dist"]


def _leave() -> None:
    """Leave the process group at exit, while the interpreter is whole: a group (or a DDP
    wrapper, which holds one, kept alive by a reference cycle) torn down during interpreter
    finalization has its communication threads reach for the GIL and abort the process
    ("terminate called without an active exception")."""
    if dist.is_initialized():
        gc.collect()  # DDP wrappers that only a cycle keeps alive go first, while Python runs
        dist.destroy_process_group()


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, device_type: str) -> Dist:
        """Join the process group described by torchrun's environment (no-op when absent).

        Raises:
            FusionkitError: ``WORLD_SIZE`` is set but the rest of torchrun's environment is
                missing or not numbers (a shell that kept a job's variables, or a process a
                torchrun job started), where the rendezvous would fail in a traceback or wait
                for peers that never come.
        """
        env = os.environ
        raw = env.get("WORLD_SIZE", "").strip()
        if not raw or (raw.isdigit() and int(raw) == 1):
            return cls()
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        numbers = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
        bad = [f"{k}={env[k]!r}" for k in numbers if env.get(k) and not env[k].strip().isdigit()]
        if not bad and int(raw) < 1:
            bad = [f"WORLD_SIZE={raw!r}"]
        if missing or bad:
            what = f"{', '.join(missing)} not set" if missing else f"{', '.join(bad)} is invalid"
            raise FusionkitError(
                f"WORLD_SIZE={env.get('WORLD_SIZE')} asks for a multi-process job but "
                f"torchrun's environment is incomplete ({what}): start the command with "
                "`torchrun --nproc_per_node N -m fusionkit ...`, or unset WORLD_SIZE to run "
                "in one process"
            )
        world, rank, local = int(raw), int(env["RANK"]), int(env.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(local)
            if rank == 0:  # a stale environment waits here for peers that never come
                print(
                    f"waiting for the {world} processes of the job to join at "
                    f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
                    file=sys.stderr,
                    flush=True,
                )
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
            atexit.register(_leave)  # a group alive at exit can abort the process
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

    def seed(self, seed: int) -> int:
        """This process's seed in a run of ``seed`` (``seed`` itself on rank 0): for rank > 0
        a hash of both, so that no process of one run draws another seed's stream (a seed
        ``seed + k * rank`` would, for the run of seed ``seed + k``)."""
        if self.rank == 0:
            return seed
        digest = hashlib.sha256(f"fusionkit-rank:{seed}:{self.rank}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

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

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank (e.g. the run directory rank 0 created)."""
        if not self.enabled:
            return value
        box = [value if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def first_flagged(self, step: Tensor, none: int) -> tuple[int, int]:
        """The earliest ``step`` over the ranks (``none``: nothing flagged) and the lowest rank
        that flagged it, agreed by every rank (collective: every rank calls it)."""
        code = torch.where(
            step < none,
            step * self.world_size + self.rank,
            step.new_full((), none * self.world_size),
        )
        if self.enabled:
            dist.all_reduce(code, op=dist.ReduceOp.MIN)
        first = int(code)
        return first // self.world_size, first % self.world_size

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
