"""Grid expansion, resume of an interrupted grid, failure isolation, and the summary table."""

from __future__ import annotations

import json
import statistics

import pytest

from fusionkit.errors import RecipeError
from fusionkit.recipe import validate_recipe
from fusionkit.report import collect_runs, markdown_table, summarize
from fusionkit.sweep import expand_grid, point_tag, run_grid
from tests.conftest import tiny_recipe


def grid_recipe(tmp_path, registry, sweep, **training):
    raw = tiny_recipe(tmp_path, epochs=1, **training)
    raw["sweep"] = sweep
    return validate_recipe(raw, "grid.yaml", registry)


def test_expansion_is_the_cartesian_product_with_readable_names(tmp_path, registry):
    rc = grid_recipe(
        tmp_path,
        registry,
        {"training.seed": [0, 1, 2], "model.gate.name": ["last"], "data.hop": [32, 48]},
    )
    points = expand_grid(rc, registry=registry)
    assert len(points) == 6
    assert points[0].tag == "seed-0_name-last_hop-32"
    assert {(p.recipe.training.seed, p.recipe.data.hop) for p in points} == {
        (s, h) for s in (0, 1, 2) for h in (32, 48)
    }
    assert all(p.recipe.output.dir == str(tmp_path / "tiny") for p in points)
    assert all(not p.recipe.sweep for p in points)


def test_invalid_point_fails_before_any_run(tmp_path, registry):
    rc = grid_recipe(tmp_path, registry, {"model.fusion.name": ["concat", "concatt"]})
    with pytest.raises(RecipeError, match=r"sweep point name-concatt.*did you mean 'concat'"):
        expand_grid(rc, registry=registry)
    assert not (tmp_path / "tiny").exists()


def test_point_tag_sanitises_values():
    assert point_tag({"data.params.x": "a/b c", "training.lr": 0.001}) == "x-a-b-c_lr-0.001"


def test_interrupted_grid_resumes_and_skips_finished_runs(tmp_path, registry, monkeypatch):
    import fusionkit.sweep as sweep

    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1, 2]})
    calls = []
    interrupt_at = {"seed-1"}
    real = sweep._run_point

    def flaky(recipe_json, threads, registry=None):
        name = recipe_json["output"]["name"]
        calls.append(name)
        if name in interrupt_at:
            interrupt_at.clear()
            raise KeyboardInterrupt
        return real(recipe_json, threads, registry)

    monkeypatch.setattr(sweep, "_run_point", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_grid(rc, registry=registry)
    assert calls == ["seed-0", "seed-1"]
    calls.clear()
    record = run_grid(rc, registry=registry)
    assert calls == ["seed-1", "seed-2"]  # seed-0 was finished and is skipped
    assert all(r["status"] == "done" for r in record["runs"].values())


def test_failed_run_is_recorded_and_others_continue(tmp_path, registry, monkeypatch):
    import fusionkit.sweep as sweep

    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1]})
    real = sweep._run_point

    def boom(recipe_json, threads, registry=None):
        if recipe_json["training"]["seed"] == 0:
            raise RuntimeError("out of memory (simulated)")
        return real(recipe_json, threads, registry)

    monkeypatch.setattr(sweep, "_run_point", boom)
    record = run_grid(rc, registry=registry)
    assert record["runs"]["seed-0"]["status"] == "failed"
    assert "simulated" in record["runs"]["seed-0"]["error"]
    assert record["runs"]["seed-1"]["status"] == "done"
    saved = json.loads((tmp_path / "tiny" / "grid.json").read_text())
    assert saved["runs"]["seed-0"]["status"] == "failed"


def test_summary_is_mean_and_sample_std_over_seeds(tmp_path, registry):
    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1, 2], "data.hop": [40, 48]})
    run_grid(rc, registry=registry)
    runs = collect_runs([tmp_path / "tiny"])
    rows = {r["variant"]: r for r in summarize(runs, "test")}
    assert set(rows) == {"tiny (hop=40)", "tiny (hop=48)"}
    values = [
        json.loads((tmp_path / "tiny" / f"seed-{s}_hop-48" / "metrics.json").read_text())["splits"][
            "test"
        ]["ccc_mean"]
        for s in (0, 1, 2)
    ]
    mean, std = rows["tiny (hop=48)"]["ccc_mean"]
    assert mean == pytest.approx(sum(values) / 3)
    assert std == pytest.approx(statistics.stdev(values))
    table = markdown_table(list(rows.values()))
    assert f"{sum(values) / 3:.3f} ± {statistics.stdev(values):.3f}" in table
