"""How the report turns single runs into rows: one row per setup whatever else lies in the
folder, never a mean ± std over seeds evaluated on other data or over a run whose recipe was
edited, every run gathered with a link counted, every left-out seed counted against its row,
and labels that stay distinct and print as written. Each case once gave a table with exit 0
that pooled, split or dropped runs."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from fusionkit.core.errors import FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.files import file_sha256
from fusionkit.engine.runs import RunDir
from fusionkit.studies.grid import run_grid, train_and_evaluate
from fusionkit.studies.render import _md, latex_escape
from fusionkit.studies.report import _suffixes, build_report
from tests.conftest import tiny_recipe


def _run(folder, registry, seed, lr=3e-3, data_seed=0, name="tiny"):
    raw = tiny_recipe(folder, epochs=1, seed=seed, lr=lr)
    raw["name"] = name
    raw["data"]["params"]["seed"] = data_seed
    raw["output"]["name"] = f"{name}-lr{lr}-d{data_seed}-s{seed}"
    rc = validate_recipe(raw, "tiny.yaml", registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    return run.path


@pytest.fixture(scope="module")
def made(tmp_path_factory, registry):
    """Single runs of one recipe: seeds 0-2 at lr 3e-3, seeds 0-1 at lr 1e-2, and seed 3 of
    the first setup evaluated on other data (another synthetic data seed)."""
    root = tmp_path_factory.mktemp("rows")
    runs = {("a", s): _run(root / "src", registry, s) for s in (0, 1, 2)}
    runs |= {("b", s): _run(root / "src", registry, s, lr=1e-2) for s in (0, 1)}
    runs[("other", 3)] = _run(root / "src", registry, 3, data_seed=1)
    return root, runs


def _gather(dst, *runs):
    dst.mkdir(parents=True)
    for r in runs:
        shutil.copytree(r, dst / r.name)
    return dst


def _ccc(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["splits"]["test"]["ccc_mean"]


def test_single_runs_of_one_setup_form_one_row_beside_runs_of_another(made, tmp_path):
    """Three seeds used to become three one-seed rows (seed noise tested as a variant
    difference) as soon as runs of the same recipe with another lr sat beside them."""
    _, runs = made
    folder = _gather(tmp_path / "f", *(runs[("a", s)] for s in (0, 1, 2)), *(
        runs[("b", s)] for s in (0, 1)))  # fmt: skip
    rep = build_report([folder], throughput=False, n_boot=100)
    rows = {r["variant"]: r for r in rep.rows}
    assert set(rows) == {"tiny [lr=0.003]", "tiny [lr=0.01]"}
    assert rows["tiny [lr=0.003]"]["seeds"] == [0, 1, 2]
    assert rows["tiny [lr=0.01]"]["seeds"] == [0, 1]
    expect = [_ccc(runs[("a", s)]) for s in (0, 1, 2)]
    mean, std = rows["tiny [lr=0.003]"]["ccc_mean"]
    assert mean == pytest.approx(statistics.fmean(expect))
    assert std == pytest.approx(statistics.stdev(expect))
    assert any("training.lr" in n and "separate rows" in n for n in rep.notes)


def test_seeds_evaluated_on_other_data_get_their_own_row(made, tmp_path):
    """A seed evaluated on other data (features re-extracted between seeds: the same recipe,
    another data fingerprint) used to be pooled into the row's mean ± std, with a note only;
    now it is a row of its own, not compared with the baseline."""
    _, runs = made
    folder = _gather(tmp_path / "f", *(runs[("a", s)] for s in (0, 1, 2)))
    moved = folder / runs[("a", 2)].name  # as if its data had been made anew
    metrics = json.loads((moved / "metrics.json").read_text())
    metrics["data_fingerprints"]["test"] = "f" * 64
    (moved / "metrics.json").write_text(json.dumps(metrics))
    marker = json.loads((moved / "run.json").read_text())
    marker["files"]["metrics.json"] = file_sha256(moved / "metrics.json")
    (moved / "run.json").write_text(json.dumps(marker))

    rep = build_report([folder], throughput=False, n_boot=100)
    assert [r["seeds"] for r in rep.rows] == [[0, 1], [2]]
    fp = json.loads((folder / runs[("a", 0)].name / "metrics.json").read_text())
    assert [r["variant"] for r in rep.rows] == [
        f"tiny [test data={fp['data_fingerprints']['test'][:12]}]",
        f"tiny [test data={'f' * 12}]",
    ]
    mean, _ = rep.rows[0]["ccc_mean"]
    assert mean == pytest.approx(statistics.fmean(_ccc(runs[("a", s)]) for s in (0, 1)))
    assert rep.rows[1]["delta"] == "evaluated on different data"
    assert any("(test data)" in n and "separate rows" in n for n in rep.notes)


def test_seeds_of_another_data_setting_are_not_pooled(made, tmp_path):
    _, runs = made
    folder = _gather(tmp_path / "f", *(runs[("a", s)] for s in (0, 1)), runs[("other", 3)])
    rep = build_report([folder], throughput=False, n_boot=100)
    assert [r["seeds"] for r in rep.rows] == [[0, 1], [3]]
    assert rep.rows[1]["delta"] == "evaluated on different data"


def test_a_run_whose_recipe_was_edited_is_left_out_not_counted_as_a_seed(made, tmp_path):
    """A copy of a run with another seed written into its recipe.yaml used to count as a
    second seed (std 0.000); `eval` refused the same folder."""
    _, runs = made
    folder = _gather(tmp_path / "f", runs[("a", 0)])
    copy = folder / "copy"
    shutil.copytree(runs[("a", 0)], copy)
    text = (copy / "recipe.yaml").read_text()
    assert "  seed: 0\n" in text
    (copy / "recipe.yaml").write_text(text.replace("  seed: 0\n", "  seed: 5\n"))
    rep = build_report([folder], throughput=False, n_boot=100)
    (row,) = rep.rows
    assert row["seeds"] == [0]
    (left,) = rep.excluded
    assert left.status == "unreadable" and left.where == str(copy)
    assert "edited after the run was created" in left.detail
    assert "training.seed: created with 0, recipe.yaml has 5" in left.detail
    assert len(row["left_out"]) == 1  # the row says "1 of 2"


def test_runs_gathered_with_links_are_used(made, tmp_path):
    _, runs = made
    folder = _gather(tmp_path / "f", runs[("a", 0)])
    (folder / "linked").symlink_to(runs[("a", 1)], target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # not followed: it holds it
    (folder / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "beside").mkdir()  # reachable only through `up`
    shutil.copytree(runs[("a", 2)], tmp_path / "beside" / "s2")
    rep = build_report([folder], throughput=False, n_boot=100)
    (row,) = rep.rows
    assert row["seeds"] == [0, 1]  # not seed 2 from beside the folder


def test_a_link_to_a_grid_point_leaves_the_point_in_its_grid(tmp_path, registry):
    """A shortcut to a point of a grid that is also reported used to be taken for a single
    run (when its name sorted first), taking its seed out of the grid's row."""
    raw = tiny_recipe(tmp_path / "proj", epochs=1)
    raw["name"] = "g"
    raw["sweep"] = {"training.lr": [3e-3], "training.seed": [0, 1]}
    record = run_grid(validate_recipe(raw, "g.yaml", registry), registry=registry)
    first = record["order"][0]
    (tmp_path / "proj" / "a_best").symlink_to(f"g/{first}", target_is_directory=True)
    rep = build_report([tmp_path / "proj"], throughput=False, n_boot=100)
    (row,) = rep.rows
    assert row["variant"] == "g (lr=0.003)" and row["seeds"] == [0, 1] and rep.excluded == []


