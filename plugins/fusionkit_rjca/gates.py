"""Gates that merge the RJCA step stack ``{s: (B, T, S, D_s)}`` into one ``(B, T, sum D_s)``.

* ``grjca`` (as released, ABAW8): ``w = softmax(Linear_{D_s -> S}(X^(N)) / tau)`` per frame,
  ``fused = ReLU(sum_i w_i X^(i))``.
* ``tagf`` (as released, ABAW9): per frame, a BiLSTM runs over the ``S`` *steps*; its
  unit-norm encoding is averaged over features into one score per step,
  ``w = softmax(score / tau)``, ``fused = sum_i w_i X^(i)`` (no ReLU). On the CPU the encoder
  runs as one fused function (:mod:`fusionkit_rjca.step_scores`, same parameters and math).
* ``tagf_temporal`` (fusionkit reading of "time-aware"): per stream, a BiLSTM runs over
  *time* on the last step (or the step mean), ``w = softmax(Linear_{2H -> S}(h_t) / tau)``.

Streams are concatenated in sorted key order; each gate returns its per-frame weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import einsum, rearrange, reduce
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from fusionkit.plugin import (
    GateOutput,
    Params,
    ShapeError,
    check_shape,
    check_shapes,
    register,
    run_lstm,
    shifted_bilstm,
    xavier_init_,
)
from fusionkit_rjca.step_scores import step_scores

__all__ = [
    "GRJCAGate",
    "GRJCAParams",
    "StepEncoder",
    "TAGFGate",
    "TAGFParams",
    "TAGFTemporalGate",
    "TAGFTemporalParams",
    "build_grjca",
    "build_tagf",
    "build_tagf_temporal",
]


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 for the softmax, or as it is when wider (float64)."""
    return x if x.dtype == torch.float64 else x.float()


