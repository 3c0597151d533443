"""Joint multimodal transformer (``jmt``, after JMT, ABAW6, arXiv 2403.10488).

Token streams: one per modality and a *joint* stream made from all modalities together. In every
layer each stream reads the other streams through key-based cross-attention, then attends over
its own frames and applies a feed-forward block (pre-norm residual blocks). With modalities
``m`` (sorted) and ``d`` the model width::

    X_m^(0) = x_m W_m + P                         (B, T, d)    P: sine/cosine positions
    X_j^(0) = [x_m1 || x_m2 || ...] W_j + P       (B, T, d)    the joint stream
    for each stream s, from the layer-(l-1) streams:
      K_s  = [LN(X_r) for r != s]                 (B, (n-1) T, d)   other streams, time-concatenated
      Y    = X_s + Drop(Attn(LN(X_s), K_s, V_s))            cross-attention (keys: other streams)
      Y    = Y + Drop(Attn(LN(Y), LN(Y), LN(Y)))             self-attention over time
      X_s^(l) = Y + Drop(FFN(LN(Y)))                         FFN: Linear-GELU-Linear

``values: source`` reads the values from the other streams (``V_s = K_s``); ``values: query``
keeps the query stream's own values at the key's frame (the attention pattern is cross-modal,
the content is the stream's own). A key of a padded frame is never attended (boolean mask;
a row with no allowed key gives the output projection's bias, never NaN), and with
``causal`` frame ``t`` reads frames ``<= t`` only. The fusion returns, per stream, the stack
of its layer outputs ``[X^(0), ..., X^(L)]``: ``{m: (B, T, L + 1, d), "joint": (B, T, L + 1, d)}``.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange, repeat
from pydantic import Field, model_validator
from torch import Tensor, nn

from fusionkit.plugin import Params, ShapeError, register
from fusionkit_peers._attention import (
    AttentionMask,
    MaskedAttention,
    attention_mask,
    check_modalities,
    sinusoidal_positions,
)

__all__ = ["JMTFusion", "JMTLayer", "JMTParams", "build_jmt"]

JOINT = "joint"


class JMTParams(Params):
    """Parameters of the ``jmt`` fusion."""

    dim: int = Field(64, ge=1, le=4096, description="model width d of every token stream")
    heads: int = Field(4, ge=1, le=64, description="attention heads; dim must be divisible by it")
    layers: int = Field(
        2, ge=1, le=16, description="JMT layers L; the fusion stacks the input and every layer"
    )
    ffn_factor: int = Field(2, ge=1, le=16, description="feed-forward hidden size = ffn_factor * d")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the residual branches")
    attention_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the attention weights (costly on CPU: a (B, H, T, T) draw)",
    )
    values: Literal["source", "query"] = Field(
        "source",
        description="'source': values come from the attended (other) streams; 'query': the "
        "query stream's own values at the key's frame (only the keys are exchanged)",
    )
    positional: bool = Field(True, description="add sine/cosine frame positions to every stream")
    causal: bool = Field(False, description="frame t attends to frames <= t only")

    @model_validator(mode="after")
    def _heads_divide(self) -> JMTParams:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class JMTLayer(nn.Module):
    """One JMT layer over the streams ``{s: (B, T, d)}`` (see the module docstring)."""

    def __init__(self, streams: list[str], params: JMTParams) -> None:
        super().__init__()
        d, h, p, pa = params.dim, params.heads, params.dropout, params.attention_dropout
        self.streams = streams
        self.values = params.values
        self.norm_q = nn.ModuleDict({s: nn.LayerNorm(d) for s in streams})
        self.norm_kv = nn.ModuleDict({s: nn.LayerNorm(d) for s in streams})
        self.norm_self = nn.ModuleDict({s: nn.LayerNorm(d) for s in streams})
        self.norm_ffn = nn.ModuleDict({s: nn.LayerNorm(d) for s in streams})
        self.cross = nn.ModuleDict({s: MaskedAttention(d, h, pa) for s in streams})
        self.self_attn = nn.ModuleDict({s: MaskedAttention(d, h, pa) for s in streams})
        self.ffn = nn.ModuleDict(
            {
                s: nn.Sequential(
                    nn.Linear(d, params.ffn_factor * d),
                    nn.GELU(),
                    nn.Dropout(p),
                    nn.Linear(params.ffn_factor * d, d),
                )
                for s in streams
            }
        )
        self.drop = nn.Dropout(p)

    def forward(
        self, xs: dict[str, Tensor], cross_mask: AttentionMask, self_mask: AttentionMask
    ) -> dict[str, Tensor]:
        """``cross_mask``: keys ``(n-1) T`` (the other streams); ``self_mask``: keys ``T``."""
        kv = {s: self.norm_kv[s](x) for s, x in xs.items()}
        new = {}
        for s in self.streams:  # the streams, not frames
            others = torch.cat([kv[r] for r in self.streams if r != s], dim=1)
            q = self.norm_q[s](xs[s])
            if self.values == "source":
                values = others
            else:
                values = repeat(q, "b t d -> b (n t) d", n=len(self.streams) - 1)
            y = xs[s] + self.drop(self.cross[s](q, others, values, cross_mask))
            z = self.norm_self[s](y)
            y = y + self.drop(self.self_attn[s](z, z, z, self_mask))
            new[s] = y + self.drop(self.ffn[s](self.norm_ffn[s](y)))
        return new


class JMTFusion(nn.Module):
    """Joint multimodal transformer ``{m: (B, T, D_m)} -> {s: (B, T, L + 1, d)}``.

    Attributes:
        out_dims: one stream per modality and ``joint``, each of width ``d``.
        num_steps: ``L + 1`` (the projected input and every layer).
        fixed_length: None (any window length).
    """

    fixed_length = None

    def __init__(self, params: JMTParams, in_dims: dict[str, int]) -> None:
        super().__init__()
        if len(in_dims) < 2:
            raise ShapeError(
                f"fusion 'jmt' needs at least two modalities; received {sorted(in_dims)}"
            )
        if JOINT in in_dims:
            raise ShapeError(
                f"fusion 'jmt' names its joint stream {JOINT!r}; a modality has that name"
            )
        self.modalities = sorted(in_dims)
        self.in_dims = {m: int(in_dims[m]) for m in self.modalities}
        self.streams = [*self.modalities, JOINT]
        self.out_dims = {s: params.dim for s in self.streams}
        self.num_steps = params.layers + 1
        self.positional = params.positional
        self.causal = params.causal
        self.embed = nn.ModuleDict({m: nn.Linear(d, params.dim) for m, d in self.in_dims.items()})
        self.embed_joint = nn.Linear(sum(self.in_dims.values()), params.dim)
        self.layers = nn.ModuleList(JMTLayer(self.streams, params) for _ in range(params.layers))

    def _masks(self, mask: Tensor) -> tuple[AttentionMask, AttentionMask]:
        """Key masks over the other streams ``(B, T, (n-1) T)`` and the own one ``(B, T, T)``."""
        t = mask.shape[1]
        allowed = repeat(mask, "b k -> b q k", q=t)
        if self.causal:
            frames = torch.arange(t, device=mask.device)
            allowed = allowed & (frames[None, :, None] >= frames[None, None, :])
        cross = repeat(allowed, "b q k -> b q (n k)", n=len(self.streams) - 1)
        return attention_mask(cross), attention_mask(allowed)

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """``feats``: ``{m: (B, T, D_m)}``, ``mask``: ``(B, T)`` -> ``{s: (B, T, L + 1, d)}``."""
        check_modalities("fusion 'jmt'", feats, mask, self.in_dims)
        xs = {m: self.embed[m](feats[m]) for m in self.modalities}
        xs[JOINT] = self.embed_joint(torch.cat([feats[m] for m in self.modalities], dim=-1))
        if self.positional:
            t = mask.shape[1]
            xs = {s: x + sinusoidal_positions(t, x.shape[-1], x) for s, x in xs.items()}
        cross, own = self._masks(mask)
        history = {s: [x] for s, x in xs.items()}
        for layer in self.layers:  # the layers are the only loop
            xs = layer(xs, cross, own)
            for s, x in xs.items():
                history[s].append(x)
        return {s: rearrange(torch.stack(h), "l b t d -> b t l d") for s, h in history.items()}


@register("fusion", "jmt")
def build_jmt(params: JMTParams, *, in_dims: dict[str, int]) -> JMTFusion:
    """Joint multimodal transformer: modality and joint streams, key-based cross-attention."""
    return JMTFusion(params, in_dims)
