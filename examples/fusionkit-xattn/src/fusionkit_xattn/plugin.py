"""The entry point fusionkit loads: registers the ``xattn`` fusion and the ``xattn_gated`` gate."""

from __future__ import annotations

from fusionkit import plugin

from fusionkit_xattn import fusion, gate


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module(fusion, gate)
