"""Causal dilated temporal convolutional network (TCN) encoder, as in the released code.

Block ``i`` (dilation ``2**i``) is::

    h = Dropout(LeakyReLU(CausalConv_wn(x)))        # kernel k, dilation 2**i
    h = Dropout(LeakyReLU(CausalConv_wn(h)))
    y = LeakyReLU(h + R(x))                          # R = 1x1 Conv if channels differ, else id

``CausalConv_wn`` is a weight-normalised ``Conv1d`` left-padded by ``(k - 1) * dilation`` so
frame ``t`` only sees frames ``<= t``. With ``k = 5`` and four blocks (dilations 1, 2, 4, 8)
the receptive field is ``1 + 2 * (k - 1) * (1 + 2 + 4 + 8) = 121`` frames, past only. A
``BatchNorm1d`` over the last block's channels follows, as in the released model.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from pydantic import Field, PositiveInt
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from fusionkit.plugin import Params, check_mask, check_shape, register
from fusionkit_encoders._masking import MaskedBatchNorm1d

__all__ = ["CausalBlock", "TCNEncoder", "TCNParams", "build_tcn", "receptive_field"]


class TCNParams(Params):
    """Parameters of the ``tcn`` encoder."""

    channels: list[PositiveInt] = Field(
        default_factory=lambda: [64, 64, 64, 64],
        min_length=1,
        max_length=16,
        description=(
            "output channels of each residual block; block i uses dilation 2**i. The released "
            "models use [512, 512, 256, 256] (video) and [128, 128, 128, 128] (audio)"
        ),
    )
    kernel_size: int = Field(5, ge=1, le=31, description="temporal kernel size of every conv")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout after each conv")
    batchnorm: bool = Field(
        True,
        description=(
            "BatchNorm1d over the output channels (as released); training statistics use "
            "valid frames only"
        ),
    )


def receptive_field(kernel_size: int, num_blocks: int) -> int:
    """Frames (current one included) that one output frame depends on."""
    return 1 + 2 * (kernel_size - 1) * (2**num_blocks - 1)


class _CausalConv(nn.Module):
    """Weight-normalised ``Conv1d`` on ``(B, C, T)``, left-padded so that it is causal."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = weight_norm(nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.left_pad, 0)))

    def step(self, x: Tensor, past: Tensor) -> tuple[Tensor, Tensor]:
        """One new frame ``x`` ``(B, C_in)`` given the last ``left_pad`` inputs ``past``
        ``(B, C_in, left_pad)`` -> output ``(B, C_out)`` and the updated ``past``."""
        window = torch.cat([past, rearrange(x, "b c -> b c 1")], dim=-1)
        return self.conv(window)[..., -1], window[..., 1:]


class CausalBlock(nn.Module):
    """One residual TCN block ``(B, C_in, T) -> (B, C_out, T)`` (see module docstring)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            _CausalConv(c_in, c_out, kernel_size, dilation),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            _CausalConv(c_out, c_out, kernel_size, dilation),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
        )
        self.residual: nn.Module
        if c_in != c_out:
            # The released code re-initialises the 1x1 projection with xavier (gain sqrt 2);
            # its re-initialisation of the weight-normed convs has no effect (the weight is
            # recomputed from g and v), so those keep PyTorch's default init here too.
            proj = nn.Conv1d(c_in, c_out, 1)
            nn.init.xavier_uniform_(proj.weight, gain=math.sqrt(2.0))
            self.residual = proj
        else:
            self.residual = nn.Identity()
        self.act = nn.LeakyReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.net(x) + self.residual(x))

    def step(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Streaming form of :meth:`forward` for one frame ``(B, C_in)`` (eval mode)."""
        conv1, act1, _, conv2, act2, _ = self.net
        h, past1 = conv1.step(x, state[0])
        h, past2 = conv2.step(act1(h), state[1])
        res = self.residual(rearrange(x, "b c -> b c 1"))[..., 0]
        return self.act(act2(h) + res), [past1, past2]


class TCNEncoder(nn.Module):
    """Causal TCN ``(B, T, F) -> (B, T, channels[-1])``.

    Output frame ``t`` depends on input frames ``t - R + 1 .. t`` only
    (``R = receptive_field(kernel_size, len(channels))``), so padding at the end of a window
    never reaches a valid frame; the optional BatchNorm takes its training statistics from
    valid frames only.
    """

    def __init__(self, params: TCNParams, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.out_dim = params.channels[-1]
        self.receptive_field = receptive_field(params.kernel_size, len(params.channels))
        blocks = []
        c_in = in_dim
        for i, c_out in enumerate(params.channels):
            blocks.append(CausalBlock(c_in, c_out, params.kernel_size, 2**i, params.dropout))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.norm = MaskedBatchNorm1d(self.out_dim) if params.batchnorm else None

    def init_stream(self, batch: int, device: torch.device | str = "cpu") -> list[list[Tensor]]:
        """Zero state for :meth:`step` (the zero left-padding of a sequence start)."""
        state = []
        for block in self.blocks:
            conv1, conv2 = block.net[0], block.net[3]
            state.append(
                [
                    torch.zeros(batch, conv1.conv.in_channels, conv1.left_pad, device=device),
                    torch.zeros(batch, conv2.conv.in_channels, conv2.left_pad, device=device),
                ]
            )
        return state

    def step(self, x: Tensor, state: list[list[Tensor]]) -> tuple[Tensor, list[list[Tensor]]]:
        """Encode one new frame ``(B, F)`` -> ``(B, out_dim)`` in O(1) per frame (eval mode).

        Keeps the last ``(kernel - 1) * dilation`` inputs of every convolution, so a stream of
        ``step`` calls from :meth:`init_stream` equals :meth:`forward` on the whole sequence.
        """
        new_state = []
        h = x
        for block, st in zip(self.blocks, state, strict=True):
            h, st = block.step(h, st)
            new_state.append(st)
        if self.norm is not None:
            h = self.norm(rearrange(h, "b c -> b c 1"))[..., 0]
        return h, new_state

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: ``(B, T, F)``, ``mask``: ``(B, T)`` bool -> ``(B, T, out_dim)``."""
        check_shape("encoder 'tcn'", "features", x, "b t f", f=self.in_dim)
        check_mask("encoder 'tcn'", x, mask)
        h = self.blocks(rearrange(x, "b t f -> b f t"))
        if self.norm is not None:
            h = self.norm(h, mask)
        return rearrange(h, "b c t -> b t c")


@register("encoder", "tcn")
def build_tcn(params: TCNParams, *, in_dim: int, modality: str) -> TCNEncoder:
    """Causal dilated TCN (kernel 5, dilations 1,2,4,8, weight norm) + BatchNorm."""
    return TCNEncoder(params, in_dim)
