"""Leader-follower attentive fusion (``lfan``, the ABAW2/ABAW3 lineage of RJCA and TAGF).

One modality leads (default video); per frame its features query the *channels* of that frame:
one key/value token per modality (the followers, and the leader itself when
``attend_leader``). The attended feature is kept next to the leader's own, so the leader's
representation always reaches the head and a follower contributes only what the attention lets
through. Per frame ``t`` (``x_m``: ``(B, T, D_m)``, ``C`` the attended modalities, ``d`` the
attention width split into ``H`` heads of ``d / H``)::

    q     = LN(x_lead) W_q                                   (B, T, H, d/H)
    k_m   = LN(x_m) W_k^m,   v_m = LN(x_m) W_v^m             (B, T, H, d/H)   m in C
    alpha = softmax_m(q . k_m / sqrt(d/H))                   (B, T, H, |C|)   over channels
    a     = [sum_m alpha_m v_m]_heads W_o                    (B, T, d)
    fused = [x_lead || Dropout(a)]                           (B, T, D_lead + d)

The output is one stream ``fused`` with ``S = 1``: ``{"fused": (B, T, 1, D_lead + d)}``.
Every operation is per frame (``frame_local``), so padding never reaches a valid frame and a
streaming predictor computes it for the newest frame only.
"""

from __future__ import annotations

import math

import torch
from einops import einsum, rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from fusionkit.plugin import Params, ShapeError, register
from fusionkit_peers._attention import check_modalities

__all__ = ["LFANFusion", "LFANParams", "build_lfan"]


class LFANParams(Params):
    """Parameters of the ``lfan`` fusion."""

    leader: str = Field(
        "video", min_length=1, max_length=64, description="the leading modality (the query)"
    )
    dim: int = Field(64, ge=1, le=4096, description="attention width d (all heads together)")
    heads: int = Field(4, ge=1, le=64, description="attention heads H; d must be divisible by H")
    attend_leader: bool = Field(
        True,
        description="the leader's own channel is among the keys; false needs at least two "
        "followers (one alone would get a constant weight of 1)",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the attended feature")

    @model_validator(mode="after")
    def _heads_divide(self) -> LFANParams:
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class LFANFusion(nn.Module):
    """Leader-follower attention over the modality channels of each frame.

    ``{m: (B, T, D_m)} -> {"fused": (B, T, 1, D_lead + dim)}``.

    Attributes:
        out_dims: ``{"fused": D_lead + dim}``.
        num_steps: 1.
        fixed_length: None (any window length).
        channels: the attended modalities, sorted (the leader included when ``attend_leader``).
    """

    fixed_length = None
    num_steps = 1
    frame_local = True

    def __init__(self, params: LFANParams, in_dims: dict[str, int]) -> None:
        super().__init__()
        if params.leader not in in_dims:
            raise ShapeError(
                f"fusion 'lfan': leader {params.leader!r} is not among the modalities "
                f"{sorted(in_dims)}; set params.leader to one of them"
            )
        followers = sorted(m for m in in_dims if m != params.leader)
        if not followers:
            raise ShapeError(
                f"fusion 'lfan' needs a follower besides the leader {params.leader!r}; "
                f"received only {sorted(in_dims)}"
            )
        if not params.attend_leader and len(followers) == 1:
            raise ShapeError(
                f"fusion 'lfan' with attend_leader: false attends over the followers only, and "
                f"{followers} is a single channel (a constant softmax that learns nothing); "
                "set attend_leader: true or add modalities"
            )
        self.leader = params.leader
        self.in_dims = {m: int(d) for m, d in in_dims.items()}
        self.channels = sorted([*followers, params.leader]) if params.attend_leader else followers
        self.heads = params.heads
        self.scale = 1.0 / math.sqrt(params.dim // params.heads)
        self.out_dims = {"fused": self.in_dims[self.leader] + params.dim}
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in self.in_dims.items()})
        self.query = nn.Linear(self.in_dims[self.leader], params.dim)
        self.key = nn.ModuleDict({m: nn.Linear(self.in_dims[m], params.dim) for m in self.channels})
        self.value = nn.ModuleDict(
            {m: nn.Linear(self.in_dims[m], params.dim) for m in self.channels}
        )
        self.out = nn.Linear(params.dim, params.dim)
        self.dropout = nn.Dropout(params.dropout)

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """``feats``: ``{m: (B, T, D_m)}``, ``mask``: ``(B, T)`` -> ``{"fused": (B, T, 1, D)}``."""
        check_modalities("fusion 'lfan'", feats, mask, self.in_dims)
        normed = {m: self.norm[m](x) for m, x in feats.items()}
        heads = "b t (h e) -> b t h e"
        q = rearrange(self.query(normed[self.leader]), heads, h=self.heads)
        k = torch.stack([self.key[m](normed[m]) for m in self.channels], dim=2)  # b t c d
        v = torch.stack([self.value[m](normed[m]) for m in self.channels], dim=2)
        k = rearrange(k, "b t c (h e) -> b t h c e", h=self.heads)
        v = rearrange(v, "b t c (h e) -> b t h c e", h=self.heads)
        scores = einsum(q, k, "b t h e, b t h c e -> b t h c") * self.scale
        alpha = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        attended = rearrange(
            einsum(alpha, v, "b t h c, b t h c e -> b t h e"), "b t h e -> b t (h e)"
        )
        fused = torch.cat([feats[self.leader], self.dropout(self.out(attended))], dim=-1)
        return {"fused": rearrange(fused, "b t d -> b t 1 d")}


@register("fusion", "lfan")
def build_lfan(params: LFANParams, *, in_dims: dict[str, int]) -> LFANFusion:
    """Leader-follower attention: the leader queries each frame's modality channels."""
    return LFANFusion(params, in_dims)
