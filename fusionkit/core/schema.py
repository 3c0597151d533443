"""JSON Schema of recipes, with the params model of every installed component, so that
editors (e.g. the YAML language server) can validate and complete recipe files.

Each component slot lists the registered names (``enum``) and, per name, the params schema
(``if name == X then params: <X's schema>``): an editor says "unknown fusion" or points at
the wrong param, instead of "not valid under any of the given schemas".
"""

from __future__ import annotations

from typing import Any

from fusionkit.core.recipe import Recipe, schema_registry
from fusionkit.core.registry import Registry, get_registry

__all__ = ["recipe_json_schema"]

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def recipe_json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The recipe schema with each component slot narrowed to the registered components."""
    token = schema_registry.set(registry or get_registry())
    try:
        schema = Recipe.model_json_schema()
    finally:
        schema_registry.reset(token)
    return {"$schema": DIALECT, **schema, "title": "fusionkit recipe"}
