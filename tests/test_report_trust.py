"""Reports over folders that hold more than one clean grid: edited grids, repeated seeds,
stale points, ambiguous baselines, damaged files. Each case once gave a table with exit 0 that
pooled, dropped or mislabelled runs."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from fusionkit.core.errors import FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.runs import RunDir
from fusionkit.studies.grid import run_grid, train_and_evaluate
from fusionkit.studies.render import robustness_records, summary_records
from fusionkit.studies.report import build_report, summarize
from fusionkit.studies.scan import collect_runs
from tests.conftest import tiny_recipe


def _grid(tmp, registry, name="cond", **training):
    """2 variants x 2 learning rates (the condition) x 2 seeds, 1 epoch, one robustness sweep."""
    raw = tiny_recipe(tmp, epochs=1, **training)
    raw["name"] = name
    raw["variants"] = {
        "concat": {"model.fusion": {"name": "concat"}},
        "rjca": {"model.fusion": {"name": "rjca", "params": {"recursions": 1}}},
    }
    raw["sweep"] = {"training.lr": [3e-3, 1e-3], "training.seed": [0, 1]}
    raw["evaluation"]["robustness"] = [
        {"name": "shift", "perturbation": "shift", "axis": "k", "values": [0, 8]}
    ]
    run_grid(validate_recipe(raw, f"{name}.yaml", registry), registry=registry)
    return tmp / name


@pytest.fixture(scope="module")
def cond(tmp_path_factory, registry):
    return _grid(tmp_path_factory.mktemp("trust"), registry)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_grid(gdir, fn):
    path = gdir / "grid.json"
    rec = json.loads(path.read_text())
    fn(rec)
    path.write_text(json.dumps(rec))


def _ccc(run_dir, split="test"):
    return json.loads((run_dir / "metrics.json").read_text())["splits"][split]["ccc_mean"]


def _single(tmp, registry, name, **edit):
    raw = tiny_recipe(tmp, epochs=1)
    raw["name"] = name
    for path, value in edit.items():
        section, key = path.split("__")
        raw[section][key] = value
    rc = validate_recipe(raw, name, registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    return run.path


def test_runs_of_another_setup_in_one_grid_folder_get_their_own_row(cond, tmp_path, registry):
    """A grid folder that holds runs of an edited recipe (here: one more seed trained with
    another dropout, merged in by hand) used to pool them into one row while a note said they
    were not pooled."""
    gdir = _copy(cond, tmp_path / "cond")
    raw = tiny_recipe(tmp_path / "other", epochs=1)
    raw["name"] = "cond"
    raw["model"]["head"]["params"]["dropout"] = 0.5
    raw["variants"] = {"concat": {"model.fusion": {"name": "concat"}}}
    raw["sweep"] = {"training.lr": [3e-3], "training.seed": [2]}
    run_grid(validate_recipe(raw, "other.yaml", registry), registry=registry)
    tag = "concat_lr-0.003_seed-2"
    shutil.move(tmp_path / "other" / "cond" / tag, gdir / tag)
    other = json.loads((tmp_path / "other" / "cond" / "grid.json").read_text())["runs"][tag]
    _edit_grid(gdir, lambda r: r["runs"].update({tag: other}))

    notes: list[str] = []
    rows = {r["variant"]: r for r in summarize(collect_runs([gdir]), "test", notes)}
    old = rows["concat (lr=0.003) [dropout=0.2]"]
    new = rows["concat (lr=0.003) [dropout=0.5]"]
    assert old["seeds"] == [0, 1] and new["seeds"] == [2]
    expect = statistics.fmean(_ccc(gdir / f"concat_lr-0.003_seed-{s}") for s in (0, 1))
    assert old["ccc_mean"][0] == pytest.approx(expect)
    assert any("model.head.params.dropout" in n and "separate rows" in n for n in notes)


def test_a_seed_repeated_in_one_grid_folder_counts_once(cond, tmp_path):
    gdir = _copy(cond, tmp_path / "cond")
    shutil.copytree(gdir / "concat_lr-0.003_seed-1", gdir / "concat_lr-0.003_seed-1.0")
    _edit_grid(
        gdir,
        lambda r: r["runs"].update(
            {
                "concat_lr-0.003_seed-1.0": {
                    "values": {"variant": "concat", "training.lr": 0.003, "training.seed": 1.0},
                    "status": "done",
                }
            }
        ),
    )
    rep = build_report([gdir], throughput=False, n_boot=200)
    row = next(r for r in rep.rows if r["variant"] == "concat (lr=0.003)")
    assert row["seeds"] == [0, 1]  # not [0, 1, 1] with a shrunken std
    expect = [_ccc(gdir / f"concat_lr-0.003_seed-{s}") for s in (0, 1)]
    assert row["ccc_mean"] == pytest.approx((statistics.fmean(expect), statistics.stdev(expect)))
    (dup,) = [e for e in rep.excluded if e.status == "duplicate"]
    assert dup.where.endswith("concat_lr-0.003_seed-1.0")


def test_runs_the_grid_no_longer_lists_are_left_out_not_added(cond, tmp_path):
    """After a variant is removed from a grid, its old run folders used to come back as an
    extra row named after the grid, in the Holm family and bold in the LaTeX table."""
    gdir = _copy(cond, tmp_path / "cond")
    stale = [t for t in json.loads((gdir / "grid.json").read_text())["runs"] if "rjca" in t]

    def drop(rec):
        for t in stale:
            del rec["runs"][t]
        rec["order"] = [t for t in rec["order"] if t not in stale]

    _edit_grid(gdir, drop)
    rep = build_report([gdir], throughput=False, n_boot=200)
    assert [r["variant"] for r in rep.rows] == ["concat (lr=0.003)", "concat (lr=0.001)"]
    left = {e.where.rsplit("/", 1)[-1]: e for e in rep.excluded}
    assert set(left) == set(stale) and {e.status for e in left.values()} == {"stale"}
    assert "not a point of grid cond" in left[stale[0]].detail


def test_a_baseline_name_that_reads_two_ways_is_refused(cond, tmp_path, registry):
    """A plain run named like a variant of a grid with conditions used to become the single
    baseline of every row, silently replacing the per-condition comparison."""
    root = tmp_path / "both"
    _copy(cond, root / "cond")
    _single(root, registry, "concat")
    with pytest.raises(FusionkitError, match="both a row of its own and a variant"):
        build_report([root], baseline="concat", throughput=False, n_boot=200)
    # the grid alone: per condition
    rep = build_report([root / "cond"], baseline="concat", throughput=False, n_boot=200)
    assert rep.baseline_of["rjca (lr=0.001)"] == "concat (lr=0.001)"


def test_per_condition_baseline_within_each_folder_when_rows_split(cond, tmp_path):
    """Two copies of a grid with conditions: rows split per folder, and each row is compared
    with the baseline of its own folder and condition (this used to fail with 'no complete
    runs')."""
    a, b = _copy(cond, tmp_path / "a" / "cond"), _copy(cond, tmp_path / "b" / "cond")
    rep = build_report([a, b], baseline="concat", throughput=False, n_boot=200)
    assert rep.baseline_of["b/cond/rjca (lr=0.001)"] == "b/cond/concat (lr=0.001)"
    assert rep.baseline_of["a/cond/rjca (lr=0.003)"] == "a/cond/concat (lr=0.003)"


def test_per_condition_baseline_when_a_variant_is_in_one_folder_only(cond, tmp_path):
    """The rows of a variant found in one folder only used to carry no folder name, so their
    baseline was looked up without one and the report failed with 'no complete runs'."""
    a, b = _copy(cond, tmp_path / "a" / "cond"), _copy(cond, tmp_path / "b" / "cond")
    gone = [t for t in json.loads((b / "grid.json").read_text())["runs"] if "rjca" in t]
    for tag in gone:
        shutil.rmtree(b / tag)

    def drop(rec):
        for t in gone:
            del rec["runs"][t]
        rec["order"] = [t for t in rec["order"] if t not in gone]

    _edit_grid(b, drop)
    rep = build_report([a, b], baseline="concat", throughput=False, n_boot=200)
    assert [r["variant"] for r in rep.rows if "rjca" in r["variant"]] == [
        "a/cond/rjca (lr=0.003)",
        "a/cond/rjca (lr=0.001)",
    ]
    assert rep.baseline_of["a/cond/rjca (lr=0.001)"] == "a/cond/concat (lr=0.001)"
    assert rep.baseline_of["b/cond/concat (lr=0.003)"] == "b/cond/concat (lr=0.003)"


def test_rows_follow_the_order_of_the_report_paths(cond, tmp_path):
    a, b = _copy(cond, tmp_path / "a" / "cond"), _copy(cond, tmp_path / "b" / "cond")
    rep = build_report([b, a], throughput=False, n_boot=200)
    assert rep.rows[0]["variant"] == "b/cond/concat (lr=0.003)"
    assert rep.baseline == "b/cond/concat (lr=0.003)"


def test_left_out_points_count_on_rows_split_by_folder(cond, tmp_path):
    a, b = _copy(cond, tmp_path / "a" / "cond"), _copy(cond, tmp_path / "b" / "cond")
    shutil.rmtree(a / "rjca_lr-0.003_seed-1")
    _edit_grid(a, lambda r: r["runs"]["rjca_lr-0.003_seed-1"].update(status="failed", error="x"))
    rep = build_report([a, b], throughput=False, n_boot=200)
    rows = {r["variant"]: r for r in rep.rows}
    assert len(rows["a/cond/rjca (lr=0.003)"]["left_out"]) == 1
    assert rows["b/cond/rjca (lr=0.003)"]["left_out"] == []
    rec = {r["variant"]: r for r in summary_records(rep)}
    assert rec["a/cond/rjca (lr=0.003)"]["runs_left_out"] == 1


def test_runs_without_the_split_are_listed_as_left_out(cond, tmp_path, registry):
    root = tmp_path / "mixed"
    _copy(cond, root / "cond")
    _single(root, registry, "valonly", evaluation__splits=["val"])
    rep = build_report([root], throughput=False, n_boot=200)
    (e,) = [e for e in rep.excluded if e.status == "no-split"]
    assert e.where.endswith("valonly") and "evaluated on: val" in e.detail


def test_runs_with_other_targets_are_refused_in_one_line(cond, tmp_path, registry):
    root = tmp_path / "targets"
    _copy(cond, root / "cond")
    _single(root, registry, "valence_only", model__targets=["valence"])
    with pytest.raises(FusionkitError, match=r"predict different targets.*\[valence\]"):
        build_report([root], throughput=False, n_boot=200)


def test_two_sweeps_of_one_name_keep_their_own_plot_and_columns(cond, tmp_path):
    a, b = _copy(cond, tmp_path / "a" / "cond"), _copy(cond, tmp_path / "b" / "cond")
    for f in b.glob("*/robustness/shift.json"):  # as if b's sweep shifted another modality
        rec = json.loads(f.read_text())
        rec["params"] = {"modality": "video"}
        f.write_text(json.dumps(rec))
    rep = build_report([a, b], throughput=False, n_boot=200)
    assert sorted(sw.key for sw in rep.sweeps) == ["shift", "shift-2"]
    assert {f"robustness_{sw.slug}" for sw in rep.sweeps} <= set(rep.plots)
    rec = {r["variant"]: r for r in summary_records(rep)}
    assert {sw.curves[0].variant.split("/")[0] for sw in rep.sweeps} == {"a", "b"}
    for sw in rep.sweeps:  # each folder's AUC in its own column (one used to blank the other)
        assert len({c.variant.split("/")[0] for c in sw.curves}) == 1
        for c in sw.curves:
            assert rec[c.variant][f"auc_{sw.key}_mean"] == pytest.approx(c.auc[0])
    assert {r["sweep"] for r in robustness_records(rep)} == {"shift", "shift-2"}


def test_a_damaged_robustness_file_is_left_out_with_a_note(cond, tmp_path):
    gdir = _copy(cond, tmp_path / "cond")
    f = gdir / "concat_lr-0.003_seed-0" / "robustness" / "shift.json"
    rec = json.loads(f.read_text())
    del rec["axis"]
    f.write_text(json.dumps(rec))
    rep = build_report([gdir], throughput=False, n_boot=200)
    assert any(str(f) in n and "'axis'" in n for n in rep.notes)
    (sw,) = rep.sweeps
    curve = next(c for c in sw.curves if c.variant == "concat (lr=0.003)")
    assert curve.runs == 1


def test_a_damaged_grid_record_is_a_note_not_a_traceback(cond, tmp_path):
    gdir = _copy(cond, tmp_path / "cond")
    _edit_grid(gdir, lambda r: r["runs"].update({"concat_lr-0.003_seed-0": "done"}))
    rep = build_report([gdir], throughput=False, n_boot=200)
    assert any("grid.json cannot be read" in n for n in rep.notes)


def test_gate_plots_of_labels_with_one_file_name_do_not_overwrite(tmp_path, registry):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["name"] = "slug"
    raw["model"]["fusion"] = {"name": "rjca", "params": {"recursions": 1}}
    raw["variants"] = {
        "g+1": {"model.gate": {"name": "grjca", "params": {"temperature": 0.5}}},
        "g-1": {"model.gate": {"name": "grjca", "params": {"temperature": 2.0}}},
    }
    run_grid(validate_recipe(raw, "slug.yaml", registry), registry=registry)
    rep = build_report([tmp_path / "slug"], throughput=False, n_boot=200)
    assert len(rep.gates) == 2 and len(set(rep.gates)) == 2
    titles = [rep.plot_titles[k] for k in rep.gates]
    assert titles[0].startswith("g+1") and titles[1].startswith("g-1")


def test_grid_rows_come_before_a_plain_run_beside_the_grid(cond, tmp_path, registry):
    """Under one report path the grids' declared order leads: a single run next to a grid
    folder used to sort first (by folder name) and so become the default baseline."""
    root = tmp_path / "runs"
    _copy(cond, root / "cond")
    _single(root, registry, "alone")
    rep = build_report([root], throughput=False, n_boot=200)
    labels = [r["variant"] for r in rep.rows]
    assert labels[0] == "concat (lr=0.003)" and labels[-1] == "alone", labels
    assert rep.baseline == labels[0]


def test_a_grid_record_is_read_by_its_shape_not_by_who_wrote_it(tmp_path):
    """The report reads a grid.json of the right shape whoever wrote it (a hand-made or
    edited one keeps its order and failed points); only a damaged one is left out."""
    import json

    from fusionkit.engine.runs import read_grid_record

    rec = {"order": ["b", "a"], "runs": {"a": {"values": {"lr": 1}}, "b": {"status": "failed"}}}
    (tmp_path / "grid.json").write_text(json.dumps(rec))
    assert read_grid_record(tmp_path) == rec
    rec["runs"]["a"]["values"] = [1]
    (tmp_path / "grid.json").write_text(json.dumps(rec))
    assert read_grid_record(tmp_path) is None
