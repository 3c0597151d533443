"""The hooks a fusionkit plugin may implement (one module, as in pluggy/pytest).

A plugin is any module named by an entry point in the ``fusionkit`` group::

    [project.entry-points.fusionkit]
    my_fusions = "my_package.plugin"

and implementing one or more of the hooks below with :data:`fusionkit.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from fusionkit.registry import Registry

PROJECT = "fusionkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fusionkit_register_components(registry: Registry) -> None:
    """Register components (encoders, fusions, gates, heads, datasets, ...).

    Called once per plugin when the registry is built. Use
    :meth:`fusionkit.registry.Registry.add` for each component; the registry records which
    distribution it came from.

    Example::

        @fusionkit.hookimpl
        def fusionkit_register_components(registry):
            registry.add("fusion", "my_fusion", build=build_my_fusion, params=MyParams,
                         summary="cross-modal transformer fusion")
    """
