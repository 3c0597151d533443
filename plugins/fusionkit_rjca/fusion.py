"""Recursive joint cross-attention (RJCA) between two modalities.

One step, for each modality ``m`` of the pair (``X_m``: ``(B, T, d_m)``, ``d = d_1 + d_2``)::

    J    = [X_1 || X_2] W_q + b_q                         (B, T, d)     joint query
    K_m  = key_m(X_m)                                      (B, T, d_m)   see "modes" below
    V_m  = X_m W_vm + b_vm                                 (B, T, d_m)
    C_m  = Dropout(tanh(K_m^T J / sqrt(d)))                (B, d_m, d)   sum over time
    A_m  = ReLU(tanh(V_m C_m))                             (B, T, d)
    X_m <- X_m + Dropout(ReLU(A_m W_om + b_om))            (B, T, d_m)

Modes (how ``key_m`` is defined):

* ``faithful`` (as released): ``K_m^T = X_m^T W_km^T + b_km`` with ``W_km`` a
  ``Linear(L -> L)`` acting on the **time** axis, so every window must have exactly
  ``L = length`` frames.
* ``agnostic`` (fusionkit variant): ``K_m = X_m W_km + b_km`` with ``W_km`` a per-frame
  ``Linear(d_m -> d_m)`` on the feature axis; any ``T`` works. With ``W_km = I`` and zero bias
  in both modes (and ``T = L``) the two give identical outputs.

Dropout draws its masks as ``rand < 1 - p`` on the CPU (:class:`~fusionkit_rjca.dropout.
FastDropout`: the distribution of ``nn.Dropout``, half its random-number cost).

Padding (``mask_padding``, fusionkit variant): padded frames are zeroed in ``K_m`` before the
time contraction (and, in faithful mode, also in the input of the time-axis Linear), so the
content of padded frames never reaches a valid frame. The released code sums over padded
frames as well.

The fusion returns the stack of all steps ``[X^(0), ..., X^(N)]`` per modality, ``X^(0)``
being the (L2-normalised) input: ``{m: (B, T, N + 1, d_m)}``. ``N`` is the ``recursions``
param; the stack has ``num_steps = N + 1`` entries.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from einops import einsum, rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from fusionkit.plugin import (
    Params,
    ShapeError,
    check_shape,
    check_shapes,
    register,
    xavier_init_,
)
from fusionkit_rjca.dropout import FastDropout

__all__ = ["JointCrossAttentionStep", "RJCAFusion", "RJCAParams", "build_rjca"]


class RJCAParams(Params):
    """Parameters of the ``rjca`` fusion."""

    mode: Literal["agnostic", "faithful"] = Field(
        "agnostic",
        description=(
            "'faithful': key projection Linear(length -> length) on the time axis as released "
            "(fixed window length); 'agnostic': per-frame Linear(d_m -> d_m) key, any length"
        ),
    )
    recursions: int = Field(
        2,
        ge=1,
        le=16,
        description="recursive steps N (released GRJCA/TAGF code: 2); the fusion stacks its "
        "input and every step, N + 1 in all",
    )
    share_weights: bool = Field(
        False, description="reuse one set of weights for every step (released: separate)"
    )
    normalize: bool = Field(
        True, description="L2-normalise each modality per frame first (as in GRJCA/TAGF)"
    )
    dropout: float = Field(
        0.6, ge=0.0, lt=1.0, description="dropout on C_m and on the residual branch (released 0.6)"
    )
    length: int = Field(
        300, ge=1, le=100_000, description="window length L of faithful mode (released: 300)"
    )
    joint_order: tuple[str, str] = Field(
        ("video", "audio"),
        description="modality order inside the joint representation J (released: video, audio)",
    )
    mask_padding: bool = Field(
        True,
        description="zero padded frames of the key before the time contraction (fusionkit variant)",
    )
    correlation: Literal["sum", "mean"] = Field(
        "sum",
        description=(
            "'sum' over frames as released; 'mean' rescales the sum by length / valid frames "
            "so the scale of C_m does not grow with T (fusionkit variant, equal to 'sum' for "
            "full windows of `length` frames)"
        ),
    )
    init: Literal["xavier", "torch"] = Field(
        "xavier",
        description="'xavier': xavier-uniform weights, zero biases (as in GRJCA/TAGF); 'torch'",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_steps" in data:
            if "recursions" in data:
                raise ValueError("set 'recursions' only ('num_steps' is its former name)")
            warnings.warn(
                "rjca params: 'num_steps' is now called 'recursions' (the number of recursive "
                "steps N; the fusion stacks N + 1); please rename it in your recipe",
                FutureWarning,
                stacklevel=2,
            )
            data = {("recursions" if k == "num_steps" else k): v for k, v in data.items()}
        return data


class JointCrossAttentionStep(nn.Module):
    """One joint cross-attention step over two modalities (equations in the module docstring).

    Attributes:
        query: ``Linear(d -> d)`` applied to ``J``.
        key: modality -> ``Linear(L -> L)`` (faithful) or ``Linear(d_m -> d_m)`` (agnostic).
        value: modality -> ``Linear(d_m -> d_m)``.
        out: modality -> ``Linear(d -> d_m)``.
    """

    def __init__(
        self,
        dims: dict[str, int],
        order: tuple[str, str],
        *,
        mode: str,
        length: int,
        dropout: float,
        mask_padding: bool,
        correlation: str,
    ) -> None:
        super().__init__()
        self.order = order
        self.mode = mode
        self.length = length
        self.mask_padding = mask_padding
        self.correlation = correlation
        d = sum(dims[m] for m in order)
        self.scale = 1.0 / math.sqrt(d)
        self.query = nn.Linear(d, d)
        self.key = nn.ModuleDict(
            {
                m: nn.Linear(length, length) if mode == "faithful" else nn.Linear(dims[m], dims[m])
                for m in order
            }
        )
        self.value = nn.ModuleDict({m: nn.Linear(dims[m], dims[m]) for m in order})
        self.out = nn.ModuleDict({m: nn.Linear(d, dims[m]) for m in order})
        self.corr_dropout = nn.ModuleDict({m: FastDropout(dropout) for m in order})
        self.out_dropout = nn.ModuleDict({m: FastDropout(dropout) for m in order})

    def _key(self, m: str, x: Tensor, valid: Tensor) -> Tensor:
        """``K_m`` as ``(B, T, d_m)`` with padded frames zeroed when ``mask_padding``."""
        if self.mode == "faithful":
            x_in = x * valid if self.mask_padding else x
            k = rearrange(self.key[m](rearrange(x_in, "b t c -> b c t")), "b c t -> b t c")
        else:
            k = self.key[m](x)
        return k * valid if self.mask_padding else k

    def forward(self, xs: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """``xs``: ``{m: (B, T, d_m)}``, ``mask``: ``(B, T)`` -> updated ``{m: (B, T, d_m)}``."""
        joint = self.query(torch.cat([xs[m] for m in self.order], dim=-1))  # b t d
        valid = rearrange(mask, "b t -> b t 1").to(joint.dtype)
        wide = torch.float64 if joint.dtype == torch.float64 else torch.float32
        scale = torch.full((mask.shape[0], 1, 1), self.scale, device=joint.device, dtype=wide)
        if self.correlation == "mean":
            n_valid = (
                mask.sum(dim=1).clamp(min=1)
                if self.mask_padding
                else mask.new_full((mask.shape[0],), mask.shape[1], dtype=torch.long)
            )
            scale = scale * rearrange(self.length / n_valid.to(scale.dtype), "b -> b 1 1")
        new: dict[str, Tensor] = {}
        for m in self.order:  # the two modalities, not frames
            k = self._key(m, xs[m], valid)
            v = self.value[m](xs[m])
            corr = einsum(k, joint, "b t d_m, b t d -> b d_m d")  # C_m
            corr = self.corr_dropout[m](torch.tanh(corr * scale.to(corr.dtype)))
            att = torch.relu(torch.tanh(einsum(v, corr, "b t d_m, b d_m d -> b t d")))  # A_m
            new[m] = xs[m] + self.out_dropout[m](torch.relu(self.out[m](att)))
        return new


class RJCAFusion(nn.Module):
    """Recursive joint cross-attention ``{m: (B, T, d_m)} -> {m: (B, T, N + 1, d_m)}``.

    Attributes:
        out_dims: modality -> ``d_m`` (one output stream per modality).
        num_steps: ``S = N + 1`` stacked steps (input included).
        fixed_length: ``length`` in faithful mode, else ``None``.
    """

    def __init__(self, params: RJCAParams, in_dims: dict[str, int]) -> None:
        super().__init__()
        order = tuple(params.joint_order)
        if len(in_dims) != 2:
            raise ShapeError(
                f"fusion 'rjca' fuses exactly two modalities, expected {list(order)}; "
                f"received {len(in_dims)}: {sorted(in_dims)}"
            )
        if set(in_dims) != set(order) or order[0] == order[1]:
            raise ShapeError(
                f"fusion 'rjca' expected modalities {list(order)} (params.joint_order); "
                f"received {sorted(in_dims)}: set joint_order to the two modality names"
            )
        self.order: tuple[str, str] = (order[0], order[1])
        self.in_dims = {m: int(in_dims[m]) for m in self.order}
        self.out_dims = dict(self.in_dims)
        self.num_steps = params.recursions + 1
        self.fixed_length = params.length if params.mode == "faithful" else None
        self.normalize = params.normalize
        n_modules = 1 if params.share_weights else params.recursions
        self.steps = nn.ModuleList(
            JointCrossAttentionStep(
                self.in_dims,
                self.order,
                mode=params.mode,
                length=params.length,
                dropout=params.dropout,
                mask_padding=params.mask_padding,
                correlation=params.correlation,
            )
            for _ in range(n_modules)
        )
        self.recursions = params.recursions
        if params.init == "xavier":
            xavier_init_(self)

    def _check(self, feats: dict[str, Tensor], mask: Tensor) -> None:
        if set(feats) != set(self.order):
            raise ShapeError(
                f"fusion 'rjca' expected modalities {list(self.order)}; received {sorted(feats)}"
            )
        sizes = {m: {"d": self.in_dims[m]} for m in self.order}
        bt = check_shapes("fusion 'rjca'", feats, "b t d", sizes)
        check_shape("fusion 'rjca'", "mask", mask, "b t", **bt)
        t = bt["t"]
        if self.fixed_length is not None and t != self.fixed_length:
            raise ShapeError(
                f"fusion 'rjca' in faithful mode needs windows of exactly T={self.fixed_length} "
                f"frames (time-axis key projection); got T={t}. Pad/window the input to that "
                "length or use mode: agnostic"
            )

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        """``feats``: ``{m: (B, T, d_m)}``, ``mask``: ``(B, T)`` bool -> ``{m: (B, T, S, d_m)}``."""
        self._check(feats, mask)
        xs = {m: feats[m] for m in self.order}
        if self.normalize:
            xs = {m: F.normalize(x, dim=-1) for m, x in xs.items()}
        history = {m: [x] for m, x in xs.items()}
        for i in range(self.recursions):  # the recursion is the only loop
            xs = self.steps[min(i, len(self.steps) - 1)](xs, mask)
            for m, x in xs.items():
                history[m].append(x)
        return {m: torch.stack(h, dim=2) for m, h in history.items()}


@register("fusion", "rjca")
def build_rjca(params: RJCAParams, *, in_dims: dict[str, int]) -> RJCAFusion:
    """Recursive joint cross-attention (audio-video); stack of all steps per modality."""
    return RJCAFusion(params, in_dims)
