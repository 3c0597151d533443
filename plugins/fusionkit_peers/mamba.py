"""Selective state-space (Mamba-style) temporal encoder in plain PyTorch (``mamba``).

``(B, T, F) -> (B, T, dim)``: ``x = x_in W_in``, then ``layers`` pre-norm residual blocks
``x <- x + Drop(Mixer(LN(x)))`` and a final ``LN``. One mixer, with ``E = expand * dim``
channels, ``N`` state size per channel and ``R`` the rank of the step-size projection::

    u, z  = split(x W_x)                               (B, T, E) each
    u     = SiLU(CausalDepthwiseConv1d_k(u))           frames t-k+1..t
    dt, B, C = split(u W_p)                            (B, T, R), (B, T, N), (B, T, N)
    Delta = softplus(dt W_dt + b_dt)                   (B, T, E)   input-dependent step
    A     = -exp(A_log)                                (E, N)      A_log = log(1..N) at init
    h_t   = exp(Delta_t A) * h_{t-1} + Delta_t B_t u_t (B, E, N)   selective scan, h_{-1} = 0
    y_t   = h_t C_t + D * u_t                          (B, E)
    out   = (y * SiLU(z)) W_out                        (B, T, dim)

The scan runs in float32 (also under autocast) in chunks: within every chunk of ``chunk``
frames the recurrence runs for all chunks at once, then the chunk-end states are carried
across chunks, ``chunk + T / chunk`` sequential steps in all (``chunk: 1`` is the plain
frame-by-frame scan); only products of decays ``exp(Delta A) <= 1`` are formed, so it cannot
overflow. Everything is causal and padded input frames are zeroed first, so padding at the end
of a window never reaches a valid frame. :meth:`MambaEncoder.step` is the O(1)-per-frame
streaming form (conv buffer and SSM state per block); a stream of steps equals ``forward`` on
the whole sequence. The receptive field is unbounded (the state carries the whole past).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import einsum, rearrange
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from fusionkit.plugin import Params, check_mask, check_shape, register

__all__ = [
    "UNBOUNDED",
    "MambaBlock",
    "MambaEncoder",
    "MambaParams",
    "MambaState",
    "build_mamba",
    "selective_scan",
]

#: ``receptive_field`` of an encoder whose output depends on every past frame.
UNBOUNDED = 2**31 - 1


class MambaParams(Params):
    """Parameters of the ``mamba`` encoder."""

    dim: int = Field(64, ge=1, le=4096, description="model width, also the output size")
    layers: int = Field(2, ge=1, le=32, description="stacked residual Mamba blocks")
    state: int = Field(16, ge=1, le=256, description="SSM state size N per channel")
    expand: int = Field(2, ge=1, le=8, description="inner channels E = expand * dim")
    conv: int = Field(4, ge=1, le=64, description="kernel of the causal depthwise convolution")
    dt_rank: int | None = Field(
        None, ge=1, le=4096, description="rank R of the step-size projection (None: ceil(dim/16))"
    )
    dt_min: float = Field(
        1e-3, gt=0.0, le=1.0, description="smallest initial step size Delta (log-uniform init)"
    )
    dt_max: float = Field(
        0.1, gt=0.0, le=10.0, description="largest initial step size Delta (log-uniform init)"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on each block's output")
    chunk: int = Field(
        16, ge=1, le=4096, description="frames per scan chunk (1 = plain sequential scan)"
    )


def selective_scan(
    decay: Tensor, inject: Tensor, readout: Tensor, chunk: int, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``h_t = decay_t * h_{t-1} + inject_t``, ``y_t = sum_n h_t[..., n] readout_t[n]``.

    Args:
        decay, inject: ``(B, T, E, N)`` float32; ``decay`` in ``[0, 1]``.
        readout: ``(B, T, N)``.
        chunk: frames per chunk.
        h0: ``(B, E, N)`` state before the first frame (zero if None).

    Returns:
        ``y`` ``(B, T, E)`` and the state after the last frame ``(B, E, N)``.
    """
    b, t, e, n = decay.shape
    pad = (-t) % chunk
    if pad:  # identity steps at the end: the state passes through unchanged
        decay = torch.cat([decay, decay.new_ones(b, pad, e, n)], dim=1)
        inject = torch.cat([inject, inject.new_zeros(b, pad, e, n)], dim=1)
    decay = rearrange(decay, "b (c l) e n -> b c l e n", l=chunk)
    inject = rearrange(inject, "b (c l) e n -> b c l e n", l=chunk)
    h = inject.new_zeros(b, decay.shape[1], e, n)
    p = decay.new_ones(b, decay.shape[1], e, n)
    local, cumulative = [], []
    # unbind, not indexing: the backward of one unbind is one stack, that of each index a
    # full-size zero tensor
    for a_i, x_i in zip(decay.unbind(2), inject.unbind(2), strict=True):  # all chunks at once
        h = a_i * h + x_i
        p = p * a_i
        local.append(h)
        cumulative.append(p)
    h_local = torch.stack(local, dim=2)  # b c l e n: state from a zero start of the chunk
    p_local = torch.stack(cumulative, dim=2)  # b c l e n: decay since the chunk's start
    carry = h0 if h0 is not None else inject.new_zeros(b, e, n)
    starts = []
    for p_j, h_j in zip(p.unbind(1), h.unbind(1), strict=True):  # across chunks, in order
        starts.append(carry)
        carry = p_j * carry + h_j
    h_all = h_local + p_local * rearrange(torch.stack(starts, dim=1), "b c e n -> b c 1 e n")
    h_all = rearrange(h_all, "b c l e n -> b (c l) e n")[:, :t]
    return einsum(h_all, readout, "b t e n, b t n -> b t e"), carry


