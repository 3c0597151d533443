"""Re-running a grid after its recipe changed: edits refused before anything is written,
robustness-only changes evaluated without retraining, repeated points refused, removed points
recorded as stale."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from fusionkit.core.errors import CheckpointError, RecipeError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.train import Trainer
from fusionkit.studies.grid import expand_grid, run_grid
from fusionkit.studies.robustness import robustness_complete
from tests.conftest import tiny_recipe

SHIFT = {"name": "shift", "perturbation": "shift", "params": {"modality": "audio"}, "axis": "k"}


def ablation(tmp_path, variants=None, seeds=(0, 1)) -> dict:
    """A tiny 1-epoch grid: two variants (concat, wide) x ``seeds``."""
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["data"]["params"]["videos"] = 1
    raw["variants"] = variants or {
        "concat": {"model.head.params.hidden": 4},
        "wide": {"model.head.params.hidden": 12},
    }
    raw["sweep"] = {"training.seed": list(seeds)}
    return raw


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_editing_a_finished_grid_is_refused_and_nothing_is_written(tmp_path, registry):
    raw = ablation(tmp_path)
    record = run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    assert all(r["status"] == "done" for r in record["runs"].values())
    before = files(tmp_path / "tiny")
    raw["training"]["lr"] = 0.01
    with pytest.raises(CheckpointError) as err:
        run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    text = str(err.value)
    assert "holds 4 run(s) of this grid trained with another recipe (run -> now)" in text
    assert "concat_seed-0 (training.lr 0.003 -> 0.01)" in text
    assert "and 1 more" in text  # three points named, then a count
    assert "Nothing was run or written" in text and "another output.name or output.dir" in text
    assert files(tmp_path / "tiny") == before  # grid.json and every run file byte-identical
    # a variant's overrides changed under the same name: only its points are named
    raw = ablation(tmp_path)
    raw["variants"]["wide"]["model.head.params.hidden"] = 10
    with pytest.raises(CheckpointError) as err:
        run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    text = str(err.value)
    assert "holds 2 run(s)" in text and "concat" not in text
    assert "wide_seed-1 (model.head.params.hidden 12 -> 10)" in text
    assert files(tmp_path / "tiny") == before


def test_robustness_only_change_evaluates_and_anything_more_is_refused(
    tmp_path, registry, monkeypatch
):
    raw = ablation(tmp_path, seeds=(0,))
    run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("retrained"))
    raw["evaluation"]["robustness"] = [{**SHIFT, "values": [0, 5]}]
    rc = validate_recipe(raw, "grid.yaml", registry)
    weights = files(tmp_path / "tiny" / "concat_seed-0")["model.safetensors"]
    record = run_grid(rc, registry=registry)
    assert all(r["status"] == "done" for r in record["runs"].values())
    for p in expand_grid(rc, registry=registry):
        assert robustness_complete(tmp_path / "tiny" / p.tag, p.recipe)
    assert files(tmp_path / "tiny" / "concat_seed-0")["model.safetensors"] == weights
    # a new robustness value together with a training change: the whole grid is refused
    raw["evaluation"]["robustness"][0]["values"] = [0, 5, 9]
    raw["training"]["lr"] = 0.5
    before = files(tmp_path / "tiny")
    with pytest.raises(CheckpointError, match=r"wide_seed-0 \(training.lr 0.003 -> 0.5\)"):
        run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    assert files(tmp_path / "tiny") == before


def test_points_that_train_the_same_recipe_are_refused_before_any_folder(tmp_path, registry):
    raw = ablation(tmp_path, seeds=(1, 1.0))
    rc = validate_recipe(raw, "grid.yaml", registry)
    with pytest.raises(RecipeError) as err:
        run_grid(rc, registry=registry)
    assert str(err.value) == (
        "invalid recipe grid.yaml: sweep: points concat_seed-1 and concat_seed-1.0 train the "
        "same recipe (values repeat?); remove the repeated value"
    )
    assert not tmp_path.joinpath("tiny").exists()
    twins = {"a": {"model.head.params.hidden": 4}, "b": {"model.head.params.hidden": 4.0}}
    with pytest.raises(RecipeError, match="sweep: points a_seed-0 and b_seed-0 train the same"):
        expand_grid(validate_recipe(ablation(tmp_path, twins), "grid.yaml", registry), registry)


def test_removed_points_are_kept_recorded_as_stale_and_named(tmp_path, registry):
    raw = ablation(tmp_path, seeds=(0,))
    run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    del raw["variants"]["wide"]
    out = io.StringIO()
    console = Console(file=out, width=300, color_system=None)
    rc = validate_recipe(raw, "grid.yaml", registry)
    record = run_grid(rc, console=console, registry=registry)
    assert record["order"] == ["concat_seed-0"]
    assert record["runs"]["concat_seed-0"]["status"] == "done"
    assert record["stale"] == ["wide_seed-0"]
    assert json.loads((tmp_path / "tiny" / "grid.json").read_text())["stale"] == ["wide_seed-0"]
    assert (tmp_path / "tiny" / "wide_seed-0" / "run.json").is_file()  # nothing deleted
    text = out.getvalue()
    assert "grid tiny: 1 runs, 1 already done" in text
    assert (
        f"note: 1 run folder(s) in {tmp_path / 'tiny'} are not points of this grid any more: "
        "wide_seed-0; they are kept, and `fusionkit report` leaves them out"
    ) in text
