"""Recipe trust: what a recipe, an override or `plugins check --params` gets wrong ends in one
clear line naming the file and the key, and `recipe validate` rejects what `run` would."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from fusionkit.core.errors import PluginError, RecipeError
from fusionkit.core.overrides import parse_overrides
from fusionkit.core.recipe import load_recipe, validate_recipe
from fusionkit.core.registry import Registry
from fusionkit.core.yamlio import load_yaml
from tests.conftest import REPO, tiny_recipe

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
GRID = REPO / "recipes" / "ablations" / "fusion_gate.yaml"


def problems_of(raw, registry) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "r.yaml", registry)
    return info.value.problems


# ----------------------------------------------------------------------------- (5) duplicates

DUPLICATED = """\
name: dup
data: {name: synthetic, params: {seed: 0}}
model:
  encoders: {audio: {name: linear, params: {dim: 64}}, video: {name: linear, params: {dim: 64}}}
  fusion: {name: concat}
  gate: {name: last}
  head: {name: regression, params: {hidden: 64}}
training:
  epochs: 1
  lr: 3.0e-3
  batch_size: 8
training:
  seed: 5
  lr: 1.0e-3
  lr: 0.5
"""


def test_duplicate_yaml_keys_are_refused_with_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(DUPLICATED)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.source == str(path)
    assert info.value.problems[0].startswith("line 12: duplicate key 'training' (first at line 8)")
    assert info.value.problems[1].startswith(
        "line 15: duplicate key 'training.lr' (first at line 14)"
    )
    assert str(path) in str(info.value)


def test_duplicate_keys_in_flow_mappings_and_lists_but_merge_keys_still_override():
    with pytest.raises(RecipeError, match=r"line 1: duplicate key 'a\.x' \(first at line 1\)"):
        load_yaml("a: {x: 1, x: 2}", "s.yaml")
    with pytest.raises(RecipeError, match=r"duplicate key 'a\.0\.b' \(first at line 2\)"):
        load_yaml("a:\n  - b: 1\n    c: 2\n    b: 3\n", "s.yaml")
    merged = load_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "s.yaml")
    assert merged["other"] == {"x": 3, "y": 2}


def test_shipped_recipes_have_no_duplicate_keys():
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        load_yaml(path.read_text(), str(path))


# ----------------------------------------------------------------------------- (7) (8) schema


def test_val_split_equal_to_train_split_is_refused(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["data"].update(train_split="val", val_split="val")
    (p,) = problems_of(raw, registry)
    assert p.startswith("data.val_split: 'val' is also data.train_split")
    assert "held-out split" in p


def test_repeated_target_is_refused_naming_it(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["model"]["targets"] = ["valence", "arousal", "valence"]
    (p,) = problems_of(raw, registry)
    assert p.startswith("model.targets: 'valence' listed twice")


def test_a_split_listed_twice_is_refused_naming_it(tmp_path, registry):
    """A split evaluated twice (a typo for another split) is named, in the evaluation and in
    a robustness sweep."""
    raw = tiny_recipe(tmp_path)
    raw["evaluation"]["splits"] = ["val", "test", "val"]
    (p,) = problems_of(raw, registry)
    assert p.startswith("evaluation.splits: 'val' listed twice; list each split once")
    raw = tiny_recipe(tmp_path)
    sweep = {"perturbation": "shift", "axis": "k", "values": [0, 1], "splits": ["test", "test"]}
    raw["evaluation"]["robustness"] = [sweep]
    (p,) = problems_of(raw, registry)
    assert "splits: 'test' listed twice" in p, p


# ----------------------------------------------------------------------------- (13) bounds


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("model.encoders.audio.params.dim", 100_000_000_000),
        ("model.head.params.hidden", 1_000_000_000),
    ],
)
def test_model_sizes_have_upper_bounds(tmp_path, registry, path, value):
    raw = tiny_recipe(tmp_path)
    node = raw
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    (p,) = problems_of(raw, registry)
    assert p.startswith(f"{path}: Input should be less than or equal to 4096")


def test_span_dropout_span_has_an_upper_bound(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["training"]["perturbations"] = [
        {"name": "span_dropout", "params": {"rate": 0.5, "span": 10**21}}
    ]
    (p,) = problems_of(raw, registry)
    assert p.startswith("training.perturbations.0.params.span: Input should be less than or")


def test_synthetic_total_frames_are_bounded():
    from fusionkit_synthetic.params import MAX_TOTAL_FRAMES, SyntheticParams

    with pytest.raises(ValidationError, match=f"at most {MAX_TOTAL_FRAMES:,} frames in all"):
        SyntheticParams(num_train=100_000, min_frames=1_000_000, max_frames=1_000_000)
    SyntheticParams(num_train=100, max_frames=1200)  # well within the bound


class _HugeParams(BaseModel):
    fail: str = "runtime"


def _build_huge(params: _HugeParams, *, in_dim: int, modality: str):
    if params.fail == "memory":
        raise MemoryError
    raise RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory:\n"
        "you tried to allocate 12800000000000 bytes."
    )


@pytest.mark.parametrize("fail", ["runtime", "memory"])
def test_build_failing_to_allocate_is_one_line_naming_component_and_path(fail):
    reg = Registry()
    reg.add("encoder", "huge", build=_build_huge, params=_HugeParams)
    with pytest.raises(RecipeError) as info:
        reg.build(
            "encoder",
            "huge",
            _HugeParams(fail=fail),
            where="model.encoders.audio",
            in_dim=4,
            modality="audio",
        )
    (p,) = info.value.problems
    assert p.startswith("model.encoders.audio: encoder 'huge' cannot be built: ")
    assert "model.encoders.audio.params" in p
    assert "\n" not in p


# ----------------------------------------------------------------------------- (18) plugins check


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``fusionkit ARGS`` in this process (as the console script runs it): exit code, stdout,
    stderr."""
    from fusionkit.cli.root import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    monkeypatch.setattr(sys, "argv", ["fusionkit", *args])
    with pytest.raises(SystemExit) as info:
        main()
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_plugins_check_params_typo_is_a_usage_error_with_did_you_mean(monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch, capsys, "plugins", "check", "rjca", "--params", '{"recursionz": 3}'
    )
    assert code == 2, out + err
    line = err.strip()
    assert "\n" not in line
    assert "--params of fusion 'rjca': recursionz: unknown key (did you mean 'recursions'?)" in line
    assert "conform" not in out


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("rjca", {"recursions": 300}, "recursions: Input should be less than or equal to 16"),
        ("linear", {"dim": 100_000_000_000}, "dim: Input should be less than or equal to 4096"),
    ],
)
def test_plugins_check_params_out_of_range_is_a_usage_error(name, params, expected):
    from fusionkit.cli.root import app

    res = CliRunner().invoke(app, ["plugins", "check", name, "--params", json.dumps(params)])
    assert isinstance(res.exception, PluginError), res.output  # printed as one line, exit 2
    assert expected in str(res.exception)


