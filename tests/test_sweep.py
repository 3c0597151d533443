"""Grid expansion, resume of an interrupted grid, failure isolation, and the summary table."""

from __future__ import annotations

import json
import statistics

import pytest

from fusionkit.core.errors import RecipeError
from fusionkit.core.recipe import validate_recipe
from fusionkit.studies.grid import expand_grid, point_tag, run_grid
from fusionkit.studies.render import markdown_table
from fusionkit.studies.report import summarize
from fusionkit.studies.scan import collect_runs
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
    import fusionkit.studies.grid as sweep

    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1, 2]})
    calls = []
    interrupt_at = {"seed-1"}
    real = sweep._run_point

    def flaky(recipe, threads, registry=None):
        name = recipe.output.name
        calls.append(name)
        if name in interrupt_at:
            interrupt_at.clear()
            raise KeyboardInterrupt
        return real(recipe, threads, registry)

    monkeypatch.setattr(sweep, "_run_point", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_grid(rc, registry=registry)
    assert calls == ["seed-0", "seed-1"]
    calls.clear()
    record = run_grid(rc, registry=registry)
    assert calls == ["seed-1", "seed-2"]  # seed-0 was finished and is skipped
    assert all(r["status"] == "done" for r in record["runs"].values())


def test_failed_run_is_recorded_and_others_continue(tmp_path, registry, monkeypatch):
    import fusionkit.studies.grid as sweep

    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1]})
    real = sweep._run_point

    def boom(recipe, threads, registry=None):
        if recipe.training.seed == 0:
            raise RuntimeError("out of memory (simulated)")
        return real(recipe, threads, registry)

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


# ------------------------------------------------------------------------------- variants


def variant_recipe(tmp_path, registry, variants, sweep=None, **model):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["model"]["fusion"] = {"name": "rjca", "params": {"recursions": 2}}
    raw["model"]["gate"] = {"name": "tagf", "params": {"temperature": 0.5}}
    raw["model"].update(model)
    raw["variants"] = variants
    raw["sweep"] = sweep or {}
    return validate_recipe(raw, "ablation.yaml", registry)


def test_variants_change_several_fields_together_crossed_with_the_sweep(tmp_path, registry):
    rc = variant_recipe(
        tmp_path,
        registry,
        {
            "concat": {"model.fusion": {"name": "concat"}, "model.gate.name": "last"},
            "rjca": {"model.gate.name": "last", "model.fusion.params.recursions": 1},
            "tagf_temporal": {"model.gate": {"name": "tagf_temporal", "params": {"hidden": 8}}},
        },
        {"training.seed": [0, 1]},
    )
    points = expand_grid(rc, registry=registry)
    assert [p.tag for p in points] == [
        "concat_seed-0",
        "concat_seed-1",
        "rjca_seed-0",
        "rjca_seed-1",
        "tagf_temporal_seed-0",
        "tagf_temporal_seed-1",
    ]
    by = {p.tag: p.recipe.model for p in points}
    assert (by["concat_seed-1"].fusion.name, by["concat_seed-1"].gate.name) == ("concat", "last")
    assert "recursions" not in by["concat_seed-1"].fusion.params.model_dump()  # rjca's dropped
    assert (by["rjca_seed-0"].fusion.name, by["rjca_seed-0"].gate.name) == ("rjca", "last")
    assert by["rjca_seed-0"].fusion.params.recursions == 1
    assert by["tagf_temporal_seed-0"].gate.params.hidden == 8
    assert [p.values for p in points[:2]] == [
        {"variant": "concat", "training.seed": 0},
        {"variant": "concat", "training.seed": 1},
    ]


def test_changing_a_component_name_drops_the_old_params(tmp_path, registry):
    # the base gate is tagf with temperature 0.5; 'last' takes no params, grjca has its own
    rc = variant_recipe(tmp_path, registry, {}, {"model.gate.name": ["last", "grjca", "tagf"]})
    gates = {
        p.recipe.model.gate.name: p.recipe.model.gate.params
        for p in expand_grid(rc, registry=registry)
    }
    assert gates["last"].model_dump() == {}
    assert gates["grjca"].temperature == 0.1  # grjca's default, not tagf's 0.5
    assert gates["tagf"].temperature == 0.5  # same component: params kept
    rc = variant_recipe(
        tmp_path,
        registry,
        {"g": {"model.gate.params.temperature": 2.0, "model.gate.name": "grjca"}},
    )
    (point,) = expand_grid(rc, registry=registry)
    assert point.recipe.model.gate.params.temperature == 2.0  # set next to the name: kept


