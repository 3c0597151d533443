"""The shape of the code base: layers without cycles, a core that names no plugin, one override
rule, validation that builds, a package list that matches the tree."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

from fusionkit.core.errors import RecipeError
from fusionkit.core.recipe import load_recipe, validate_recipe
from fusionkit.engine.session import check_recipe
from fusionkit.studies.grid import expand_grid
from tests.conftest import REPO, tiny_recipe

PACKAGE = REPO / "fusionkit"

#: Which layer may import which (a layer may always import itself).
ALLOWED = {
    "core": set(),
    "layers": {"core"},
    "engine": {"core", "layers"},
    "studies": {"core", "engine", "layers"},
    "testing": {"core", "engine", "layers"},
    "plugin": {"core", "engine", "layers", "testing"},
    "cli": {"core", "engine", "layers", "studies", "testing", "plugin"},
    "__init__": {"core", "plugin"},
    "__main__": {"cli"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every fusionkit module ``path`` imports at run time, at any level (functions too)."""
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            # `from pkg import sub` names the submodule when there is one, else the module
            if name in modules and name.startswith("fusionkit"):
                out.add(name)
    me = _module_name(path)
    out.discard(me)
    # `from fusionkit.x import y` where y is a submodule: keep only the submodule edge
    return {m for m in out if not any(o.startswith(m + ".") for o in out) or m in modules}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def test_no_import_cycle_in_the_package():
    modules = _modules()
    graph = {m: _imports(p, modules) for m, p in modules.items()}
    # packages' __init__ re-exports are not a dependency of their submodules
    for m in list(graph):
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers_import_only_the_layers_below_them():
    modules = _modules()
    problems = []
    for m, p in sorted(modules.items()):
        src = _layer(m)
        for dep in sorted(_imports(p, modules)):
            dst = _layer(dep)
            if dst != src and dst not in ALLOWED[src]:
                problems.append(f"{m} imports {dep}")
    assert not problems, problems


def _builtin_names() -> set[str]:
    """Names of every built-in component and plugin-declared kind, and the plugin packages."""
    from fusionkit.core.registry import CORE_KINDS, load_registry

    reg = load_registry(strict=True)
    core = {k.name for k in CORE_KINDS}
    names = {c.name for c in reg.components() if c.distribution == "fusionkit"}
    names |= {k.name for k in reg.kinds() if k.name not in core}
    names |= {p.name for p in (REPO / "plugins").iterdir() if p.is_dir()}
    return names


def test_the_core_names_no_builtin_component_or_plugin_kind():
    """Code in fusionkit/ (docstrings aside) never spells a built-in plugin's component names:
    it reaches every component through the registry."""
    import dataclasses

    from fusionkit.core.interfaces import GateOutput, Video

    # field names of the core's own records are not component names (`features` is both)
    fields = {f.name for cls in (GateOutput, Video) for f in dataclasses.fields(cls)}
    names = _builtin_names() - fields
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docstrings and node.value in names:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.alias) and node.name.split(".")[0] in names:
                found.append(f"{path.relative_to(REPO)}: imports {node.name}")
    assert not found, found


