"""Attention building blocks shared by the peer fusions.

* :class:`MaskedAttention`: multi-head attention through
  :func:`torch.nn.functional.scaled_dot_product_attention`, restricted to the keys each query
  may read (:func:`attention_mask` of a boolean ``(B, T_q, T_k)`` mask). A query row with no
  allowed key (a fully padded item) would give ``softmax`` of all ``-inf``, i.e. NaN, in the
  forward and the backward pass; such rows are computed over all keys instead and their
  attention output is set to zero before the output projection (the row's output is that
  projection's bias), so no NaN ever appears and no valid row reads a key the mask forbids.
* :func:`sinusoidal_positions`: the fixed sine/cosine position code ``(T, D)``, for any ``T``.
* :func:`check_modalities`: the modality set and shapes a fusion receives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from fusionkit.plugin import ShapeError, check_shape, check_shapes

__all__ = [
    "AttentionMask",
    "MaskedAttention",
    "attention_mask",
    "check_modalities",
    "sinusoidal_positions",
]


class MaskedAttention(nn.Module):
    """Multi-head attention ``(B, T_q, D), (B, T_k, D), (B, T_k, D) -> (B, T_q, D)``.

    ``Q = query W_q``, ``K = key W_k``, ``V = value W_v`` split into ``heads`` heads of
    ``D / heads`` features, ``softmax(Q K^T / sqrt(D / heads))`` over the allowed keys, heads
    concatenated, then ``W_o``. Dropout (training only) is on the attention weights.
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ShapeError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: AttentionMask) -> Tensor:
        """``mask``: the keys each query may read, from :func:`attention_mask`."""
        q, k, v = (
            rearrange(proj(x), "b t (h e) -> b h t e", h=self.heads)
            for proj, x in ((self.query, query), (self.key, key), (self.value, value))
        )
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask.bias.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(rearrange(out, "b h t e -> b t (h e)") * mask.has_key.to(out.dtype))


@dataclass(frozen=True)
class AttentionMask:
    """An additive attention mask and which query rows have any key (see :func:`attention_mask`).

    Attributes:
        bias: ``(B, 1, T_q, T_k)`` float32, 0 where a query may read a key, ``-inf`` elsewhere;
            a row without any allowed key is 0 everywhere (finite softmax).
        has_key: ``(B, T_q, 1)`` float32, 0 on rows without any allowed key (their output is
            zeroed), else 1.
    """

    bias: Tensor
    has_key: Tensor


def attention_mask(allowed: Tensor) -> AttentionMask:
    """The :class:`AttentionMask` of a boolean ``(B, T_q, T_k)`` mask (``True``: may read).

    Computed once per forward pass and shared by every attention call that uses the same keys;
    it stays on the device (no host synchronisation).
    """
    has_key = allowed.any(dim=-1, keepdim=True)  # b q 1
    safe = allowed | ~has_key  # a row without keys reads all of them; its output is zeroed
    bias = torch.zeros(safe.shape, device=safe.device).masked_fill(~safe, float("-inf"))
    return AttentionMask(rearrange(bias, "b q k -> b 1 q k"), has_key.float())


def sinusoidal_positions(length: int, dim: int, like: Tensor) -> Tensor:
    """``(length, dim)`` sine/cosine position code (frame ``t`` at row ``t``), dtype of ``like``.

    Columns ``2i`` hold ``sin(t / 10000^(i / ceil(dim / 2)))`` and columns ``2i + 1`` the
    cosine of the same angle (for an even ``dim``: ``10000^(2i / dim)``, the usual code).
    """
    pos = torch.arange(length, device=like.device, dtype=torch.float32)
    half = (dim + 1) // 2
    freq = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=like.device, dtype=torch.float32) / half
    )
    angle = rearrange(pos, "t -> t 1") * rearrange(freq, "f -> 1 f")
    code = rearrange(torch.stack([angle.sin(), angle.cos()], dim=-1), "t f two -> t (f two)")
    return code[:, :dim].to(like.dtype)


def check_modalities(
    who: str, feats: dict[str, Tensor], mask: Tensor, dims: dict[str, int]
) -> dict[str, int]:
    """Check ``feats`` has exactly the modalities of ``dims`` with ``(B, T, D_m)`` shapes and a
    matching ``(B, T)`` mask; returns ``{"b": B, "t": T}``."""
    if set(feats) != set(dims):
        raise ShapeError(f"{who} expected modalities {sorted(dims)}; received {sorted(feats)}")
    bt = check_shapes(who, feats, "b t d", {m: {"d": d} for m, d in dims.items()})
    check_shape(who, "mask", mask, "b t", **bt)
    return bt
