"""Entry point of the temporal encoders: ``tcn`` and ``bilstm``."""

from __future__ import annotations

from fusionkit import plugin
from fusionkit_encoders import bilstm, tcn


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module(tcn, bilstm)
