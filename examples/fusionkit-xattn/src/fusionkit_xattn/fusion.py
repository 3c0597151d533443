"""Cross-modal transformer fusion: each modality's frames attend to the other modalities' frames.

Shapes (``B`` batch, ``T`` frames, ``d`` = ``params.dim``, ``L`` = ``params.layers``)::

    inputs   {m: (B, T, D_m)}
    h_m^0  = LayerNorm(Linear_m(x_m))                       (B, T, d)
    h_m^l  = h_m^(l-1) + CrossAttn(h_m^(l-1), others^(l-1)) then + FFN     (B, T, d)
    output   {m: stack(h_m^0, ..., h_m^L)}                 (B, T, L + 1, d)

``others`` is the concatenation along time of every other modality's frames. Padded frames
(``mask`` False) are never attended to, and with ``window`` set a frame only attends to frames
at most ``window`` frames away, so the fusion works for any window length ``T``.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from fusionkit.plugin import Params, ShapeError, register
from pydantic import Field, model_validator
from torch import Tensor, nn

__all__ = ["CrossModalBlock", "XAttnFusion", "XAttnParams"]


class XAttnParams(Params):
    """Parameters of the ``xattn`` fusion."""

    dim: int = Field(
        64, ge=8, le=4096, description="model width d; every modality is projected to it"
    )
    heads: int = Field(4, ge=1, le=64, description="attention heads; must divide dim")
    layers: int = Field(
        2, ge=1, le=12, description="cross-attention blocks; the output stack has layers + 1 steps"
    )
    ff_mult: int = Field(
        2, ge=1, le=8, description="hidden size of the feed-forward = ff_mult * dim"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on attention and feed-forward")
    window: int | None = Field(
        None,
        ge=1,
        description="if set, frame t attends only to frames t-window .. t+window; null: all frames",
    )

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> XAttnParams:
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        return self


class CrossModalBlock(nn.Module):
    """Pre-norm cross-attention (queries: one modality; keys/values: the others) + FFN.

    ``query (B, Tq, d), context (B, Tk, d), allowed (B, Tq, Tk) bool -> (B, Tq, d)``.
    """

    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ff_mult * dim, dim),
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, query: Tensor, context: Tensor, allowed: Tensor) -> Tensor:
        q = rearrange(self.q(self.norm_q(query)), "b t (h e) -> b h t e", h=self.heads)
        k, v = rearrange(
            self.kv(self.norm_kv(context)), "b s (two h e) -> two b h s e", two=2, h=self.heads
        )
        scores = torch.einsum("bhte,bhse->bhts", q, k).float() / math.sqrt(q.shape[-1])
        # A large finite negative (not -inf): a query with no allowed key (a padded frame) gets
        # finite garbage instead of NaN, and masked keys get a weight of exactly 0.
        scores = scores.masked_fill(
            ~rearrange(allowed, "b t s -> b 1 t s"), torch.finfo(scores.dtype).min
        )
        attn = self.drop(torch.softmax(scores, dim=-1)).to(v.dtype)
        mixed = rearrange(torch.einsum("bhts,bhse->bhte", attn, v), "b h t e -> b t (h e)")
        h = query + self.drop(self.out(mixed))
        return h + self.drop(self.ff(h))


class XAttnFusion(nn.Module):
    """``{m: (B, T, D_m)} -> {m: (B, T, layers + 1, dim)}`` by cross-modal attention.

    Attributes:
        out_dims: modality -> ``dim`` (one output stream per modality).
        num_steps: ``layers + 1`` (the projected input, then one step per block).
        fixed_length: ``None``: any window length works.
    """

    fixed_length = None

    def __init__(self, params: XAttnParams, in_dims: dict[str, int]) -> None:
        super().__init__()
        if len(in_dims) < 2:
            raise ShapeError(
                "fusion 'xattn' needs at least two modalities to attend across; "
                f"got {sorted(in_dims)}"
            )
        self.modalities = sorted(in_dims)
        self.in_dims = {m: int(in_dims[m]) for m in self.modalities}
        self.window = params.window
        self.out_dims = {m: params.dim for m in self.modalities}
        self.num_steps = params.layers + 1
        self.embed = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, params.dim), nn.LayerNorm(params.dim))
                for m, d in self.in_dims.items()
            }
        )
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    m: CrossModalBlock(params.dim, params.heads, params.ff_mult, params.dropout)
                    for m in self.modalities
                }
            )
            for _ in range(params.layers)
        )

    def _check(self, feats: dict[str, Tensor], mask: Tensor) -> None:
        got = {m: tuple(x.shape) for m, x in feats.items()}
        want = {m: f"(B, T, {d})" for m, d in self.in_dims.items()}
        if set(feats) != set(self.modalities):
            raise ShapeError(
                f"fusion 'xattn' expected modalities {self.modalities}; got {sorted(feats)}"
            )
        if any(len(s) != 3 or s[2] != self.in_dims[m] for m, s in got.items()):
            raise ShapeError(f"fusion 'xattn' expected {want}; got {got}")
        if (
            len({s[:2] for s in got.values()}) != 1
            or tuple(mask.shape) != got[self.modalities[0]][:2]
        ):
            raise ShapeError(
                "fusion 'xattn' needs one (B, T) for all modalities and the mask; "
                f"got {got}, mask {tuple(mask.shape)}"
            )

    def _allowed(self, mask: Tensor, n_context: int) -> Tensor:
        """``(B, T, n_context * T)``: valid context frames within the window of each query."""
        t = mask.shape[1]
        keys = mask.repeat(1, n_context)  # b (n t)
        allowed = rearrange(keys, "b s -> b 1 s").expand(-1, t, -1)
        if self.window is not None:
            pos = torch.arange(t, device=mask.device)
            near = (pos[:, None] - pos[None, :]).abs() <= self.window  # t t
            allowed = allowed & near.repeat(1, n_context)
        return allowed

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """``feats``: ``{m: (B, T, D_m)}``, ``mask``: ``(B, T)`` bool -> ``{m: (B, T, S, dim)}``."""
        self._check(feats, mask)
        h = {m: self.embed[m](feats[m]) for m in self.modalities}
        allowed = self._allowed(mask, len(self.modalities) - 1)
        history = {m: [x] for m, x in h.items()}
        for block in self.blocks:
            h = {
                m: block[m](
                    h[m], torch.cat([h[o] for o in self.modalities if o != m], dim=1), allowed
                )
                for m in self.modalities
            }
            for m, x in h.items():
                history[m].append(x)
        return {m: torch.stack(steps, dim=2) for m, steps in history.items()}


@register("fusion", "xattn")
def build_xattn(params: XAttnParams, *, in_dims: dict[str, int]) -> XAttnFusion:
    """Cross-modal transformer: each modality attends to the others; stack per block."""
    return XAttnFusion(params, in_dims)
