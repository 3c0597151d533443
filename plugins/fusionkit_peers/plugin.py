"""Entry point of the peer fusion methods."""

from __future__ import annotations

from fusionkit import plugin


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module()
