"""Padding-aware building blocks that never make the host wait for the GPU.

Windows are padded at the end (``mask``: ``(B, T)``, True on real frames). The usual ways of
keeping padding out of a BatchNorm or an LSTM (``x[mask]``, ``pack_padded_sequence``,
``if mask.all():``) read tensor values on the host, so on a GPU every training step stalls
until the device has caught up. These functions give the same results with device-side
arithmetic and indices only; plugins use them, and so can third-party ones.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["masked_batch_norm", "shifted_bilstm"]


def masked_batch_norm(bn: nn.BatchNorm1d, x: Tensor, keep: Tensor) -> Tensor:
    """``bn`` over the rows of ``x`` ``(N, C)`` where ``keep`` ``(N,)`` is True.

    In training mode (or without running statistics) this equals ``bn(x[keep])`` on the kept
    rows, including the running-statistics update (skipped when fewer than 2 rows are kept,
    where ``nn.BatchNorm1d`` would raise), and puts zeros on the other rows. Otherwise it is
    ``bn(x)``: running statistics do not depend on the batch.
    """
    if not bn.training and bn.track_running_stats:
        return bn(x)
    xf = x.float()
    w = rearrange(keep, "n -> n 1").to(xf.dtype)
    n = w.sum(dim=0)  # (1,), stays on the device
    mean = (xf * w).sum(dim=0) / n.clamp(min=1)
    var = ((xf - mean) ** 2 * w).sum(dim=0) / n.clamp(min=1)  # biased, as BatchNorm normalises
    y = (xf - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    if bn.training and bn.track_running_stats:
        assert bn.running_mean is not None and bn.running_var is not None
        assert bn.num_batches_tracked is not None
        with torch.no_grad():
            update = n > 1
            bn.num_batches_tracked.add_(update.to(bn.num_batches_tracked.dtype).squeeze(0))
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / bn.num_batches_tracked.clamp(min=1).to(mean.dtype)
            else:
                factor = torch.full_like(n, bn.momentum)
            unbiased = var * n / (n - 1).clamp(min=1)
            for stat, new in ((bn.running_mean, mean), (bn.running_var, unbiased)):
                blended = stat + factor * (new.to(stat.dtype) - stat)
                stat.copy_(torch.where(update, blended, stat))
    return (y * w).to(x.dtype)


def shifted_bilstm(lstm: nn.LSTM, seq: Tensor, mask: Tensor) -> Tensor:
    """A one-layer bidirectional ``lstm`` over ``seq`` ``(B, T, D)`` as if packed by lengths.

    Padded frames reach no valid frame in either direction and come out as zeros, as with
    ``pack_padded_sequence`` (which needs the lengths on the host), and it is faster than
    packing rows of unequal lengths on the CPU.

    The forward direction reads the rows as they are (padding at the end comes after every
    valid frame). The backward direction reads each row rotated so that its padding comes
    first (``left[b, i] = seq[b, (i - pad_b) mod T]``), hence after the valid frames in its
    reading order; its outputs are rotated back. Both run in one LSTM call over ``2B`` rows
    (the unused direction of each half is discarded).
    """
    if not (lstm.bidirectional and lstm.num_layers == 1 and lstm.batch_first):
        raise ValueError(
            "shifted_bilstm needs nn.LSTM(bidirectional=True, num_layers=1, batch_first=True); "
            f"got bidirectional={lstm.bidirectional}, num_layers={lstm.num_layers}, "
            f"batch_first={lstm.batch_first}"
        )
    b, t, _ = seq.shape
    hidden = lstm.hidden_size
    pad = t - mask.sum(dim=1)  # (B,) padded frames per row
    pos = torch.arange(t, device=seq.device)
    to_left = rearrange((pos[None] - pad[:, None]) % t, "b t -> b t 1")
    to_right = rearrange((pos[None] + pad[:, None]) % t, "b t -> b t 1")
    left = torch.gather(seq, 1, to_left.expand_as(seq))
    out, _ = lstm(torch.cat([seq, left]))  # (2B, T, 2H)
    fwd = out[:b, :, :hidden]
    bwd = torch.gather(out[b:, :, hidden:], 1, to_right.expand(b, t, hidden))
    h = torch.cat([fwd, bwd], dim=-1)
    return h * rearrange(mask, "b t -> b t 1").to(h.dtype)
