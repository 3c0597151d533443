"""Contract guards (mutation round 10b): the recipe contract and the files a run writes.

Each test names a behaviour users rely on that the rest of the suite let break without a
failing test: bad input that was accepted, an error that stopped naming its file or line, a
size bound that could be removed, a write that lost its permissions or its atomicity checks,
a lock or a run folder that could be taken or deleted by mistake.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Protocol, runtime_checkable

import pytest
import torch
import yaml
from pydantic import BaseModel, Field
from safetensors import safe_open
from typer.testing import CliRunner

from fusionkit.cli import recipe as recipe_cli
from fusionkit.cli.weights import convert_weights
from fusionkit.core.errors import CheckpointError, FusionkitError, PluginError, RecipeError
from fusionkit.core.overrides import apply_overrides
from fusionkit.core.params import Params
from fusionkit.core.recipe import load_recipe, recipes_root, validate_recipe
from fusionkit.core.registry import Kind, Registry, raise_for_failures
from fusionkit.core.yamlio import load_yaml
from fusionkit.engine import files
from fusionkit.engine.checkpoint import (
    TrainState,
    WeightsMismatch,
    load_state,
    load_weights,
    save_state,
)
from fusionkit.engine.files import (
    atomic_write_text,
    clean_temp_files,
    read_json,
    save_tensors,
    tensor_shapes,
)
from fusionkit.engine.runs import BEST_FILE, MARKER_FILE, STATE_FILE, RunDir
from tests.conftest import TinyDataset, make_registry, tiny_recipe
from tests.test_commands_trust import _audio_cnn_state
from tests.test_plugin_trust import _load


def problems_of(raw, registry) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "r.yaml", registry)
    assert info.value.source == "r.yaml"
    return info.value.problems


# ----------------------------------------------------------------------------- YAML


def test_a_yaml_syntax_error_names_the_line_and_column_it_is_on():
    """The tab that starts line 3 (column 1) is reported there, not one line off."""
    text = "a: 1\nb: 2\n\tc: 3\n"
    with pytest.raises(RecipeError) as info:
        load_yaml(text, "s.yaml")
    assert info.value.source == "s.yaml"
    assert "at line 3, column 1:" in str(info.value)


def test_a_too_deep_recipe_names_its_file():
    """The nesting bound's error names the file it refused, like every recipe error."""
    with pytest.raises(RecipeError) as info:
        load_yaml("a: " + "[" * 100 + "]" * 100 + "\n", "deep.yaml")
    assert info.value.source == "deep.yaml"
    assert str(info.value).startswith("invalid recipe deep.yaml: nested more than")


# ----------------------------------------------------------------------------- recipe checks


class RootedParams(Params):
    root: str | None = None
    seed: int = 0


class LooseInner(BaseModel):
    gains: list[float] = Field(default_factory=list)


class LooseParams(BaseModel):
    """A plugin's params model on plain pydantic: non-finite floats pass its validation."""

    model_config = {"extra": "forbid"}
    seed: int = 0
    videos: int = 5
    scales: list[float] = Field(default_factory=list)
    table: dict[str, float] = Field(default_factory=dict)
    inner: LooseInner = Field(default_factory=LooseInner)


@pytest.fixture(scope="module")
def rooted_registry():
    """The installed plugins, the in-test `tiny` dataset and a `rooted` one reading a folder."""
    reg = make_registry()
    reg.add("dataset", "rooted", build=TinyDataset, params=RootedParams, summary="test data")
    reg.add("dataset", "loose", build=TinyDataset, params=LooseParams, summary="test data")
    return reg


def test_data_root_and_a_different_params_root_are_refused(tmp_path, rooted_registry):
    """``data.root`` is shorthand for ``data.params.root``: two different folders are an error
    naming both, not one silently chosen over the other; the same folder twice is fine."""
    raw = tiny_recipe(tmp_path)
    raw["data"].update(name="rooted", root="/data/a", params={"root": "/data/b"})
    (problem,) = problems_of(raw, rooted_registry)
    assert problem.startswith("data.root: '/data/a' conflicts with data.params.root='/data/b'")
    raw["data"]["params"]["root"] = "/data/a"
    assert validate_recipe(raw, "r.yaml", rooted_registry).data.params.root == "/data/a"
    del raw["data"]["params"]["root"]
    assert validate_recipe(raw, "r.yaml", rooted_registry).data.params.root == "/data/a"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"scales": [1.0, float("nan")]}, "scales.1"),
        ({"table": {"a": 1.0, "b": float("inf")}}, "table.b"),
        ({"inner": {"gains": [float("-inf")]}}, "inner.gains.0"),
    ],
)
def test_non_finite_values_nested_in_plain_pydantic_params_are_refused(
    tmp_path, rooted_registry, params, field
):
    """The recipe's finiteness rule reaches into lists, mappings and nested models of a
    params model that allows NaN itself, naming the element's dotted path."""
    raw = tiny_recipe(tmp_path)
    raw["data"].update(name="loose", params=params)
    (problem,) = problems_of(raw, rooted_registry)
    assert problem == f"data.params: {field} must be finite numbers (not .inf or .nan)"


