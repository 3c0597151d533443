"""Entry point of the built-in baseline components."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import Registry


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    pass
