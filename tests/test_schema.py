"""The exported JSON Schema accepts the shipped recipes and rejects what validation rejects."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml

from fusionkit.core.registry import get_registry
from fusionkit.core.schema import recipe_json_schema
from tests.conftest import REPO


@pytest.fixture(scope="module")
def schema():
    return recipe_json_schema()


def test_shipped_recipes_match_schema(schema):
    paths = [p for p in (REPO / "recipes").rglob("*.yaml") if "affwild2" not in p.parts]
    assert paths
    for path in paths:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_schema_lists_every_registered_component(schema):
    text = str(schema)
    reg = get_registry()
    for comp in reg.components():
        if comp.kind in ("dataset", "encoder", "fusion", "gate", "head"):
            assert f"'const': '{comp.name}'" in text, comp.name


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r["model"]["fusion"].update(params={"normalise": True}),
        lambda r: r["model"]["fusion"].update(name="nope"),
        lambda r: r["training"].update(lrr=1),
        lambda r: r["data"].update(window="long"),
    ],
)
def test_schema_rejects_mistakes(schema, mutate):
    raw = copy.deepcopy(yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text()))
    mutate(raw)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, schema)
