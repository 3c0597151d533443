"""Entry point of the temporal encoders: ``tcn`` and ``bilstm``."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import Registry
from fusionkit_encoders.bilstm import BiLSTMEncoder, BiLSTMParams
from fusionkit_encoders.tcn import TCNEncoder, TCNParams


def build_tcn(params: TCNParams, *, in_dim: int, modality: str) -> TCNEncoder:
    """Causal dilated TCN for one modality; ``out_dim = params.channels[-1]``."""
    return TCNEncoder(params, in_dim)


def build_bilstm(params: BiLSTMParams, *, in_dim: int, modality: str) -> BiLSTMEncoder:
    """Masked BiLSTM for one modality; ``out_dim = 2 * hidden`` or ``proj``."""
    return BiLSTMEncoder(params, in_dim)


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    registry.add(
        "encoder",
        "tcn",
        build=build_tcn,
        params=TCNParams,
        summary="causal dilated TCN (kernel 5, dilations 1,2,4,8, weight norm) + BatchNorm",
    )
    registry.add(
        "encoder",
        "bilstm",
        build=build_bilstm,
        params=BiLSTMParams,
        summary="bidirectional LSTM; padding reaches no valid frame in either direction",
    )
