"""Tensor helpers shared by the checks: shapes in messages, masks, comparisons, seeding."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

BATCH_SIZES: tuple[int, ...] = (1, 3)
LENGTHS: tuple[int, ...] = (1, 7, 32)
#: Valid outputs may move by at most this much when only padded frames (or other items) change.
ATOL, RTOL = 1e-5, 1e-4
#: Gate weights must sum to 1 within this tolerance (fp32; bf16 uses BF16_SUM_TOL).
SUM_TOL, BF16_SUM_TOL = 1e-4, 2e-2


def shape_of(x: Any) -> str:
    if isinstance(x, Tensor):
        return str(tuple(x.shape))
    return type(x).__name__


def axes(**axes: int) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in axes.items()) + ")"


def padding_mask(lengths: list[int], t: int) -> Tensor:
    """``(B, T)`` bool mask with ``lengths[b]`` valid frames at the start, padding at the end."""
    return torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def spread_lengths(b: int, t: int) -> list[int]:
    """A spread of valid lengths in ``[1, t]``: the first item full, the others shorter."""
    if b == 1:
        return [t]
    return [max(1, t - (i * t) // b) for i in range(b)]


def max_diff(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().float() - b.detach().float()).abs().max())


def identical(a: Tensor, b: Tensor) -> bool:
    """Equal values, with NaN equal to NaN (``torch.equal`` says two NaN outputs differ, which
    would blame determinism or saved state for what is a NaN)."""
    if torch.equal(a, b):
        return True
    if a.shape != b.shape or a.dtype != b.dtype or not a.is_floating_point():
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def close(a: Tensor, b: Tensor) -> bool:
    return torch.allclose(a.detach().float(), b.detach().float(), rtol=RTOL, atol=ATOL)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with the global torch RNG seeded, restoring the caller's RNG state afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 matmuls/convolutions on CUDA so CPU and CUDA outputs are comparable."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def default_name(build: Any, name: str | None, kind: str) -> str:
    """``name``, else the name ``build`` is registered under (``@register``), else ``kind``."""
    from fusionkit.core.registry import registered_name

    return name or registered_name(build) or kind
