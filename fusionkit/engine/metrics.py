"""Metrics and losses for continuous valence/arousal.

CCC follows Lin's definition with population (divisor ``N``) moments, as the Aff-Wild2 / ABAW
organisers compute it::

    ccc(x, y) = 2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))**2)

The ABAW metric concatenates all valid frames of all videos and computes one CCC per target.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ccc", "ccc_loss", "pcc", "regression_metrics", "rmse"]


def _masked_moments(pred: Tensor, target: Tensor, mask: Tensor | None, dim: int):
    if mask is None:
        mask = torch.ones_like(pred, dtype=torch.bool)
    w = mask.to(pred.dtype)
    n = w.sum(dim).clamp_min(1.0)
    mp = (pred * w).sum(dim) / n
    mt = (target * w).sum(dim) / n
    dp = (pred - mp.unsqueeze(dim)) * w
    dt = (target - mt.unsqueeze(dim)) * w
    vp = (dp * dp).sum(dim) / n
    vt = (dt * dt).sum(dim) / n
    cov = (dp * dt).sum(dim) / n
    return mp, mt, vp, vt, cov, w.sum(dim)


def ccc(pred: Tensor, target: Tensor, mask: Tensor | None = None, dim: int = -1) -> Tensor:
    """Concordance correlation coefficient along ``dim`` over frames where ``mask`` is True.

    Population moments (divisor N). A reduction with no valid frame gives NaN.

    >>> float(ccc(torch.tensor([0.0, 1, 2]), torch.tensor([0.0, 1, 1])))  # doctest: +ELLIPSIS
    0.666...
    """
    mp, mt, vp, vt, cov, n = _masked_moments(pred, target, mask, dim)
    denom = vp + vt + (mp - mt) ** 2
    out = 2.0 * cov / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


def ccc_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``1 - CCC`` per window on valid frames, averaged over windows and targets.

    Args:
        pred, target: ``(B, T, n_targets)``.
        mask: ``(B, T)`` bool; windows without any valid frame are ignored.
    """
    m = mask.unsqueeze(-1).expand_as(pred)
    mp, mt, vp, vt, cov, n = _masked_moments(pred.float(), target.float(), m, dim=1)
    c = 2.0 * cov / (vp + vt + (mp - mt) ** 2 + 1e-8)
    has = (n > 0).float()
    return ((1.0 - c) * has).sum() / has.sum().clamp_min(1.0)


def pcc(pred: Tensor, target: Tensor) -> Tensor:
    """Pearson correlation of two 1-D tensors (population moments).

    As :func:`ccc`: an empty input gives NaN (there is no correlation of nothing), and a
    zero variance gives 0 (the covariance is 0 then), not a division by zero.
    """
    _mp, _mt, vp, vt, cov, n = _masked_moments(pred, target, None, -1)
    out = cov / (vp.sqrt() * vt.sqrt()).clamp_min(torch.finfo(vp.dtype).tiny)
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


def rmse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).mean().sqrt()


def regression_metrics(pred: Tensor, target: Tensor, names: tuple[str, ...]) -> dict[str, float]:
    """ABAW-style metrics on concatenated frames.

    Args:
        pred, target: ``(N, n_targets)`` over all valid frames of all videos.
        names: target names, e.g. ``("valence", "arousal")``.

    Returns:
        ``ccc_<name>``, ``pcc_<name>``, ``rmse_<name>`` per target, ``ccc_mean`` and ``n_frames``;
        with no frame every metric is NaN (callers refuse such a split: see
        :func:`fusionkit.engine.evaluate.evaluate`).
    """
    pred = pred.double()
    target = target.double()
    out: dict[str, float] = {}
    cccs = []
    for i, name in enumerate(names):
        c = float(ccc(pred[:, i], target[:, i]))
        cccs.append(c)
        out[f"ccc_{name}"] = c
        out[f"pcc_{name}"] = float(pcc(pred[:, i], target[:, i]))
        out[f"rmse_{name}"] = float(rmse(pred[:, i], target[:, i]))
    out["ccc_mean"] = float(sum(cccs) / len(cccs))
    out["n_frames"] = int(pred.shape[0])
    return out
