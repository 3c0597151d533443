"""Entry point of the built-in perturbations."""

from __future__ import annotations

from fusionkit import plugin
from fusionkit_perturbations import corrupt, temporal


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module(temporal, corrupt)