@dataclass
class MambaState:
    """Streaming state of one block: the last ``conv - 1`` inner inputs and the SSM state."""

    conv: Tensor  # (B, E, conv - 1)
    ssm: Tensor  # (B, E, N)


class MambaBlock(nn.Module):
    """Pre-norm residual Mamba block ``(B, T, dim) -> (B, T, dim)`` (module docstring)."""

    def __init__(self, params: MambaParams) -> None:
        super().__init__()
        d, n = params.dim, params.state
        e = params.expand * d
        r = params.dt_rank or math.ceil(d / 16)
        self.inner, self.state_size, self.rank, self.kernel = e, n, r, params.conv
        self.chunk = params.chunk
        self.norm = nn.LayerNorm(d)
        self.in_proj = nn.Linear(d, 2 * e)
        self.conv = nn.Conv1d(e, e, params.conv, groups=e)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, e)
        dt = torch.exp(
            torch.rand(e) * (math.log(params.dt_max) - math.log(params.dt_min))
            + math.log(params.dt_min)
        )
        with torch.no_grad():  # softplus(bias) = dt: the initial step sizes
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1)
        )
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d)
        self.drop = nn.Dropout(params.dropout)

    def _ssm_inputs(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``u`` ``(..., E)`` -> decay, inject ``(..., E, N)`` and readout ``(..., N)``.

        The projections follow autocast; the rest is float32 with autocast off.
        """
        dt, b, c = torch.split(self.x_proj(u), [self.rank, self.state_size, self.state_size], -1)
        dt = self.dt_proj(dt)
        with torch.autocast(u.device.type, enabled=False):
            delta = F.softplus(dt.float())  # ..., e
            a = -torch.exp(self.A_log.float())  # e n
            decay = torch.exp(einsum(delta, a, "... e, e n -> ... e n"))
            inject = einsum(delta * u.float(), b.float(), "... e, ... n -> ... e n")
        return decay, inject, c.float()

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, T, dim)`` -> ``(B, T, dim)``."""
        u, z = torch.chunk(self.in_proj(self.norm(x)), 2, dim=-1)
        u = rearrange(u, "b t e -> b e t")
        u = F.silu(rearrange(self.conv(F.pad(u, (self.kernel - 1, 0))), "b e t -> b t e"))
        decay, inject, readout = self._ssm_inputs(u)
        with torch.autocast(x.device.type, enabled=False):
            y, _ = selective_scan(decay, inject, readout, self.chunk)
            y = (y + self.D.float() * u.float()) * F.silu(z.float())
        return x + self.drop(self.out_proj(y.to(u.dtype)))

    def init_stream(self, batch: int, device: torch.device | str) -> MambaState:
        conv = torch.zeros(batch, self.inner, self.kernel - 1, device=device)
        return MambaState(conv, torch.zeros(batch, self.inner, self.state_size, device=device))

    def step(self, x: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """One frame ``(B, dim)`` -> ``((B, dim), new state)`` (eval mode)."""
        u, z = torch.chunk(self.in_proj(self.norm(x)), 2, dim=-1)
        window = torch.cat([state.conv, rearrange(u, "b e -> b e 1")], dim=-1)
        u = F.silu(self.conv(window)[..., -1])
        decay, inject, readout = self._ssm_inputs(u)
        with torch.autocast(x.device.type, enabled=False):
            h = decay * state.ssm + inject
            y = einsum(h, readout, "b e n, b n -> b e") + self.D.float() * u.float()
            y = y * F.silu(z.float())
        return x + self.drop(self.out_proj(y.to(u.dtype))), MambaState(window[..., 1:], h)


class MambaEncoder(nn.Module):
    """Causal selective state-space encoder ``(B, T, F) -> (B, T, dim)``.

    Attributes:
        out_dim: ``dim``.
        receptive_field: :data:`UNBOUNDED` (output frame ``t`` depends on every frame ``<= t``).
    """

    receptive_field = UNBOUNDED

    def __init__(self, params: MambaParams, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = params.dim
        self.embed = nn.Linear(in_dim, params.dim)
        self.blocks = nn.ModuleList(MambaBlock(params) for _ in range(params.layers))
        self.norm = nn.LayerNorm(params.dim)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: ``(B, T, F)``, ``mask``: ``(B, T)`` bool -> ``(B, T, dim)``."""
        check_shape("encoder 'mamba'", "features", x, "b t f", f=self.in_dim)
        check_mask("encoder 'mamba'", x, mask)
        h = self.embed(x * rearrange(mask, "b t -> b t 1").to(x.dtype))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def init_stream(self, batch: int, device: torch.device | str = "cpu") -> list[MambaState]:
        """Zero state for :meth:`step` (the start of a sequence)."""
        return [block.init_stream(batch, device) for block in self.blocks]

    def step(self, x: Tensor, state: list[MambaState]) -> tuple[Tensor, list[MambaState]]:
        """Encode one new frame ``(B, F)`` -> ``(B, dim)`` in O(1) per frame (eval mode)."""
        h = self.embed(x)
        new = []
        for block, st in zip(self.blocks, state, strict=True):
            h, st = block.step(h, st)
            new.append(st)
        return self.norm(h), new


@register("encoder", "mamba")
def build_mamba(params: MambaParams, *, in_dim: int, modality: str) -> MambaEncoder:
    """Selective state-space (Mamba-style) causal encoder; plain PyTorch chunked scan."""
    return MambaEncoder(params, in_dim)
