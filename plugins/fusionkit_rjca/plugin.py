"""Entry point of the RJCA family: fusion ``rjca``; gates ``grjca``, ``tagf``, ``tagf_temporal``."""

from __future__ import annotations

from fusionkit import plugin
from fusionkit_rjca import fusion, gates


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module(fusion, gates)
