"""Entry point of the peer methods: fusions ``lfan``, ``jmt``, ``modality_stack``; gate
``moe_gate``; encoder ``mamba``."""

from __future__ import annotations

from fusionkit import plugin
from fusionkit_peers import jmt, lfan, mamba, moe


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    registry.add_module(lfan, jmt, moe, mamba)
