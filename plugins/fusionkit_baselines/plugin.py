"""Entry point of the built-in baseline components."""

from __future__ import annotations

from fusionkit import plugin
from fusionkit_baselines import components


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module(components)
