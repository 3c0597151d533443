"""Reliability-aware mixture of experts (``moe_gate``) and the ``modality_stack`` fusion.

The gate contract weighs the ``S`` *steps* of each stream (weights ``(B, T, S)`` summing to 1
per frame). A mixture over *modalities* therefore needs the modalities as the steps of one
stream: the ``modality_stack`` fusion projects every modality to a common width and stacks
them, ``{m: (B, T, D_m)} -> {"modalities": (B, T, M, d)}`` (steps in sorted modality order),
and ``moe_gate`` reports its per-frame modality weights as ``weights["modalities"]``. On any
other fusion the experts are the steps of each stream (e.g. the recursion steps of ``rjca``).

``moe_gate``, per stream ``s`` and step (expert) ``i`` with features ``x_i``: ``(B, T, D_s)``::

    r_i   = [LN(x_i) || log(mean_D(x_i^2) + 1e-6)]                 (B, T, D_s + 1)
    h_i   = GELU(r_i W_r^i + b)                                    (B, T, H_r)
    h_i   = causal depthwise Conv1d_k(h_i)   (only if context k > 1; frames t-k+1..t)
    l_i   = h_i w_i + c_i                                          (B, T)   reliability logit
    pi    = softmax_i(l / tau)                                     (B, T, S) = weights[s]
    E_i   = x_i + Drop(GELU(LN(x_i) W_1^i) W_2^i)                  (B, T, D_s) expert i
    fused = sum_i pi_i E_i                                         (B, T, D_s)

Streams are concatenated in sorted order: ``features`` is ``(B, T, sum D_s)``. The reliability
estimate reads the frame's own features (and ``k - 1`` past frames), never the future, so
padding at the end of a window cannot reach a valid frame; with ``context: 1`` the gate is
frame-local.
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from fusionkit.plugin import GateOutput, Params, ShapeError, check_shape, check_shapes, register
from fusionkit_peers._attention import check_modalities

__all__ = [
    "Expert",
    "MoEGate",
    "MoEGateParams",
    "ModalityStackFusion",
    "ModalityStackParams",
    "ReliabilityScorer",
    "build_modality_stack",
    "build_moe_gate",
]

STACK = "modalities"


# ------------------------------------------------------------------------ modality_stack


class ModalityStackParams(Params):
    """Parameters of the ``modality_stack`` fusion."""

    dim: int = Field(64, ge=1, le=4096, description="common width d every modality is mapped to")
    layer_norm: bool = Field(True, description="LayerNorm each projected modality")


class ModalityStackFusion(nn.Module):
    """Modalities as the steps of one stream: ``{m: (B, T, D_m)} -> {"modalities": (B, T, M, d)}``.

    Step ``i`` is ``LN(x_m W_m + b_m)`` of the ``i``-th modality in sorted order
    (:attr:`step_names`).
    """

    fixed_length = None
    frame_local = True

    def __init__(self, params: ModalityStackParams, in_dims: dict[str, int]) -> None:
        super().__init__()
        if len(in_dims) < 2:
            raise ShapeError(
                f"fusion 'modality_stack' needs at least two modalities; received {sorted(in_dims)}"
            )
        self.step_names = sorted(in_dims)
        self.in_dims = {m: int(in_dims[m]) for m in self.step_names}
        self.num_steps = len(self.step_names)
        self.out_dims = {STACK: params.dim}
        self.proj = nn.ModuleDict({m: nn.Linear(d, params.dim) for m, d in self.in_dims.items()})
        self.norm = nn.ModuleDict(
            {
                m: nn.LayerNorm(params.dim) if params.layer_norm else nn.Identity()
                for m in self.step_names
            }
        )

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        check_modalities("fusion 'modality_stack'", feats, mask, self.in_dims)
        steps = [self.norm[m](self.proj[m](feats[m])) for m in self.step_names]
        return {STACK: torch.stack(steps, dim=2)}


# ------------------------------------------------------------------------------ moe_gate


class MoEGateParams(Params):
    """Parameters of the ``moe_gate`` gate."""

    hidden: int = Field(64, ge=1, le=4096, description="hidden size of each expert's MLP")
    reliability_hidden: int = Field(
        32, ge=1, le=4096, description="hidden size H_r of each reliability scorer"
    )
    context: int = Field(
        1,
        ge=1,
        le=301,
        description="frames the reliability scorer reads: the current one and context - 1 "
        "past frames (causal); 1 = frame-local",
    )
    temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="softmax temperature tau of the expert weights"
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on each expert's MLP branch")


class ReliabilityScorer(nn.Module):
    """Per-frame reliability logit of one expert's input: ``(B, T, D) -> (B, T)``."""

    def __init__(self, dim: int, hidden: int, context: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.inp = nn.Linear(dim + 1, hidden)
        self.context = context
        self.conv = nn.Conv1d(hidden, hidden, context, groups=hidden) if context > 1 else None
        self.score = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        energy = torch.log(x.float().pow(2).mean(dim=-1, keepdim=True) + 1e-6).to(x.dtype)
        h = F.gelu(self.inp(torch.cat([self.norm(x), energy], dim=-1)))
        if self.conv is not None:  # causal: left padding only
            h = rearrange(h, "b t c -> b c t")
            h = rearrange(self.conv(F.pad(h, (self.context - 1, 0))), "b c t -> b t c")
        return rearrange(self.score(h), "b t 1 -> b t")


class Expert(nn.Module):
    """Residual MLP expert ``x + Drop(GELU(LN(x) W_1) W_2)``: ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class MoEGate(nn.Module):
    """Reliability-weighted mixture of the step experts of each stream.

    ``{s: (B, T, S, D_s)} -> GateOutput((B, T, sum D_s), {s: (B, T, S)})``.
    """

    def __init__(self, params: MoEGateParams, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__()
        if not in_dims:
            raise ShapeError("gate 'moe_gate' needs at least one stream; got none")
        self.streams = sorted(in_dims)
        self.in_dims = {s: int(in_dims[s]) for s in self.streams}
        self.num_steps = int(num_steps)
        self.out_dim = sum(self.in_dims.values())
        self.temperature = params.temperature
        self.frame_local = params.context == 1
        self.scorers = nn.ModuleDict(
            {
                s: nn.ModuleList(
                    ReliabilityScorer(d, params.reliability_hidden, params.context)
                    for _ in range(self.num_steps)
                )
                for s, d in self.in_dims.items()
            }
        )
        self.experts = nn.ModuleDict(
            {
                s: nn.ModuleList(
                    Expert(d, params.hidden, params.dropout) for _ in range(self.num_steps)
                )
                for s, d in self.in_dims.items()
            }
        )

    def _check(self, stacks: dict[str, Tensor], mask: Tensor) -> None:
        if set(stacks) != set(self.streams):
            raise ShapeError(
                f"gate 'moe_gate' expected streams {self.streams}; received {sorted(stacks)}"
            )
        sizes = {s: {"s": self.num_steps, "d": d} for s, d in self.in_dims.items()}
        bt = check_shapes("gate 'moe_gate'", stacks, "b t s d", sizes)
        check_shape("gate 'moe_gate'", "mask", mask, "b t", **bt)

    def forward(self, stacks: dict[str, Tensor], mask: Tensor) -> GateOutput:
        """``stacks``: ``{s: (B, T, S, D_s)}``, ``mask``: ``(B, T)`` -> ``GateOutput``."""
        self._check(stacks, mask)
        feats, weights = [], {}
        for s in self.streams:  # streams and experts, not frames
            steps = stacks[s].unbind(dim=2)
            logits = torch.stack([f(x) for f, x in zip(self.scorers[s], steps, strict=True)], -1)
            w = torch.softmax(logits.float() / self.temperature, dim=-1)  # b t s
            out = torch.stack([e(x) for e, x in zip(self.experts[s], steps, strict=True)], 2)
            feats.append(einsum(w.to(out.dtype), out, "b t s, b t s d -> b t d"))
            weights[s] = w
        return GateOutput(features=torch.cat(feats, dim=-1), weights=weights)


@register("fusion", "modality_stack")
def build_modality_stack(
    params: ModalityStackParams, *, in_dims: dict[str, int]
) -> ModalityStackFusion:
    """Each modality projected to a common width, stacked as the steps of one stream."""
    return ModalityStackFusion(params, in_dims)


@register("gate", "moe_gate")
def build_moe_gate(params: MoEGateParams, *, in_dims: dict[str, int], num_steps: int) -> MoEGate:
    """Reliability-aware mixture of experts: per-frame reliability weights over the experts."""
    return MoEGate(params, in_dims, num_steps)
