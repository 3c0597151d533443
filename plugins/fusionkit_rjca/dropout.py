"""Dropout with cheaper random numbers on the CPU.

``nn.Dropout`` on the CPU draws its mask with ``bernoulli_(1 - p)``: one double-precision
uniform (two 32-bit Mersenne-Twister outputs) per element, on one thread. In the released
TAGF model at the released shapes that is about 19 million draws per training step (dropout
on the RJCA correlations and residual branches and on the gate encoder input), a serial cost
that does not shrink with more threads. Here the mask is ``rand < 1 - p`` with float32 uniforms
(one 32-bit output per element): the same distribution (keep probability ``1 - p`` to within
``2^-24``, kept units scaled by ``1 / (1 - p)``), about half the cost, different draws. On
other devices ``nn.Dropout``'s own kernels are used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FastDropout", "dropout", "dropout_noise"]


def dropout_noise(shape: tuple[int, ...], p: float, *, device: torch.device, dtype: torch.dtype):
    """The multiplier of dropout: ``1 / (1 - p)`` with probability ``1 - p``, else 0."""
    keep = 1.0 - p
    if device.type == "cpu":
        noise = torch.rand(shape, device=device).lt_(keep)
    else:
        noise = torch.empty(shape, device=device).bernoulli_(keep)
    return noise.div_(keep).to(dtype)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout(x, p, training)`` with :func:`dropout_noise`'s mask on the CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p == 1.0:
        return F.dropout(x, p, training)
    return x * dropout_noise(tuple(x.shape), p, device=x.device, dtype=x.dtype)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (same parameters, no state) drawing its CPU mask with :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)
