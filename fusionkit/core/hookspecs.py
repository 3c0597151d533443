"""The hooks a fusionkit plugin may implement (one module, as in pluggy and pytest).

A plugin is any module named by an entry point in the ``fusionkit`` group::

    [project.entry-points.fusionkit]
    my_fusions = "my_package.plugin"

implementing one or both hooks below with :data:`fusionkit.plugin.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fusionkit.core.registry import Registry

PROJECT = "fusionkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fusionkit_register_kinds(registry: Registry) -> None:
    """Declare new component kinds (optional; most plugins only add components).

    Called for every plugin before any component is registered, so a plugin may add
    components of a kind another plugin declares. The core kinds (dataset, encoder, fusion,
    gate, head, perturbation) are always there.

    Example::

        @fusionkit.plugin.hookimpl
        def fusionkit_register_kinds(registry):
            registry.add_kind(Kind("audio_backbone", build=AudioBackboneBuild,
                                   returns=AudioBackbone, summary="waveform -> embeddings"))
    """


@hookspec
def fusionkit_register_components(registry: Registry) -> None:
    """Register components (encoders, fusions, gates, heads, datasets, ...).

    Called once per plugin when the registry is built. Register the build functions marked
    with :func:`fusionkit.plugin.register` in your modules with
    :meth:`~fusionkit.core.registry.Registry.add_module`, or one by one with
    :meth:`~fusionkit.core.registry.Registry.add`; the registry records which distribution
    each component came from.

    Example::

        @fusionkit.plugin.hookimpl
        def fusionkit_register_components(registry):
            registry.add_module(my_package.fusion, my_package.gate)
    """