# ----------------------------------------------------------------------------- (19) `#`


def test_override_value_with_a_yaml_comment_is_refused_not_cut():
    with pytest.raises(RecipeError) as info:
        parse_overrides(["output.name=tagf #lr3"])
    (p,) = info.value.problems
    assert "'#lr3' would be dropped as a YAML comment" in p
    assert """quote the value: 'output.name="tagf #lr3"'""" in p
    with pytest.raises(RecipeError, match="YAML comment"):
        parse_overrides(["evaluation.splits=[val] # test"])
    assert parse_overrides(['output.name="tagf #lr3"']) == {"output.name": "tagf #lr3"}
    assert parse_overrides(["output.name='a #b'"]) == {"output.name": "a #b"}
    assert parse_overrides(["output.name=a#b"]) == {"output.name": "a#b"}  # no comment


# ----------------------------------------------------------------------------- (20) grids


@pytest.mark.parametrize(
    "item",
    [
        "sweep.training.seed=[0,1]",
        "variants.tagf.model.gate.params.temperature=0.5",
        "variants.foo.model.gate.name=last",
    ],
)
def test_overrides_under_sweep_or_variants_are_refused(item):
    with pytest.raises(RecipeError) as info:
        load_recipe(GRID, [item])
    (p,) = info.value.problems
    section = item.split(".")[0]
    assert p.startswith(f"override {item.split('=')[0]}: the keys of {section} are dotted")
    assert "edit" in p and "recipe file" in p
    assert info.value.source == str(GRID)


