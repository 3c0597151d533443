"""Bidirectional LSTM encoder that keeps padding out of both directions.

``(B, T, F) -> (B, T, 2 * hidden)`` (or ``(B, T, proj)`` with a projection). The backward
direction of a valid frame starts at the item's last valid frame and never reads padding;
padded output frames are zero (before the optional projection). One layer runs through
:func:`fusionkit.layers.shifted_bilstm` (no host synchronisation); stacked layers pack the
sequences by length, which reads the lengths on the host once per call.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fusionkit.plugin import Params, check_mask, check_shape, register, run_lstm, shifted_bilstm
from fusionkit_encoders._masking import lengths_from_mask

__all__ = ["BiLSTMEncoder", "BiLSTMParams", "build_bilstm"]


class BiLSTMParams(Params):
    """Parameters of the ``bilstm`` encoder."""

    hidden: int = Field(64, ge=1, le=4096, description="hidden size per direction")
    layers: int = Field(1, ge=1, le=8, description="number of stacked bidirectional layers")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout between stacked layers (needs layers > 1)"
    )
    proj: int | None = Field(
        None, ge=1, description="if set, a per-frame Linear(2*hidden -> proj) gives out_dim"
    )


class BiLSTMEncoder(nn.Module):
    """Masked bidirectional LSTM ``(B, T, F) -> (B, T, out_dim)``."""

    def __init__(self, params: BiLSTMParams, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.lstm = nn.LSTM(
            in_dim,
            params.hidden,
            num_layers=params.layers,
            dropout=params.dropout if params.layers > 1 else 0.0,
            bidirectional=True,
            batch_first=True,
        )
        self.proj = nn.Linear(2 * params.hidden, params.proj) if params.proj else None
        self.out_dim = params.proj if params.proj else 2 * params.hidden

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: ``(B, T, F)``, ``mask``: ``(B, T)`` bool -> ``(B, T, out_dim)``."""
        check_shape("encoder 'bilstm'", "features", x, "b t f", f=self.in_dim)
        check_mask("encoder 'bilstm'", x, mask)
        if self.lstm.num_layers == 1:
            h = shifted_bilstm(self.lstm, x, mask)
            return self.proj(h) if self.proj is not None else h
        packed = pack_padded_sequence(
            x, lengths_from_mask(mask), batch_first=True, enforce_sorted=False
        )
        out, _ = run_lstm(self.lstm, packed)
        h, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.proj(h) if self.proj is not None else h


@register("encoder", "bilstm")
def build_bilstm(params: BiLSTMParams, *, in_dim: int, modality: str) -> BiLSTMEncoder:
    """Bidirectional LSTM; padding reaches no valid frame in either direction."""
    return BiLSTMEncoder(params, in_dim)
