"""Gated late fusion over the step stacks of a fusion: attention over steps, then a modality gate.

Per stream ``s`` and frame (``D_s`` its feature size, ``S`` the number of steps)::

    w_s    = softmax(v_s^T tanh(W_s x_s^(i)) / temperature over i)  (B, T, S)  step weights
    p_s    = sum_i w_s^(i) x_s^(i)                                   (B, T, D_s)
    g      = sigmoid(Linear([p_1 || ... || p_n]))                    (B, T, n_streams)
    output = [g_1 p_1 || ... || g_n p_n]                             (B, T, sum D_s)

Every operation is per frame, so padding cannot reach a valid frame. The step weights are the
gate's reported ``weights``; the modality gate ``g`` scales whole streams (``modality_gate``).
"""

from __future__ import annotations

import torch
from einops import einsum, rearrange
from fusionkit.plugin import GateOutput, Params, ShapeError, register
from pydantic import Field
from torch import Tensor, nn

__all__ = ["GatedLateFusion", "GatedLateParams"]


class GatedLateParams(Params):
    """Parameters of the ``xattn_gated`` gate."""

    hidden: int = Field(32, ge=1, le=4096, description="width of the step-attention scorer")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="softmax temperature over steps")
    modality_gate: bool = Field(True, description="scale each stream by a per-frame sigmoid gate")


class GatedLateFusion(nn.Module):
    """``{s: (B, T, S, D_s)} -> GateOutput(features=(B, T, sum D_s), weights={s: (B, T, S)})``."""

    def __init__(self, params: GatedLateParams, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__()
        self.streams = sorted(in_dims)
        self.in_dims = {s: int(in_dims[s]) for s in self.streams}
        self.num_steps = int(num_steps)
        self.temperature = params.temperature
        self.out_dim = sum(self.in_dims.values())
        self.scorer = nn.ModuleDict(
            {
                # no bias on the last Linear: a softmax over steps ignores a constant shift, so
                # that bias would never get a gradient (`fusionkit plugins check` reports it)
                s: nn.Sequential(
                    nn.Linear(d, params.hidden), nn.Tanh(), nn.Linear(params.hidden, 1, bias=False)
                )
                for s, d in self.in_dims.items()
            }
        )
        self.gate = nn.Linear(self.out_dim, len(self.streams)) if params.modality_gate else None

    def forward(self, stacks: dict[str, Tensor], mask: Tensor) -> GateOutput:
        """``stacks``: ``{s: (B, T, S, D_s)}``, ``mask``: ``(B, T)`` -> :class:`GateOutput`."""
        got = {s: tuple(x.shape) for s, x in stacks.items()}
        want = {s: (..., self.num_steps, d) for s, d in self.in_dims.items()}
        if set(got) != set(self.streams) or any(
            len(got[s]) != 4 or got[s][2:] != want[s][1:] for s in self.streams
        ):
            expected = {s: f"(B, T, S={self.num_steps}, {d})" for s, d in self.in_dims.items()}
            raise ShapeError(f"gate 'xattn_gated' expected {expected}; got {got}")
        pooled, weights = [], {}
        for s in self.streams:
            scores = rearrange(self.scorer[s](stacks[s]), "b t s 1 -> b t s").float()
            w = torch.softmax(scores / self.temperature, dim=-1)
            pooled.append(einsum(w.to(stacks[s].dtype), stacks[s], "b t s, b t s d -> b t d"))
            weights[s] = w
        if self.gate is not None:
            g = torch.sigmoid(self.gate(torch.cat(pooled, dim=-1)))
            pooled = [p * g[..., i : i + 1] for i, p in enumerate(pooled)]
        return GateOutput(features=torch.cat(pooled, dim=-1), weights=weights)


@register("gate", "xattn_gated")
def build_gated(
    params: GatedLateParams, *, in_dims: dict[str, int], num_steps: int
) -> GatedLateFusion:
    """Gated late fusion: attention over steps, sigmoid gate per modality."""
    return GatedLateFusion(params, in_dims, num_steps)
