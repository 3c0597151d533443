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


def test_schema_is_valid_draft_2020_12_with_every_reference_resolvable(schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    refs = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                refs.add(node["$ref"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert refs  # the plugins' nested params models are referenced ...
    for ref in refs:  # ... and every reference points into $defs
        assert ref.startswith("#/$defs/") and ref.removeprefix("#/$defs/") in schema["$defs"], ref


def test_shipped_recipes_match_schema(schema):
    paths = list((REPO / "recipes").rglob("*.yaml"))
    assert any("affwild2" in p.parts for p in paths)  # nested backbone specs included
    validator = jsonschema.Draft202012Validator(schema)
    for path in paths:
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path, errors)


def test_schema_names_the_wrong_component_name_and_param(schema):
    validator = jsonschema.Draft202012Validator(schema)
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["model"]["fusion"] = {"name": "concatt"}
    (err,) = validator.iter_errors(raw)
    assert "'concatt' is not one of" in err.message and "'concat'" in err.message
    raw["model"]["fusion"] = {"name": "concat", "params": {"normalise": True}}
    messages = [e.message for e in validator.iter_errors(raw)]
    assert any("normalise" in m for m in messages), messages


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
