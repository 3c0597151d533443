"""Baseline components: per-frame linear encoder, concatenation fusion, last-step gate, head."""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from fusionkit.plugin import (
    EmptyParams,
    GateOutput,
    Params,
    ShapeError,
    check_shape,
    check_shapes,
    masked_batch_norm,
    register,
)

__all__ = [
    "ConcatFusion",
    "ConcatParams",
    "LastStepGate",
    "LinearEncoder",
    "LinearParams",
    "RegressionHead",
    "RegressionHeadParams",
    "build_concat",
    "build_last",
    "build_linear",
    "build_regression",
]


class LinearParams(Params):
    """Parameters of the ``linear`` encoder."""

    dim: int = Field(128, ge=1, le=4096, description="output feature size D")
    activation: Literal["none", "relu", "leaky_relu", "tanh"] = Field(
        "leaky_relu", description="non-linearity after the projection"
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout after the activation")
    layer_norm: bool = Field(False, description="LayerNorm the input features first")


_ACT = {"none": nn.Identity, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh}


class LinearEncoder(nn.Module):
    """Per-frame projection ``(B, T, F) -> (B, T, dim)``; no temporal context."""

    receptive_field = 1  # causal: frame t depends on frame t only (streaming encodes one frame)

    def __init__(self, params: LinearParams, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = params.dim
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim) if params.layer_norm else nn.Identity(),
            nn.Linear(in_dim, params.dim),
            _ACT[params.activation](),
            nn.Dropout(params.dropout),
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_shape("encoder 'linear'", "features", x, "b t f", f=self.in_dim)
        return self.net(x)


class ConcatParams(Params):
    """Parameters of the ``concat`` fusion."""

    normalize: bool = Field(False, description="L2-normalise each modality per frame first")


class ConcatFusion(nn.Module):
    """Per-frame concatenation of the modalities (sorted by name) as one stream with S = 1.

    ``{m: (B, T, D_m)} -> {"fused": (B, T, 1, sum D_m)}``. With a single modality this is the
    unimodal baseline.
    """

    fixed_length = None
    num_steps = 1
    frame_local = True  # frame t of the output depends on frame t of the input only

    def __init__(self, params: ConcatParams, in_dims: dict[str, int]) -> None:
        super().__init__()
        self.modalities = sorted(in_dims)
        self.in_dims = {m: int(in_dims[m]) for m in self.modalities}
        self.normalize = params.normalize
        self.out_dims = {"fused": sum(in_dims.values())}

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        missing = [m for m in self.modalities if m not in feats]
        if missing:
            raise ShapeError(
                f"fusion 'concat' expected modalities {self.modalities}; missing {missing}"
            )
        sizes = {m: {"d": d} for m, d in self.in_dims.items()}
        check_shapes("fusion 'concat'", feats, "b t d", sizes)
        xs = [feats[m] for m in self.modalities]
        if self.normalize:
            xs = [nn.functional.normalize(x, dim=-1) for x in xs]
        fused = torch.cat(xs, dim=-1)
        return {"fused": rearrange(fused, "b t d -> b t 1 d")}


class LastStepGate(nn.Module):
    """Take the last step of every stream and concatenate the streams (sorted by name).

    ``{s: (B, T, S, D_s)} -> (B, T, sum D_s)``; the weights are one-hot on the last step.
    """

    frame_local = True

    def __init__(self, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__()
        self.streams = sorted(in_dims)
        self.num_steps = num_steps
        self.out_dim = sum(in_dims.values())

    def forward(self, stacks: dict[str, Tensor], mask: Tensor) -> GateOutput:
        feats = [stacks[s][:, :, -1] for s in self.streams]
        weights = {}
        for s in self.streams:
            b, t, steps, _ = stacks[s].shape
            w = torch.zeros(b, t, steps, device=stacks[s].device, dtype=stacks[s].dtype)
            w[..., -1] = 1.0
            weights[s] = w
        return GateOutput(features=torch.cat(feats, dim=-1), weights=weights)


class RegressionHeadParams(Params):
    """Parameters of the ``regression`` head."""

    hidden: int = Field(256, ge=1, le=4096, description="hidden size of the first Linear")
    batchnorm: bool = Field(True, description="BatchNorm1d over channels after the first Linear")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the output Linear")
    tanh: bool = Field(True, description="squash outputs into [-1, 1]")


class RegressionHead(nn.Module):
    """The released head: Linear -> BatchNorm1d -> LeakyReLU -> Linear -> tanh.

    ``(B, T, D) -> (B, T, n_targets)``. BatchNorm statistics are taken over valid frames only
    during training (padding does not dilute them).
    """

    frame_local = True  # in eval mode (BatchNorm mixes frames only through training statistics)

    def __init__(self, params: RegressionHeadParams, in_dim: int, n_targets: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.fc1 = nn.Linear(in_dim, params.hidden)
        self.bn = nn.BatchNorm1d(params.hidden) if params.batchnorm else None
        self.act = nn.LeakyReLU()
        self.drop = nn.Dropout(params.dropout)
        self.fc2 = nn.Linear(params.hidden, n_targets)
        self.tanh = params.tanh

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        check_shape("head 'regression'", "features", x, "b t d", d=self.in_dim)
        h = self.fc1(x)
        if self.bn is not None:
            flat = rearrange(h, "b t c -> (b t) c")
            flat = masked_batch_norm(self.bn, flat, rearrange(mask, "b t -> (b t)"))
            h = rearrange(flat, "(b t) c -> b t c", b=x.shape[0])
        y = self.fc2(self.drop(self.act(h)))
        return torch.tanh(y) if self.tanh else y


@register("encoder", "linear")
def build_linear(params: LinearParams, *, in_dim: int, modality: str) -> LinearEncoder:
    """Per-frame linear projection (no temporal context)."""
    return LinearEncoder(params, in_dim)


@register("fusion", "concat")
def build_concat(params: ConcatParams, *, in_dims: dict[str, int]) -> ConcatFusion:
    """Per-frame concatenation; with one encoder it is a unimodal baseline."""
    return ConcatFusion(params, in_dims)


@register("gate", "last")
def build_last(params: EmptyParams, *, in_dims: dict[str, int], num_steps: int) -> LastStepGate:
    """Last step of each stream, concatenated (plain RJCA)."""
    return LastStepGate(in_dims, num_steps)


@register("head", "regression")
def build_regression(
    params: RegressionHeadParams, *, in_dim: int, n_targets: int
) -> RegressionHead:
    """Linear-BatchNorm-LeakyReLU-Linear-tanh head as released."""
    return RegressionHead(params, in_dim, n_targets)
