"""JSON Schema of recipes, including the params model of every installed component, so that
editors (e.g. the YAML language server) can validate and complete recipe files."""

from __future__ import annotations

from typing import Any

from fusionkit.recipe import Recipe
from fusionkit.registry import Registry, get_registry

__all__ = ["recipe_json_schema"]


def _component_choices(registry: Registry, kind: str, extra: dict[str, Any]) -> dict[str, Any]:
    choices = []
    for name in registry.names(kind):
        comp = registry.get(kind, name)
        params = comp.params.model_json_schema()
        choices.append(
            {
                "type": "object",
                "title": f"{kind} {name}",
                "description": comp.summary,
                "properties": {"name": {"const": name}, "params": params, **extra},
                "required": ["name"],
                "additionalProperties": False,
            }
        )
    return {"anyOf": choices} if choices else {"type": "object"}


def recipe_json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The recipe schema with each component slot narrowed to the registered components."""
    registry = registry or get_registry()
    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    data_extra = {
        k: v for k, v in defs["DataSpec"]["properties"].items() if k not in ("name", "params")
    }
    defs["DataSpec"] = _component_choices(registry, "dataset", data_extra)
    model = defs["ModelSpec"]["properties"]
    model["encoders"] = {
        "type": "object",
        "description": "one encoder per modality",
        "additionalProperties": _component_choices(registry, "encoder", {}),
    }
    for kind in ("fusion", "gate", "head"):
        model[kind] = _component_choices(registry, kind, {})
    schema["title"] = "fusionkit recipe"
    return schema