def test_a_baseline_named_by_its_label_finds_its_prefixed_row(made, tmp_path, registry):
    """Once rows carry folder prefixes, `--baseline other` used to be refused."""
    _, runs = made
    one = _gather(tmp_path / "one", runs[("a", 0)], runs[("b", 0)])
    two = _gather(tmp_path / "two", runs[("a", 0)])
    _run(one, registry, 0, name="other")
    rep = build_report([one, two], baseline="other", throughput=False, n_boot=100)
    assert rep.baseline == "one/other"
    with pytest.raises(FusionkitError, match=r"--baseline 'tiny' is shown in 3 rows \(one/tiny \["):
        build_report([one, two], baseline="tiny", throughput=False, n_boot=100)


def test_an_interrupted_single_run_counts_against_its_recipes_row(made, tmp_path):
    _, runs = made
    folder = _gather(tmp_path / "f", *(runs[("a", s)] for s in (0, 1, 2)))
    marker = folder / runs[("a", 2)].name / "run.json"
    rec = json.loads(marker.read_text())
    marker.write_text(json.dumps({**rec, "status": "running"}))
    rep = build_report([folder], throughput=False, n_boot=100)
    (row,) = rep.rows
    assert row["variant"] == "tiny" and row["seeds"] == [0, 1]
    assert [e.status for e in row["left_out"]] == ["incomplete"]


def test_setup_suffixes_always_tell_the_rows_apart():
    base = {"a.x": "1", "b.y": "2", "c.z": "3", "d.w": "4"}
    setups = [base, {**base, "d.w": "5"}, {**base, "a.x": "9", "d.w": "5"}]
    # the first differing key alone (a.x) does not tell the first two apart: d.w is added
    assert _suffixes(setups) == ["x=1, w=4", "x=1, w=5", "x=9, w=5"]
    many = [{**base, **{k: str(i) for k in ("a.x", "b.y", "c.z")}, "e.v": str(i)} for i in (0, 1)]
    assert _suffixes(many) == ["x=0, ...", "x=1, ..."]
    long = [{"k": '"' + "v" * 30 + s + '"'} for s in ("1", "2")]
    assert _suffixes(long) == [f"k={'v' * 30}1", f"k={'v' * 30}2"]  # not cut where that collides
    assert _suffixes([base, dict(base)]) == ["", ""]


def test_names_print_as_written_in_latex_and_markdown():
    assert latex_escape("a|b<c>d") == r"a\textbar{}b\textless{}c\textgreater{}d"
    table = _md(["variant"], [["a*b*c"], ["x`y"], ["`code|span`"]])
    assert "| a\\*b\\*c |" in table and "| x\\`y |" in table
    assert "| `code\\|span` |" in table  # a code span keeps its text, pipes escaped