def test_an_error_shows_a_long_string_value_shortened(tmp_path, registry):
    """A long text where a number belongs is shown cut short in the error, not in full (a
    pasted file must not become a megabyte of error output)."""
    raw = tiny_recipe(tmp_path)
    raw["training"]["epochs"] = "x" * 100_000
    (problem,) = problems_of(raw, registry)
    assert problem.startswith("training.epochs: ") and len(problem) < 300
    assert "xxx...xxx" in problem


def test_a_recipe_without_a_name_is_named_after_its_file(tmp_path, registry):
    """The run folder of a recipe file without ``name`` is named after the file (characters
    that cannot name a folder become ``-``), not a generic ``run``."""
    raw = tiny_recipe(tmp_path)
    del raw["name"]
    path = tmp_path / "fusion v2.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = load_recipe(path, registry=registry)
    assert rc.name == "fusion-v2" and rc.run_name == "fusion-v2"


def _sweep(**spec):
    return {"perturbation": "shift", "axis": "k", "values": [1, 2], **spec}


@pytest.mark.parametrize(
    ("sweeps", "problem"),
    [
        (
            [_sweep(params={"k": 5})],
            "evaluation.robustness.0.params.k: is the swept axis; remove it from params",
        ),
        ([_sweep(values=[3, 3])], "evaluation.robustness.0.values: contains duplicates"),
        (
            [_sweep(values=[1]), _sweep(values=[2])],
            "evaluation: robustness: two sweeps write robustness/shift_k.json",
        ),
    ],
    ids=["axis-in-params", "repeated-value", "same-results-file"],
)
def test_robustness_sweeps_that_would_report_wrong_points_are_refused(
    tmp_path, registry, sweeps, problem
):
    """A fixed param that the swept axis silently overrides, a value swept twice, and two
    sweeps writing one results file (the second overwriting the first) are refused."""
    raw = tiny_recipe(tmp_path)
    raw["evaluation"]["robustness"] = sweeps
    problems = problems_of(raw, registry)
    assert any(p.startswith(problem) for p in problems), problems


@pytest.mark.parametrize(
    ("path", "value", "where"),
    [
        ("data.window", 1, "data.window:"),  # the loss is a CCC over each window
        ("training.plateau.factor", 1.0, "training.plateau.factor:"),  # never decays
        ("training.plateau.min_lr", 3e-3, "training.plateau.min_lr: 0.003 is not below"),
        ("evaluation.splits", [], "evaluation.splits:"),  # a run with nothing evaluated
    ],
)
def test_settings_that_make_a_run_meaningless_are_refused(tmp_path, registry, path, value, where):
    """Boundary values that would train or score nothing real: a one-frame window (its CCC
    is undefined), a plateau factor of 1 or a floor equal to the learning rate (the rate can
    never decay), and no evaluation split."""
    raw = apply_overrides(tiny_recipe(tmp_path), {path: value})
    problems = problems_of(raw, registry)
    assert any(p.startswith(where) for p in problems), problems


# ----------------------------------------------------------------------------- files


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, umask_022):
    """Reports, markers and weights are readable by others as with ``open`` under the umask
    (the temporary files they are renamed from are created 0600)."""
    text, weights = tmp_path / "report.md", tmp_path / "w.safetensors"
    atomic_write_text(text, "hello\n")
    save_tensors(weights, {"w": torch.zeros(2)}, {})
    assert text.read_text() == "hello\n"
    assert (text.stat().st_mode & 0o777) == 0o644
    assert (weights.stat().st_mode & 0o777) == 0o644


