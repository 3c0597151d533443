"""`fusionkit runs list` keeps the promises of docs/recipes.md: a run whose metrics.json was
changed after it finished is not shown as complete with the changed number, and every run path
prints in full (wrapped, never cut) when the output is a log file or a narrow terminal."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import tiny_recipe


def _train(cli, tmp_path, name: str):
    recipe = tiny_recipe(tmp_path / "runs", epochs=1, num_threads=1)
    recipe["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _out, err = cli("run", str(path), "-q")
    assert code == 0, err
    return tmp_path / "runs" / name


def test_runs_list_does_not_show_a_changed_metrics_file_as_complete(cli, tmp_path):
    """An edited metrics.json makes the run unreadable, as report says, not "complete" with
    the edited CCC."""
    run = _train(cli, tmp_path, "tiny")
    path = run / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["splits"]["test"]["ccc_mean"] = 0.987654
    path.write_text(json.dumps(metrics))
    code, out, _ = cli("runs", "list", str(tmp_path / "runs"))
    assert code == 0
    assert "0.9877" not in out, out  # a number fusionkit's own report refuses to use
    assert "unreadable" in out or "changed" in out, out  # as `fusionkit report` says


def test_runs_list_prints_every_run_path_in_full(cli, tmp_path):
    """Two runs whose long names share a prefix print as two distinct paths."""
    name = "a_rather_long_run_name_for_the_tiny_dataset_seed-0"
    _train(cli, tmp_path, name)
    _train(cli, tmp_path, name)  # the second run is <name>-2
    code, out, _ = cli("runs", "list", str(tmp_path / "runs"))
    assert code == 0
    text = "".join(out.split())  # wrapped cells are acceptable, cut ones are not
    for folder in (name, f"{name}-2"):
        assert f"runs/{folder}" in text, out
    assert "…" not in out, out


def test_run_json_records_the_commit_of_the_fusionkit_checkout(tmp_path, monkeypatch):
    """The git commit in run.json is the fusionkit checkout's (``-dirty`` with uncommitted
    changes), whatever folder the command runs in, not the working folder's repository."""
    import subprocess

    from fusionkit.engine.runs import _git_sha
    from tests.conftest import REPO

    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    if not head:
        pytest.skip("fusionkit is not run from a git checkout here")
    other = tmp_path / "other_repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    monkeypatch.chdir(other)
    assert _git_sha() in (head, f"{head}-dirty")