def test_a_whole_sweep_section_can_still_be_replaced():
    rc = load_recipe(QUICKSTART, ["sweep={training.seed: [0, 1]}"])
    assert rc.sweep == {"training.seed": [0, 1]}


# ----------------------------------------------------------------------------- (21) messages


def test_override_error_names_the_recipe_file():
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, ["evaluation.splits.0=test"])
    assert info.value.source == str(QUICKSTART)
    assert "<recipe>" not in str(info.value)
    assert "set the whole list instead: evaluation.splits=[...]" in str(info.value)


def test_empty_section_means_its_defaults(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "data: {name: synthetic}\n"
        "model:\n"
        "  encoders: {audio: {name: linear}, video: {name: linear}}\n"
        "  fusion: {name: concat}\n"
        "  gate: {name: last}\n"
        "  head: {name: regression}\n"
        "training:\n"
        "  # epochs: 3\n"
        "evaluation:\n"
        "sweep:\n"
    )
    rc = load_recipe(path)
    assert rc.training.epochs == 30 and rc.evaluation.splits == ["val", "test"]
    assert not rc.is_grid


def test_empty_required_section_names_its_keys_not_a_class(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["data"] = None
    (p,) = problems_of(raw, registry)
    assert p == "data.name: required key is missing"
    raw = tiny_recipe(tmp_path)
    raw["training"] = 5
    (p,) = problems_of(raw, registry)
    assert "TrainingSpec" not in p and p.startswith("training: Input should be a valid dictionary")


def test_missing_file_named_like_a_shipped_recipe_hints_at_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe("tagf")
    msg = str(info.value)
    assert "file not found: tagf; 'tagf' is a shipped recipe" in msg
    assert "recipes/tagf.yaml" in msg
    assert "fusionkit recipe copy tagf tagf.yaml" in msg
    with pytest.raises(RecipeError) as info:
        load_recipe("no_such_recipe")
    assert "shipped" not in str(info.value)


def test_recipe_validate_rejects_what_run_would_in_one_line(monkeypatch, capsys):
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "recipe",
        "validate",
        str(QUICKSTART),
        "data.train_split=val",
        "data.val_split=val",
    )
    assert code == 2, out + err
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"error: invalid recipe {QUICKSTART}: data.val_split: 'val' is also")


def test_overrides_a_grid_sets_again_at_its_points_are_refused():
    """training.seed=7 on a grid sweeping training.seed, or a gate param where the variants
    set the whole gate, used to validate "ok" and have no effect at any point."""
    with pytest.raises(RecipeError) as info:
        load_recipe(GRID, ["training.seed=7", "model.gate.params.temperature=0.5"])
    problems = info.value.problems
    assert any(p.startswith("override training.seed:") and "sweep.training.seed" in p
               for p in problems)  # fmt: skip
    assert any(p.startswith("override model.gate.params.temperature:") and "variants.tagf" in p
               for p in problems)  # fmt: skip
    # an override no point sets again reaches every point
    from fusionkit.studies.grid import expand_grid

    points = expand_grid(load_recipe(GRID, ["training.lr=0.0007"]))
    assert {p.recipe.training.lr for p in points} == {0.0007}


def test_a_bad_variant_override_names_the_recipe_file(tmp_path, registry):
    """Errors from applying a variant's overrides said `invalid recipe <recipe>`."""
    from fusionkit.studies.grid import expand_grid

    raw = tiny_recipe(tmp_path)
    raw["variants"] = {"a": {"evaluation.splits.0": "test"}}
    rc = validate_recipe(raw, "grid.yaml", registry)
    with pytest.raises(RecipeError) as info:
        expand_grid(rc, registry)
    assert str(info.value).startswith("invalid recipe grid.yaml")
    assert "evaluation.splits is a list" in str(info.value)


@pytest.mark.parametrize(
    ("env", "prefix"),
    [({}, "error: "), ({"WORLD_SIZE": "2", "RANK": "1"}, "error (rank 1): ")],
)
def test_error_line_names_the_rank_of_a_multi_process_launch(monkeypatch, capsys, env, prefix):
    """Under torchrun each process prints its own error: the line says which process."""
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, out, err = run_cli(monkeypatch, capsys, "run", "no/such/recipe.yaml")
    assert code == 2, out + err
    assert err.startswith(prefix), err
    assert "no/such/recipe.yaml" in err
