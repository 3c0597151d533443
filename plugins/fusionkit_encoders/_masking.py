"""Mask helpers shared by the encoders: lengths from a ``(B, T)`` mask and masked BatchNorm."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from fusionkit.plugin import masked_batch_norm

__all__ = ["MaskedBatchNorm1d", "lengths_from_mask"]


def lengths_from_mask(mask: Tensor) -> Tensor:
    """Number of valid frames per item, ``(B,)`` int64 on the CPU, at least 1.

    Padding sits at the end of a window (see :mod:`fusionkit.plugin`), so the valid
    frames of item ``b`` are ``0 .. lengths[b] - 1``. A fully padded item is given length 1
    so that ``pack_padded_sequence`` accepts it; its outputs are padding anyway.
    """
    return mask.sum(dim=1).clamp(min=1).to(device="cpu", dtype=torch.int64)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` over the channels of ``(B, C, T)`` whose training statistics skip padding.

    In training mode the batch mean/variance (and the running estimates) are computed from the
    valid frames only, so padded frames cannot shift the normalisation of real ones; padded
    output frames are set to zero. In eval mode it is the plain running-statistics affine map.
    The parameters and buffers are those of ``nn.BatchNorm1d`` (checkpoints are compatible).
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if mask is None:
            return super().forward(x)
        flat = rearrange(x, "b c t -> (b t) c")
        out = masked_batch_norm(self, flat, rearrange(mask, "b t -> (b t)"))
        return rearrange(out, "(b t) c -> b c t", b=x.shape[0])