class _StackGate(nn.Module):
    """Shared validation and output assembly for gates over ``{s: (B, T, S, D_s)}``."""

    name = "gate"
    frame_local = False  # True when frame t of the output depends on frame t of the input only

    def __init__(self, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__()
        if not in_dims:
            raise ShapeError(f"gate '{self.name}' needs at least one stream; got none")
        self.streams = sorted(in_dims)
        self.in_dims = {s: int(in_dims[s]) for s in self.streams}
        self.num_steps = int(num_steps)
        self.out_dim = sum(self.in_dims.values())

    def _check(self, stacks: dict[str, Tensor], mask: Tensor) -> None:
        if set(stacks) != set(self.streams):
            raise ShapeError(
                f"gate '{self.name}' expected streams {self.streams}; received {sorted(stacks)}"
            )
        sizes = {s: {"s": self.num_steps, "d": d} for s, d in self.in_dims.items()}
        bt = check_shapes(f"gate '{self.name}'", stacks, "b t s d", sizes)
        check_shape(f"gate '{self.name}'", "mask", mask, "b t", **bt)

    def _weights(self, s: str, stack: Tensor, mask: Tensor) -> Tensor:
        """Per-frame step weights ``(B, T, S)`` of stream ``s``."""
        raise NotImplementedError

    def _post(self, fused: Tensor) -> Tensor:
        return fused

    def forward(self, stacks: dict[str, Tensor], mask: Tensor) -> GateOutput:
        """``stacks``: ``{s: (B, T, S, D_s)}``, ``mask``: ``(B, T)`` -> ``GateOutput``."""
        self._check(stacks, mask)
        feats, weights = [], {}
        for s in self.streams:  # streams, not frames
            w = self._weights(s, stacks[s], mask)
            fused = einsum(w.to(stacks[s].dtype), stacks[s], "b t s, b t s d -> b t d")
            feats.append(self._post(fused))
            weights[s] = w
        return GateOutput(features=torch.cat(feats, dim=-1), weights=weights)


# --------------------------------------------------------------------------------- grjca


class GRJCAParams(Params):
    """Parameters of the ``grjca`` gate."""

    temperature: float = Field(
        0.1, gt=0.0, le=100.0, description="softmax temperature tau (released 0.1)"
    )
    relu: bool = Field(True, description="ReLU on the gated sum (as released)")


class GRJCAGate(_StackGate):
    """GRJCA gate: per-frame ``Linear(D_s -> S)`` scores from the last step, softmax(/tau).

    ``{s: (B, T, S, D_s)} -> (B, T, sum D_s)``.
    """

    name = "grjca"
    frame_local = True

    def __init__(self, params: GRJCAParams, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__(in_dims, num_steps)
        self.temperature = params.temperature
        self.relu = params.relu
        self.score = nn.ModuleDict({s: nn.Linear(d, num_steps) for s, d in self.in_dims.items()})
        xavier_init_(self)

    def _weights(self, s: str, stack: Tensor, mask: Tensor) -> Tensor:
        logits = self.score[s](stack[:, :, -1])  # b t s
        return torch.softmax(_wide(logits) / self.temperature, dim=-1)

    def _post(self, fused: Tensor) -> Tensor:
        return torch.relu(fused) if self.relu else fused


# ---------------------------------------------------------------------------------- tagf


class TAGFParams(Params):
    """Parameters of the ``tagf`` gate (released TAGF)."""

    temperature: float = Field(
        0.1, gt=0.0, le=100.0, description="softmax temperature tau (released 0.1)"
    )
    dim_factor: int = Field(
        2, ge=1, le=16, description="step-encoder width dim = dim_factor * D_s (released 2)"
    )
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="dropout before the encoder Linear (released 0.1)"
    )


class StepEncoder(nn.Module):
    """The released gate encoder over the ``S`` steps of one frame: ``(N, S, D) -> (N, S, dim)``.

    ``h = BiLSTM(x)`` (hidden ``dim/2`` per direction, learnable ``h0``/``c0``),
    ``e = normalize(Linear([x || h]) after Dropout)`` with ``Linear(dim + D -> dim)``; every row
    of the output has unit L2 norm.
    """

    def __init__(self, in_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        if dim % 2:
            raise ShapeError(f"gate 'tagf' needs an even encoder width; got dim={dim}")
        self.hidden = dim // 2
        self.lstm = nn.LSTM(in_dim, self.hidden, bidirectional=True, batch_first=True)
        # rows: h0 forward, h0 backward, c0 forward, c0 backward
        self.init_state = nn.Parameter(nn.init.xavier_uniform_(torch.empty(4, self.hidden)))
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(dim + in_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        state = self.init_state
        h0 = rearrange(state[:2], "dir h -> dir 1 h").expand(2, n, self.hidden).contiguous()
        c0 = rearrange(state[2:], "dir h -> dir 1 h").expand(2, n, self.hidden).contiguous()
        h, _ = run_lstm(self.lstm, x, (h0, c0))
        e = self.proj(self.dropout(torch.cat([x, h], dim=-1)))
        return F.normalize(e, dim=-1)

    def scores(self, x: Tensor) -> Tensor:
        """``self(x).mean(-1)``: ``(N, S, D) -> (N, S)``, the gate's per-step scores.

        Computed by :func:`~fusionkit_rjca.step_scores.step_scores`: the same parameters and
        math, the BiLSTM over the few steps unrolled as batched products; dropout keeps the
        same rate and scale with other random draws than ``nn.Dropout`` (``rand < 1 - p``).
        """
        return step_scores(
            self.lstm, self.init_state, self.proj, x, self.dropout.p, self.dropout.training
        )


class TAGFGate(_StackGate):
    """Released TAGF gate: a BiLSTM across the recursion steps of each frame.

    ``{s: (B, T, S, D_s)} -> (B, T, sum D_s)``. Scores are the mean of a unit-norm encoding, so
    ``|score| <= 1/sqrt(dim)`` and the weights stay close to uniform (see docs/models.md).
    """

    name = "tagf"
    frame_local = True  # the BiLSTM runs over the steps of one frame
    #: how the encoders run: True the fused :func:`step_scores`, False the modules (``nn.LSTM``,
    #: cuDNN on a GPU), None (default) fused on the CPU and the modules elsewhere (the fused
    #: path is measured on the CPU only). The same parameters and math either way.
    fused: bool | None = None

    def __init__(self, params: TAGFParams, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__(in_dims, num_steps)
        self.temperature = params.temperature
        self.dims = {s: params.dim_factor * d for s, d in self.in_dims.items()}
        self.encoder = nn.ModuleDict(
            {s: StepEncoder(d, self.dims[s], params.dropout) for s, d in self.in_dims.items()}
        )
        xavier_init_(self)  # nn.LSTM keeps PyTorch's init, as released

    def _weights(self, s: str, stack: Tensor, mask: Tensor) -> Tensor:
        b = stack.shape[0]
        per_frame = rearrange(stack, "b t s d -> (b t) s d")
        fused = stack.device.type == "cpu" if self.fused is None else self.fused
        enc = self.encoder[s]
        score = _wide(enc.scores(per_frame) if fused else enc(per_frame).mean(dim=-1))
        w = torch.softmax(score / self.temperature, dim=-1)
        return rearrange(w, "(b t) s -> b t s", b=b)


# ------------------------------------------------------------------------- tagf_temporal


class TAGFTemporalParams(Params):
    """Parameters of the ``tagf_temporal`` gate (time-axis reading of TAGF)."""

    hidden: int = Field(64, ge=1, le=4096, description="BiLSTM hidden size per direction")
    source: Literal["last", "mean"] = Field(
        "last", description="features the BiLSTM reads: the last step or the mean over steps"
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        le=100.0,
        description="softmax temperature (1.0: the unused released TemporalGating class)",
    )
    relu: bool = Field(False, description="ReLU on the gated sum")


class TAGFTemporalGate(_StackGate):
    """Time-aware gate: per stream a BiLSTM over time gives per-frame weights over steps.

    ``{s: (B, T, S, D_s)} -> (B, T, sum D_s)``. Padded frames never reach valid ones in either
    direction (:func:`shifted_bilstm`: the result of packing by mask length, without a host
    synchronisation).
    """

    name = "tagf_temporal"

    def __init__(self, params: TAGFTemporalParams, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__(in_dims, num_steps)
        self.temperature = params.temperature
        self.source = params.source
        self.relu = params.relu
        self.lstm = nn.ModuleDict(
            {
                s: nn.LSTM(d, params.hidden, bidirectional=True, batch_first=True)
                for s, d in self.in_dims.items()
            }
        )
        self.score = nn.ModuleDict(
            {s: nn.Linear(2 * params.hidden, num_steps) for s in self.in_dims}
        )
        xavier_init_(self)

    def _weights(self, s: str, stack: Tensor, mask: Tensor) -> Tensor:
        if self.source == "last":
            seq = stack[:, :, -1]
        else:
            seq = reduce(stack, "b t s d -> b t d", "mean")
        h = shifted_bilstm(self.lstm[s], seq, mask)
        logits = self.score[s](h)  # b t s
        return torch.softmax(_wide(logits) / self.temperature, dim=-1)

    def _post(self, fused: Tensor) -> Tensor:
        return torch.relu(fused) if self.relu else fused


@register("gate", "grjca")
def build_grjca(params: GRJCAParams, *, in_dims: dict[str, int], num_steps: int) -> GRJCAGate:
    """GRJCA: softmax(Linear(last step)/0.1) over steps, ReLU (as released)."""
    return GRJCAGate(params, in_dims, num_steps)


@register("gate", "tagf")
def build_tagf(params: TAGFParams, *, in_dims: dict[str, int], num_steps: int) -> TAGFGate:
    """TAGF: BiLSTM across the recursion steps of each frame (as released)."""
    return TAGFGate(params, in_dims, num_steps)


@register("gate", "tagf_temporal")
def build_tagf_temporal(
    params: TAGFTemporalParams, *, in_dims: dict[str, int], num_steps: int
) -> TAGFTemporalGate:
    """TAGF time-aware reading: BiLSTM over time -> per-frame step weights."""
    return TAGFTemporalGate(params, in_dims, num_steps)