def test_json_larger_than_the_bound_is_refused_naming_the_file(tmp_path, monkeypatch):
    """``read_json`` refuses a file over its size bound before reading it."""
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 1 << 20)
    big = tmp_path / "metrics.json"
    big.write_text(json.dumps({"x": "y" * (1 << 20)}))
    with pytest.raises(CheckpointError) as info:
        read_json(big, "metrics file")
    assert str(info.value) == f"metrics file {big} is larger than 1 MiB"
    small = tmp_path / "small.json"
    small.write_text('{"x": 1}')
    assert read_json(small) == {"x": 1}


def _raw_safetensors(path: Path, header: dict | None, length: int | None = None) -> Path:
    body = json.dumps(header).encode() if header is not None else b""
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body)
    return path


def test_a_safetensors_header_length_beyond_the_bound_is_refused_without_reading(tmp_path):
    """A header that claims exabytes is one CheckpointError naming the file, not an attempt
    to allocate it."""
    path = _raw_safetensors(tmp_path / "huge.safetensors", None, length=1 << 62)
    with pytest.raises(CheckpointError) as info:
        tensor_shapes(path)
    assert str(info.value).startswith(f"{path} is not a readable safetensors file (header of")


def test_a_negative_shape_in_a_safetensors_header_is_refused(tmp_path):
    """Shapes read from a header are validated: a negative dimension names the tensor."""
    header = {"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}}
    path = _raw_safetensors(tmp_path / "neg.safetensors", header)
    with pytest.raises(CheckpointError, match=r"tensor 'w' has no valid shape"):
        tensor_shapes(path)
    ok = _raw_safetensors(
        tmp_path / "ok.safetensors",
        {"w": {"dtype": "F32", "shape": [2, 0], "data_offsets": [0, 0]}},
    )
    assert tensor_shapes(ok) == {"w": (2, 0)}


def test_leftovers_of_interrupted_writes_are_cleaned_one_folder_down(tmp_path):
    """A killed write in ``predictions/`` leaves a ``.name.XXXX.tmp`` file there too; cleaning
    removes it and leaves every other file alone."""
    (tmp_path / "predictions").mkdir()
    top = tmp_path / ".metrics.json.abc.tmp"
    below = tmp_path / "predictions" / ".val.safetensors.abc.tmp"
    kept = [tmp_path / "metrics.json", tmp_path / "predictions" / "val.safetensors"]
    for p in (top, below, *kept):
        p.write_text("x")
    assert sorted(clean_temp_files(tmp_path)) == sorted([top, below])
    assert not top.exists() and not below.exists()
    assert all(p.exists() for p in kept)


# ----------------------------------------------------------------------------- weights convert


def test_weights_convert_never_overwrites_its_source_even_with_force(tmp_path):
    """OUT equal to SRC is refused with --force too: the released checkpoint stays as it was."""
    src = tmp_path / "cnn.pth"
    torch.save(_audio_cnn_state(), src)
    before = src.read_bytes()
    with pytest.raises(CheckpointError, match="is the source file"):
        convert_weights(src, src, "audio_cnn", force=True)
    assert src.read_bytes() == before


def test_weights_convert_refuses_a_weights_param(tmp_path):
    """``--param weights=...`` is refused (the file being converted is the weights), not
    silently dropped."""
    src = tmp_path / "cnn.pth"
    torch.save(_audio_cnn_state(), src)
    out = tmp_path / "cnn.safetensors"
    with pytest.raises(RecipeError, match="weights: not a --param of weights convert"):
        convert_weights(src, out, "audio_cnn", params=[f"weights={tmp_path / 'x.safetensors'}"])
    assert not out.exists()


def test_weights_convert_of_a_component_without_weights_is_one_clear_error(tmp_path):
    """A registered component that is not a torch module (a perturbation) has no weights: one
    PluginError saying so, before the checkpoint is read."""
    with pytest.raises(PluginError, match=r"perturbation 'shift' is not a torch module"):
        convert_weights(tmp_path / "absent.pth", tmp_path / "o.safetensors", "shift")


def test_weights_convert_writes_tensors_that_share_storage_in_the_checkpoint(tmp_path):
    """A checkpoint where two entries share one storage (as torch.save keeps tied tensors)
    converts: each tensor is written with its own copy, values kept, and the file records
    the SHA-256 of the source."""
    sd = _audio_cnn_state()
    shapes: dict[tuple, str] = {}
    pair = None
    for key, value in sd.items():
        if value.is_floating_point() and tuple(value.shape) in shapes:
            pair = (shapes[tuple(value.shape)], key)
            break
        shapes.setdefault(tuple(value.shape), key)
    assert pair is not None
    tied = torch.randn(sd[pair[0]].shape, generator=torch.Generator().manual_seed(0))
    sd[pair[0]] = sd[pair[1]] = tied
    src, out = tmp_path / "tied.pth", tmp_path / "tied.safetensors"
    torch.save(sd, src)
    result = convert_weights(src, out, "audio_cnn")
    assert result.out == out
    with safe_open(str(out), framework="pt") as fh:
        for key in pair:
            torch.testing.assert_close(fh.get_tensor(key), tied, rtol=0, atol=0)
        meta = json.loads(fh.metadata()["fusionkit_weights"])
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- run folders


def _new_run(tmp_path, registry, **output):
    raw = tiny_recipe(tmp_path / "runs")
    raw["output"].update(output)
    rc = validate_recipe(raw, "tiny.yaml", registry)
    return rc, RunDir.create(rc, registry)


def test_a_failed_start_never_deletes_a_run_that_holds_weights(tmp_path, registry):
    """``remove_if_unstarted`` deletes only what ``create`` wrote: a folder holding trained
    weights or a training state is kept, with every file."""
    _, run = _new_run(tmp_path, registry)
    for name in (BEST_FILE, STATE_FILE):
        (run / name).write_bytes(b"weights")
        assert run.remove_if_unstarted() is False
        assert (run / name).read_bytes() == b"weights" and (run / MARKER_FILE).is_file()
        (run / name).unlink()
    assert run.remove_if_unstarted() is True and not run.path.exists()


def test_an_exact_run_name_that_is_taken_is_refused_not_renamed(tmp_path, registry):
    """With ``exact`` (a name the user chose), a taken folder is an error saying how to
    resume it; without, the next free ``-2`` name is used."""
    rc, first = _new_run(tmp_path, registry, name="mine")
    first.unlock()
    with pytest.raises(CheckpointError, match=r"runs/mine already exists; resume it with"):
        RunDir.create(rc, registry, exact=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine"]
    second = RunDir.create(rc, registry)
    assert second.path.name == "mine-2"
    second.unlock()


def test_writes_into_a_run_require_its_lock(tmp_path, registry):
    """A RunDir opened without its lock cannot mark the run complete or running, or delete
    its files; the run marker is left as it was."""
    _, run = _new_run(tmp_path, registry)
    run.unlock()
    before = (run / MARKER_FILE).read_bytes()
    reopened = RunDir.open(run.path)
    for write in (
        lambda: reopened.mark_complete([]),
        reopened.mark_running,
        reopened.clean_temp_files,
    ):
        with pytest.raises(RuntimeError, match="without holding the run's lock"):
            write()
    assert (run / MARKER_FILE).read_bytes() == before


# ----------------------------------------------------------------------------- recipe commands


def test_recipe_copy_keeps_an_existing_file_unless_forced(tmp_path):
    """``fusionkit recipe copy`` never overwrites a user's file without --force; into a
    folder it writes ``<name>.yaml`` there, byte for byte the shipped recipe."""
    shipped = (recipes_root() / "quickstart.yaml").read_bytes()
    mine = tmp_path / "mine.yaml"
    mine.write_text("my edits\n")
    res = CliRunner().invoke(recipe_cli.app, ["copy", "quickstart", str(mine)])
    assert isinstance(res.exception, FusionkitError)
    assert str(res.exception) == f"{mine} exists; pass --force to overwrite it"
    assert mine.read_text() == "my edits\n"
    res = CliRunner().invoke(recipe_cli.app, ["copy", "quickstart", str(mine), "--force"])
    assert res.exit_code == 0, res.output
    assert mine.read_bytes() == shipped
    res = CliRunner().invoke(recipe_cli.app, ["copy", "quickstart", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "quickstart.yaml").read_bytes() == shipped


def test_recipe_validate_builds_every_point_of_a_grid(tmp_path, cli):
    """``recipe validate`` of a grid checks each point as ``run`` would build it: a point
    that cannot be built fails validation even when the first point is fine."""
    raw = tiny_recipe(tmp_path)
    raw["sweep"] = {"model.targets": [["valence"], ["dominance"]]}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    code, out, err = cli("recipe", "validate", path)
    assert code == 2 and "dominance" in err, out + err
    raw["sweep"] = {"model.targets": [["valence"], ["arousal"]]}
    path.write_text(yaml.safe_dump(raw))
    code, out, err = cli("recipe", "validate", path)
    assert code == 0 and "a grid of 2 runs" in out, out + err


# ----------------------------------------------------------------------------- registry


def _fusion(params: Params, *, in_dims: dict[str, int]):
    """A fusion."""


def test_registration_refuses_bad_names_and_a_second_registration(tmp_path):
    """A component name that a recipe could not use, and one plugin registering the same
    name twice, are refused when registering."""
    reg = Registry()
    for name in ("Concat", "my-fusion", "2fusion", ""):
        with pytest.raises(PluginError, match="names are lowercase letters, digits and"):
            reg.add("fusion", name, build=_fusion)
    reg.add("fusion", "mine", build=_fusion)
    with pytest.raises(PluginError, match=r"registers fusion 'mine' twice"):
        reg.add("fusion", "mine", build=_fusion)
    assert reg.names("fusion") == ["mine"]


@runtime_checkable
class _Scorer(Protocol):
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class _ScorerBuild(Protocol):
    def __call__(self, params: BaseModel) -> _Scorer: ...


def test_a_kind_cannot_be_redeclared_differently():
    """A plugin declaring a kind that exists with another contract is refused naming who
    declared it first; the core kind keeps its contract. Declaring the same kind again is
    harmless."""
    reg = Registry()
    core = reg.kind("fusion")
    with pytest.raises(
        PluginError, match=r"declares kind 'fusion', already declared by 'fusionkit'"
    ):
        reg.add_kind(Kind("fusion", _ScorerBuild, _Scorer, module=True))
    assert reg.kind("fusion") == core
    reg.add_kind(core)
    assert reg.kind("fusion") == core


def test_build_refuses_unvalidated_params_and_a_non_module_for_a_module_kind():
    """``Registry.build`` takes only a validated params instance of the component's model,
    and a kind declared as torch modules refuses a build that returns something else, even
    when that object has every attribute of the kind's protocol."""
    reg = Registry()
    reg.add_kind(Kind("scorer", _ScorerBuild, _Scorer, module=True))
    reg.add("scorer", "plain", build=lambda p: lambda x: 2 * x, params=RootedParams)
    with pytest.raises(TypeError, match=r"must be a validated RootedParams instance, got dict"):
        reg.build("scorer", "plain", {"seed": 1}, where="model.scorer")
    with pytest.raises(RecipeError) as info:
        reg.build("scorer", "plain", RootedParams(), where="model.scorer")
    assert "model.scorer: scorer 'plain'" in str(info.value)
    assert "built a function, not a torch.nn.Module" in str(info.value)


DECLARES_KIND = """
from typing import Protocol, runtime_checkable
from fusionkit import plugin

class GaugeBuild(Protocol):
    def __call__(self, params): ...

@runtime_checkable
class Gauge(Protocol):
    pass

@plugin.hookimpl
def fusionkit_register_kinds(registry):
    registry.add_kind(plugin.Kind("cg_gauge", build=GaugeBuild, returns=Gauge))

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add("cg_gauge", "cg_one", build=lambda p: object())
"""


def test_a_kind_is_recorded_as_declared_by_the_plugin_that_declared_it(tmp_path, monkeypatch):
    """``plugins kinds`` and the redeclaration error name the distribution that declared a
    kind, not fusionkit."""
    reg, msgs = _load(tmp_path, monkeypatch, ("fk-cg-gauges", "fkt_cg_gauges", DECLARES_KIND))
    assert msgs == []
    assert reg.kind("cg_gauge").distribution == "fk-cg-gauges"
    assert reg.get("cg_gauge", "cg_one").distribution == "fk-cg-gauges"
    assert reg.kind("fusion").distribution == "fusionkit"


CLASHING = """
from fusionkit import plugin
from fusionkit.core.params import EmptyParams

class Fusion:
    pass

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add("fusion", "cg_dup", build=lambda p, *, in_dims: Fusion(), params=EmptyParams)
"""


def test_strict_plugins_after_loading_fails_on_a_name_clash(tmp_path, monkeypatch):
    """A recipe's ``strict_plugins: true`` (checked after the registry is loaded) fails on a
    name two distributions register, naming both, as ``--strict`` does."""
    reg, _ = _load(
        tmp_path,
        monkeypatch,
        ("fk-cg-one", "fkt_cg_one", CLASHING),
        ("fk-cg-two", "fkt_cg_two", CLASHING),
    )
    assert reg.failures == [] and reg.clashes() == [("fusion", "cg_dup")]
    with pytest.raises(PluginError) as info:
        raise_for_failures(reg)
    message = str(info.value)
    assert message.startswith("strict plugin loading: 1 problem(s): fusion 'cg_dup' is registered")
    assert "fk-cg-one" in message and "fk-cg-two" in message


def test_a_build_refusing_its_inputs_is_blamed_on_the_recipe_path():
    """A build function's ValueError becomes one RecipeError line that starts with the
    recipe path of the component, then its kind and name, then the reason."""

    def picky(params: RootedParams):
        raise ValueError("needs at least two modalities")

    reg = Registry()
    reg.add_kind(Kind("scorer", _ScorerBuild, _Scorer, module=True))
    reg.add("scorer", "picky", build=picky)
    with pytest.raises(RecipeError) as info:
        reg.build("scorer", "picky", RootedParams(), where="model.scorer")
    assert info.value.problems == [
        "model.scorer: scorer 'picky' cannot be built: needs at least two modalities"
    ]


# ----------------------------------------------------------------------------- checkpoints


def test_a_training_state_whose_optimizer_does_not_fit_names_the_file(tmp_path):
    """Resuming with an optimizer laid out differently from the saved one (another number of
    parameter groups) is one CheckpointError naming the state file, not a torch error."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    path = tmp_path / "state.safetensors"
    save_state(path, model, opt, sched, TrainState(recipe_sha256="x", epochs_done=1), {})
    other = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias]}], lr=1e-3)
    with pytest.raises(CheckpointError) as info:
        load_state(path, model, other, torch.optim.lr_scheduler.ReduceLROnPlateau(other))
    assert str(info.value).startswith(f"{path}: optimizer or scheduler state does not fit")
    state, _ = load_state(path, model, opt, sched)
    assert state.epochs_done == 1


def test_weights_that_do_not_fit_the_model_name_the_file_and_the_keys(tmp_path):
    """Loading a weights file with a missing key or a wrong shape is one WeightsMismatch that
    names the file, the key and both shapes (not a torch traceback)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    path = tmp_path / "model.safetensors"
    sd = dict(model.state_dict())
    del sd["1.bias"]
    save_tensors(path, sd, {})
    with pytest.raises(WeightsMismatch) as info:
        load_weights(path, model)
    assert str(info.value) == (
        f"{path} does not fit the model built from the run's recipe: missing keys 1.bias"
    )
    sd = {**model.state_dict(), "0.weight": torch.zeros(4, 3)}
    save_tensors(path, sd, {})
    with pytest.raises(WeightsMismatch, match=r"shape mismatch 0\.weight: file \(4, 3\) vs model"):
        load_weights(path, model)


def test_read_json_names_the_file_when_it_is_missing_a_folder_or_not_json(tmp_path):
    """Every problem reading a JSON file is a CheckpointError naming it and what is wrong."""
    bad, absent = tmp_path / "metrics.json", tmp_path / "absent.json"
    bad.write_text('{"splits": ')
    for path, says in (
        (bad, "is not valid JSON ("),
        (absent, "is missing"),
        (tmp_path, "is a folder"),
    ):
        with pytest.raises(CheckpointError) as info:
            read_json(path, "metrics file")
        assert str(info.value).startswith(f"metrics file {path} {says}")


def test_weights_convert_refuses_non_finite_weights(tmp_path):
    """A checkpoint holding a NaN is refused naming the tensor and the count, and no file is
    written (NaN weights make every feature and prediction NaN)."""
    sd = _audio_cnn_state()
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    src, out = tmp_path / "nan.pth", tmp_path / "nan.safetensors"
    torch.save(sd, src)
    with pytest.raises(CheckpointError) as info:
        convert_weights(src, out, "audio_cnn")
    assert str(info.value).startswith(
        f"{src}: tensor {key!r} (1 of {sd[key].numel()} values are NaN or infinite)"
    )
    assert not out.exists()


def test_weights_convert_of_an_empty_checkpoint_says_it_is_empty(tmp_path):
    """A checkpoint holding an empty dict is refused saying there are no tensors."""
    src = tmp_path / "empty.pth"
    torch.save({}, src)
    with pytest.raises(CheckpointError) as info:
        convert_weights(src, tmp_path / "o.safetensors", "audio_cnn")
    assert str(info.value) == f"{src} holds an empty dict: no tensors to convert"
