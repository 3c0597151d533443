"""Entry point of the embedded ``synthetic`` dataset."""

from __future__ import annotations

from fusionkit import plugin
from fusionkit_synthetic import dataset


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module(dataset)