def test_variant_mistakes_are_reported_before_any_run(tmp_path, registry):
    with pytest.raises(RecipeError) as err:
        expand_grid(
            variant_recipe(
                tmp_path,
                registry,
                {"bad name": {"model.gate.name": "last"}, "empty": {}, "out": {"output.dir": "x"},
                 "twice": {"training.seed": 3}},
                {"training.seed": [0, 1]},
            ),
            registry=registry,
        )  # fmt: skip
    text = str(err.value)
    assert "variants.bad name: variant names are" in text
    assert "variants.empty: needs at least one" in text
    assert "variants.out.output.dir: a variant cannot set output" in text
    assert "variants.twice.training.seed: is also a sweep axis" in text
    rc = variant_recipe(tmp_path, registry, {"x": {"model.gate.name": "tagff"}})
    with pytest.raises(RecipeError, match=r"sweep point x\].*did you mean 'tagf'"):
        expand_grid(rc, registry=registry)
    assert not (tmp_path / "tiny").exists()


def test_variant_grid_runs_and_reports_in_declared_order(tmp_path, registry):
    rc = variant_recipe(
        tmp_path,
        registry,
        {"zeta": {"model.gate.name": "last"}, "alpha": {"model.fusion": {"name": "concat"},
                                                        "model.gate.name": "last"}},
    )  # fmt: skip
    record = run_grid(rc, registry=registry)
    assert record["order"] == ["zeta", "alpha"]
    assert record["variants"]["alpha"]["model.gate.name"] == "last"
    rows = summarize(collect_runs([tmp_path / "tiny"]), "test")
    assert [r["variant"] for r in rows] == ["zeta", "alpha"]


def test_parallel_workers_give_the_serial_results(tmp_path):
    """-j 2 (spawned worker processes) trains the same models as one process (at the same
    thread count: a different count changes float summation order, hence the weights)."""
    import torch

    raw = tiny_recipe(tmp_path / "par", epochs=1, num_threads=1)
    raw["data"] = {
        "name": "synthetic",  # installed, so the spawned workers find it
        "params": {"num_train": 3, "num_val": 2, "num_test": 2, "min_frames": 100,
                   "max_frames": 150},
        "window": 64,
        "hop": 48,
    }  # fmt: skip
    raw["variants"] = {"a": {"model.head.params.hidden": 4}, "b": {"model.head.params.hidden": 6}}
    par = run_grid(validate_recipe(raw, "p"), workers=2)
    raw["output"]["dir"] = str(tmp_path / "ser")
    threads = torch.get_num_threads()
    try:
        ser = run_grid(validate_recipe(raw, "s"), workers=1)
    finally:
        torch.set_num_threads(threads)
    assert par["order"] == ser["order"] == ["a", "b"]
    for tag in ("a", "b"):
        assert par["runs"][tag]["status"] == ser["runs"][tag]["status"] == "done"
        m_par = json.loads((tmp_path / "par" / "tiny" / tag / "metrics.json").read_text())
        m_ser = json.loads((tmp_path / "ser" / "tiny" / tag / "metrics.json").read_text())
        assert m_par["splits"] == m_ser["splits"]


def _ccc_means(folder) -> list[float]:
    return [
        json.loads(p.read_text())["splits"]["test"]["ccc_mean"]
        for p in sorted(folder.glob("*/metrics.json"))
    ]


def test_two_grids_of_one_name_are_never_pooled_into_one_row(tmp_path, registry):
    """The same grid run into two folders: one row per grid, each the mean of its own seeds
    (they used to merge back into one row of six runs with every seed twice)."""
    for where in ("a", "b"):
        run_grid(
            grid_recipe(tmp_path / where, registry, {"training.seed": [0, 1]}), registry=registry
        )
    runs = collect_runs([tmp_path / "a", tmp_path / "b"])
    notes: list[str] = []
    rows = {r["variant"]: r for r in summarize(runs, "test", notes)}
    assert set(rows) == {"a/tiny/tiny", "b/tiny/tiny"}
    for where in ("a", "b"):
        row = rows[f"{where}/tiny/tiny"]
        assert row["seeds"] == [0, 1]
        assert row["ccc_mean"][0] == pytest.approx(
            statistics.fmean(_ccc_means(tmp_path / where / "tiny"))
        )
    assert notes == []  # same setup, repeated seeds: split without a remark


def test_runs_of_one_label_that_differ_in_more_than_the_seed_are_not_pooled(tmp_path, registry):
    """Two grids of one name with disjoint seeds but another learning rate used to form one
    row of three seeds; now they are two rows and a note names what differs."""
    run_grid(grid_recipe(tmp_path / "a", registry, {"training.seed": [0, 1]}), registry=registry)
    run_grid(
        grid_recipe(tmp_path / "b", registry, {"training.seed": [2]}, lr=1e-3), registry=registry
    )
    notes: list[str] = []
    rows = summarize(collect_runs([tmp_path / "a", tmp_path / "b"]), "test", notes)
    assert {r["variant"]: r["seeds"] for r in rows} == {"a/tiny/tiny": [0, 1], "b/tiny/tiny": [2]}
    assert (
        len(notes) == 1
        and "tiny: the runs of each differ in more than the seed (training.lr)" in notes[0]
    )
    # one grid alone: one row, no remark
    notes = []
    rows = summarize(collect_runs([tmp_path / "a"]), "test", notes)
    assert [(r["variant"], r["seeds"]) for r in rows] == [("tiny", [0, 1])] and notes == []
