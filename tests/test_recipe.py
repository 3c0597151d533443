"""Recipe validation: every malformed recipe fails early with path, did-you-mean and choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusionkit.core.errors import RecipeError
from fusionkit.core.overrides import apply_overrides
from fusionkit.core.recipe import load_recipe, validate_recipe
from tests.conftest import REPO, tiny_recipe


def problems_of(raw, registry) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "r.yaml", registry)
    return info.value.problems


def test_valid_recipe_fills_component_defaults(tmp_path, registry):
    rc = validate_recipe(tiny_recipe(tmp_path), "r.yaml", registry)
    assert rc.model.head.params.batchnorm is True  # default from the plugin's params model
    assert rc.model.encoders["audio"].params.dim == 8


def test_typo_in_component_params_names_full_path_and_suggestion(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["model"]["fusion"]["params"] = {"normalise": True}
    (p,) = problems_of(raw, registry)
    assert p.startswith("model.fusion.params.normalise: unknown key")
    assert "did you mean 'normalize'" in p
    assert "valid keys: normalize" in p


def test_typo_in_core_section(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["training"]["lrr"] = 0.1
    (p,) = problems_of(raw, registry)
    assert p.startswith("training.lrr: unknown key (did you mean 'lr'?)")
    assert "epochs" in p  # lists the valid names


def test_unknown_top_level_key(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["trainig"] = {}
    (p,) = problems_of(raw, registry)
    assert "trainig: unknown key (did you mean 'training'?)" in p


def test_wrong_type_and_bounds_reported_together(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["training"]["lr"] = "fast"
    raw["data"]["window"] = 0
    probs = problems_of(raw, registry)
    assert any(p.startswith("training.lr:") and "'fast'" in p for p in probs)
    assert any(p.startswith("data.window:") for p in probs)


def test_unknown_component_lists_registered(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["model"]["fusion"]["name"] = "concatt"
    (p,) = problems_of(raw, registry)
    assert p.startswith("model.fusion.name: unknown fusion 'concatt' (did you mean 'concat'?)")
    assert "registered fusions:" in p and "concat" in p


def test_missing_required_section(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    del raw["model"]["head"]
    (p,) = problems_of(raw, registry)
    assert p == "model.head: required key is missing"


def test_hop_larger_than_window(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["data"]["hop"] = 100
    (p,) = problems_of(raw, registry)
    assert p.startswith("data.hop:")


def test_no_dotted_import_paths_accepted(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["model"]["fusion"]["name"] = "os.system"
    (p,) = problems_of(raw, registry)
    assert "unknown fusion 'os.system'" in p


def test_overrides_set_nested_values_and_parse_yaml():
    raw = {"training": {"lr": 1.0}, "model": {"fusion": {"name": "concat"}}}
    out = apply_overrides(
        raw, ["training.lr=1e-3", "model.fusion.params.normalize=true", "evaluation.splits=[val]"]
    )
    assert out["training"]["lr"] == 1e-3
    assert out["model"]["fusion"]["params"] == {"normalize": True}
    assert out["evaluation"]["splits"] == ["val"]
    assert raw["training"]["lr"] == 1.0  # out of place


def test_bad_override_syntax():
    with pytest.raises(RecipeError, match=r"expected key\.path=value"):
        apply_overrides({}, ["training.lr"])


def test_override_typo_is_caught(tmp_path, registry):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["training.epochz=3"], registry)
    assert "training.epochz: unknown key (did you mean 'epochs'?)" in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path, registry):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  name: tiny\n   window: 3\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [], registry)
    assert str(path) in str(info.value) and "line" in str(info.value)


def test_shipped_recipes_validate():
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        if "affwild2" in path.parts:
            continue  # needs the affwild2 dataset plugin
        load_recipe(path)


def test_embedded_default_recipe_is_the_quickstart():
    default = load_recipe(None)
    shipped = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert default.model_dump() == shipped.model_dump()


def test_cli_prints_one_clear_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusionkit",
            "run",
            str(REPO / "recipes" / "quickstart.yaml"),
            "training.lrr=0.1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "training.lrr: unknown key (did you mean 'lr'?)" in proc.stderr
    assert not Path(tmp_path, "runs").exists()  # failed before any work started


def test_empty_params_blocks_read_as_defaults(tmp_path, registry):
    """`params:` left empty in YAML (None) means the component's defaults."""
    raw = tiny_recipe(tmp_path)
    raw["model"]["head"]["params"] = None
    raw["data"]["params"] = None
    rc = validate_recipe(raw, "r.yaml", registry)
    assert rc.model.head.params.hidden == 256 and rc.data.params.seed == 0


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        (
            "evaluation.splits=val,test",
            "evaluation.splits: Input should be a valid list (got 'val,test'); write a list in "
            "brackets: [val, test]",
        ),
        ("lr=1e-3", "lr: unknown key (did you mean 'training.lr'?); valid keys: name,"),
        ("training.perturbations=noise", "training.perturbations: Input should be a valid list"),
        ("seed=1", "seed: unknown key (did you mean 'training.seed'?)"),
        ("trainig.lr=1", "trainig: unknown key (did you mean 'training'?)"),
        ("training.lrr=1", "training.lrr: unknown key (did you mean 'lr'?)"),
    ],
)
def test_override_mistakes_say_how_to_fix_them(override, problem):
    path = REPO / "recipes" / "quickstart.yaml"
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    assert info.value.problems[0].startswith(problem), info.value.problems
    assert "[noise]" not in info.value.problems[0]  # its items are mappings: no such hint


def test_a_recipe_file_after_an_override_is_said_to_come_first():
    from fusionkit.core.overrides import parse_overrides

    with pytest.raises(RecipeError) as info:
        parse_overrides(["recipes/quickstart.yaml"])
    assert info.value.problems == [
        "override 'recipes/quickstart.yaml': a recipe file must be the first argument, and "
        "only one is taken; overrides are key.path=value"
    ]