def test_the_package_list_matches_the_tree():
    """pyproject lists packages explicitly (recipes/ ships as fusionkit.recipes); a new
    sub-package must be added there or it would be missing from a wheel."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {_module_name(p.parent) for p in PACKAGE.rglob("__init__.py")}
    found |= {p.parent.name for p in (REPO / "plugins").glob("*/__init__.py")}
    found.add("fusionkit.recipes")
    assert listed == found
    assert config["package-dir"]["fusionkit.recipes"] == "recipes"


def test_a_cli_override_and_a_grid_variant_give_the_same_recipe(tmp_path, registry):
    """The same change written as `key=value` on the command line and as a grid variant
    resolves to the same recipe (one override rule: a new component drops the old params)."""
    raw = tiny_recipe(tmp_path)
    raw["model"]["fusion"] = {"name": "rjca", "params": {"recursions": 2}}
    raw["model"]["gate"] = {"name": "tagf", "params": {"temperature": 0.5}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    change = {"model.gate.name": "grjca", "model.fusion.params.mode": "agnostic"}
    cli = load_recipe(path, [f"{k}={v}" for k, v in change.items()], registry)
    grid_raw = {**raw, "variants": {"v": change}}
    (point,) = expand_grid(validate_recipe(grid_raw, "g.yaml", registry), registry)
    a, b = cli.model_dump(mode="json"), point.recipe.model_dump(mode="json")
    a.pop("output"), b.pop("output")
    assert a == b
    assert b["model"]["gate"] == {"name": "grjca", "params": {"temperature": 0.1, "relu": True}}


def test_validation_builds_the_model_and_names_the_file(tmp_path, registry):
    """A component whose build rejects its inputs fails `recipe validate`, naming the recipe
    file and the component, before any run directory exists."""
    raw = tiny_recipe(tmp_path)
    raw["model"]["encoders"] = {"audio": {"name": "linear"}}  # rjca needs two modalities
    raw["model"]["fusion"] = {"name": "rjca"}
    rc = validate_recipe(raw, "my_recipe.yaml", registry)  # the schema is fine ...
    with pytest.raises(RecipeError) as info:
        check_recipe(rc, registry)  # ... building is not
    text = str(info.value)
    assert text.startswith("invalid recipe my_recipe.yaml: model.fusion: fusion 'rjca'")
    assert "exactly two modalities" in text
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("where", ["training", "robustness"])
def test_validation_tries_every_perturbation_on_the_datasets_modalities(tmp_path, registry, where):
    """A perturbation of a modality the dataset lacks passed validation; a robustness sweep
    then failed after the whole training, and its resume hint repeated the failure."""
    raw = tiny_recipe(tmp_path)
    if where == "training":
        raw["training"]["perturbations"] = [{"name": "shift", "params": {"modality": "text"}}]
        key = "training.perturbations.0"
    else:
        raw["evaluation"]["robustness"] = [
            {"name": "s", "perturbation": "shift", "params": {"modality": "audio"},
             "axis": "k", "values": [0, 2]},
            {"name": "t", "perturbation": "shift", "params": {"modality": "text"},
             "axis": "k", "values": [0, 2]},
        ]  # fmt: skip
        key = "evaluation.robustness.1 (t, k=0)"
    rc = validate_recipe(raw, "my_recipe.yaml", registry)
    with pytest.raises(RecipeError) as info:
        check_recipe(rc, registry)
    text = str(info.value)
    assert text.startswith(f"invalid recipe my_recipe.yaml: {key}: perturbation shift: video")
    assert "has no modality 'text' (it has: audio, video)" in text
    raw["training"].pop("perturbations", None)
    raw["evaluation"]["robustness"] = raw["evaluation"].get("robustness", [])[:1]
    check_recipe(validate_recipe(raw, "my_recipe.yaml", registry), registry)  # the rest is fine


def test_cli_validate_reports_build_errors_and_run_creates_nothing(tmp_path):
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["model"]["encoders"].pop("audio")
    raw["model"]["fusion"] = {"name": "rjca"}
    raw["output"] = {"dir": str(tmp_path / "runs")}
    path = tmp_path / "one_modality.yaml"
    path.write_text(yaml.safe_dump(raw))
    for cmd in (["recipe", "validate", str(path)], ["run", str(path)]):
        proc = subprocess.run(
            [sys.executable, "-m", "fusionkit", *cmd],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert f"invalid recipe {path}: model.fusion" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_conformance_kit_names_a_component_after_its_registration():
    from fusionkit.plugin import check_fusion
    from fusionkit_baselines.components import ConcatParams, build_concat

    report = check_fusion(build_concat, ConcatParams())
    assert report.name == "concat" and report.ok
    assert "fusion 'concat'" in check_fusion(build_concat, ConcatParams(), in_dims={}).format()
