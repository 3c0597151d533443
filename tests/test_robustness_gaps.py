"""Robustness sweeps left short or extended: a report says which declared values its runs lack,
and values added from the command line join the recipe's sweep of that name."""

from __future__ import annotations

import json

from tests.conftest import tiny_recipe


def test_a_sweep_interrupted_in_every_run_is_noted_in_the_report(tmp_path, cli):
    """A grid Ctrl-C'd during its robustness sweeps leaves complete runs whose
    ``robustness/<name>.json`` holds the first values only (written after every value). The
    report's AUC then covers a shorter axis than the recipe declares: it must say so."""
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["evaluation"]["robustness"] = [
        {"name": "span", "perturbation": "span_dropout", "axis": "rate", "values": [0, 0.5, 1]}
    ]
    raw["sweep"] = {"training.seed": [0, 1]}
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(json.dumps(raw))
    code, _, err = cli("run", recipe, "-q")
    assert code == 0, err
    grid = tmp_path / "tiny"
    for run in ("seed-0", "seed-1"):  # the state a Ctrl-C after the second value leaves
        path = grid / run / "robustness" / "span.json"
        rec = json.loads(path.read_text())
        assert list(rec["results"]["test"]) == ["0.0", "0.5", "1.0"]
        del rec["results"]["test"]["1.0"]
        path.write_text(json.dumps(rec))
    code, out, err = cli("runs", "list", grid)
    assert code == 0, err
    assert "partial" in out and "1 of 3" in out  # runs list sees it (a wrapped table cell)
    code, _, err = cli("report", grid, "--out", tmp_path / "rep", "--no-throughput",
                       "--bootstrap", "100")  # fmt: skip
    assert code == 0, err
    text = " ".join((tmp_path / "rep" / "report.md").read_text().split())
    notes = text.split("Notes:", 1)[1] if "Notes:" in text else ""
    assert "robustness sweep span: 2 run(s) lack values their recipe declares" in notes
    assert "e.g. 1 of 3: 1.0" in notes and "fusionkit robustness RUN" in notes


def test_command_line_values_join_the_recipes_sweep_of_that_name(tmp_path, cli):
    """`fusionkit robustness RUN --name span` with other values of the same sweep adds them to
    the run's recipe.yaml (it replaced the declared ones), so later sweeps check all."""
    import yaml

    raw = tiny_recipe(tmp_path, epochs=1)
    raw["evaluation"]["robustness"] = [
        {"name": "span", "perturbation": "span_dropout", "axis": "rate", "values": [0, 0.5]}
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(raw))
    code, _, err = cli("run", recipe, "-q")
    assert code == 0, err
    run = tmp_path / "tiny"
    code, _, err = cli("robustness", run, "--perturb", "span_dropout", "--axis", "rate",
                       "--values=0.25,1", "--name", "span")  # fmt: skip
    assert code == 0, err
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["evaluation"]["robustness"]
    assert [s["values"] for s in saved if s["name"] == "span"] == [[0.0, 0.25, 0.5, 1.0]]
    rec = json.loads((run / "robustness" / "span.json").read_text())
    assert sorted(p["value"] for p in rec["results"]["test"].values()) == [0.0, 0.25, 0.5, 1.0]


def _seed_grid(tmp_path, cli, seeds: int):
    """A trained one-epoch grid of the tiny recipe over ``seeds`` seeds: its folder."""
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["sweep"] = {"training.seed": list(range(seeds))}
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(json.dumps(raw))
    code, _, err = cli("run", recipe, "-q")
    assert code == 0, err
    return tmp_path / "tiny"


def test_a_sweep_run_while_a_run_was_unfinished_is_named_then_noted_in_the_report(tmp_path, cli):
    """`fusionkit robustness GRID` names every run it leaves out (here one without its
    metrics.json, as before a run finishes) instead of passing over it; once that run is whole,
    the report says the sweep covers 2 of its 3 runs rather than giving an AUC over fewer seeds
    without a word."""
    grid = _seed_grid(tmp_path, cli, 3)
    metrics = grid / "seed-2" / "metrics.json"
    kept = metrics.read_bytes()
    metrics.unlink()
    sweep = ["--perturb", "span_dropout", "--axis", "rate", "--values=0,1"]
    code, out, err = cli("robustness", grid, *sweep)
    assert code == 0, err
    assert f"left out {grid / 'seed-2'}" in err and "1 run(s) left out" in err
    assert "seed-0" in out and "seed-1" in out and "seed-2" not in out
    metrics.write_bytes(kept)
    code, _, err = cli("report", grid, "--out", tmp_path / "rep", "--no-throughput",
                       "--bootstrap", "100")  # fmt: skip
    assert code == 0, err
    text = " ".join((tmp_path / "rep" / "report.md").read_text().split())
    said = "robustness sweep span_dropout_rate (span_dropout over rate on test) was computed "
    assert said + "for part of the runs only (tiny: 2 of 3 runs)" in text


def test_runs_list_and_report_agree_on_what_a_run_is(tmp_path, cli, monkeypatch):
    """A run whose recipe.yaml was edited is unreadable in `runs list` as in `report` (it
    showed complete with a score), and a grid point recorded as done is incomplete without its
    run.json and missing without its folder (it showed done)."""
    import shutil

    grid = _seed_grid(tmp_path, cli, 4)
    saved = grid / "seed-0" / "recipe.yaml"
    saved.write_text(saved.read_text().replace("lr: 0.003", "lr: 0.004"))
    (grid / "seed-1" / "run.json").unlink()
    shutil.rmtree(grid / "seed-2")
    monkeypatch.setenv("COLUMNS", "500")  # one table row per line
    code, out, err = cli("runs", "list", grid)
    assert code == 0, err
    listed = " ".join(out.split())
    assert f"{grid / 'seed-0'} unreadable:" in listed and "recipe.yaml" in listed
    assert f"{grid / 'seed-1'} incomplete: no run.json" in listed
    assert f"{grid / 'seed-2'} missing: recorded as done, but the run is gone" in listed
    assert f"{grid / 'seed-3'} complete" in listed
    code, out, err = cli("report", grid, "--out", tmp_path / "rep", "--no-throughput",
                         "--bootstrap", "100")  # fmt: skip
    assert code == 0, err
    said = " ".join(out.split())
    for point, status in (("seed-0", "unreadable"), ("seed-1", "incomplete"),
                          ("seed-2", "missing")):  # fmt: skip
        assert f"left out {grid / point} (tiny): {status}:" in said, said
