"""`fusionkit report --out`: only folders fusionkit made, an earlier report replaced whole, and
the throughput cache used only for what it measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fusionkit.core.errors import DataError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.runs import RunDir
from fusionkit.studies.grid import train_and_evaluate
from fusionkit.studies.robustness import THROUGHPUT_FILE, measure_throughput
from tests.conftest import CliResult as _Result
from tests.conftest import tiny_recipe


@pytest.fixture
def cli(cli_inproc):
    """The console entry point in this process (`error: ...`, exit 2) with the `tiny` data."""
    return lambda *args: cli_inproc([str(a) for a in args])


def one_line_error(res: _Result, *fragments: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    text = " ".join(res.stderr.split())  # the console wraps long lines
    assert text.startswith("error: "), res.stderr
    for f in fragments:
        assert f in text, (f, text)
    return text


@pytest.fixture(scope="module")
def runs(tmp_path_factory, registry):
    """Two tiny trained runs: `a` with a robustness sweep, `b` without."""
    tmp = tmp_path_factory.mktemp("report_out")
    out = {}
    for name, sweep in (("a", True), ("b", False)):
        raw = tiny_recipe(tmp, epochs=1)
        raw["name"] = name
        if sweep:
            raw["evaluation"]["robustness"] = [
                {"name": "shift", "perturbation": "shift", "axis": "k", "values": [0, 8]}
            ]
        rc = validate_recipe(raw, name, registry)
        with RunDir.create(rc, registry) as run:
            train_and_evaluate(rc, run, resume=False, registry=registry)
        out[name] = run.path
    return out


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def report(cli, *args: str) -> _Result:
    return cli("report", *args, "--no-throughput", "--bootstrap=100")


def test_a_user_folder_with_files_is_refused_and_left_unchanged(cli, runs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my own notes\n")
    (mine / "summary.csv").write_text("a,b\n1,2\n")
    before = tree(mine)
    res = report(cli, str(runs["a"]), "--out", str(mine))
    one_line_error(
        res, f"--out {mine} was not made by fusionkit report", "give a new or empty folder"
    )
    assert tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left


def test_a_run_folder_or_a_folder_inside_it_is_refused_as_out(cli, runs):
    run = runs["b"]
    before = tree(run)
    one_line_error(
        report(cli, str(run), "--out", str(run)),
        f"--out {run} is the fusionkit run directory {run} (it has run.json)",
        "give a new or empty folder outside them",
    )
    inside = run / "report"
    one_line_error(
        report(cli, str(run), "--out", str(inside)),
        f"--out {inside} is inside the fusionkit run directory {run}",
    )
    assert tree(run) == before and not inside.exists()


def test_a_grid_folder_is_refused_as_out(cli, runs, tmp_path):
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text("{}")
    one_line_error(
        report(cli, str(runs["b"]), "--out", str(grid / "report")),
        f"is inside the fusionkit grid directory {grid} (it has grid.json)",
    )
    assert [p.name for p in grid.iterdir()] == ["grid.json"]


def test_a_second_report_replaces_the_first_and_leaves_none_of_its_files(cli, runs, tmp_path):
    out = tmp_path / "rep"
    assert report(cli, str(runs["a"]), "--out", str(out)).returncode == 0
    first = tree(out)
    assert "robustness.csv" in first and "plots/robustness_shift.png" in first
    assert "report.html" in first

    res = report(cli, str(runs["b"]), "--out", str(out), "--no-html")
    assert res.returncode == 0, res.stderr
    second = tree(out)
    for stale in ("robustness.csv", "plots/robustness_shift.png", "report.html"):
        assert stale not in second
    assert second["report.md"].decode().startswith("# Comparison report: b\n")
    mark = json.loads(second["report.json"])  # what fusionkit wrote, and nothing else
    assert mark["created_by"] == "fusionkit" and mark["command"].startswith("fusionkit report")
    assert set(second) == set(mark["files"]) | {"report.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # nothing left beside it

    # a file the user added to the report folder is never deleted by the next report
    (out / "notes.txt").write_text("mine\n")
    one_line_error(
        report(cli, str(runs["a"]), "--out", str(out)),
        f"--out {out} holds files its earlier report did not write (notes.txt)",
    )
    assert tree(out) == {**second, "notes.txt": b"mine\n"}


def test_a_report_from_before_reports_were_marked_is_replaced(cli, runs, tmp_path):
    out = tmp_path / "old"
    (out / "plots").mkdir(parents=True)
    (out / "report.md").write_text("# Comparison report: a\n\nolder\n")
    (out / "robustness.csv").write_text("sweep\n")
    (out / "plots" / "robustness_shift.png").write_bytes(b"png")
    assert report(cli, str(runs["b"]), "--out", str(out)).returncode == 0
    got = tree(out)
    assert "robustness.csv" not in got and "plots/robustness_shift.png" not in got
    assert set(got) == set(json.loads(got["report.json"])["files"]) | {"report.json"}


def test_an_empty_folder_gets_the_report_and_stays_the_same_folder(cli, runs, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    inode = out.stat().st_ino
    assert report(cli, str(runs["b"]), "--out", str(out)).returncode == 0
    assert out.stat().st_ino == inode and (out / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_failed_write_leaves_the_earlier_report_intact(cli, runs, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    assert report(cli, str(runs["b"]), "--out", str(out)).returncode == 0
    before = tree(out)
    calls = []

    def full_disk(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    one_line_error(
        report(cli, str(runs["a"]), "--out", str(out)),
        f"could not write the report to {out}",
        "No space left on device",
        "the earlier report there (if any) is intact",
    )
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_out_that_is_a_file_says_a_folder_is_needed(cli, runs, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep\n")
    text = one_line_error(
        report(cli, str(runs["b"]), "--out", str(afile)),
        f"--out {afile} is a file",
        "give a new or empty folder",
    )
    assert "Not a directory" not in text and "free disk space" not in text
    assert afile.read_text() == "keep\n"
    one_line_error(
        report(cli, str(runs["b"]), "--out", str(afile / "sub")),
        f"--out {afile / 'sub'}: {afile} is a file, not a folder",
    )


def test_out_is_checked_before_the_report_is_computed(cli, runs, tmp_path, monkeypatch):
    import fusionkit.studies.report as report_mod

    def never(*a, **k):
        raise AssertionError("the report was computed for a refused --out")

    monkeypatch.setattr(report_mod, "build_report", never)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.txt").write_text("x")
    one_line_error(report(cli, str(runs["b"]), "--out", str(tmp_path / "mine")), "was not made")


def test_a_throughput_cached_for_one_split_is_not_reused_for_another(runs, registry):
    run = runs["b"]
    fast = {"min_seconds": 0.0, "min_passes": 1, "registry": registry}
    test = measure_throughput(run, "test", **fast)
    assert test["split"] == "test" and test["threads"] == 1
    cache = run / THROUGHPUT_FILE
    assert json.loads(cache.read_text())["split"] == "test"

    val = measure_throughput(run, "val", **fast)
    assert val["split"] == "val"
    assert val["frames"] != test["frames"]  # the val split, measured now
    assert json.loads(cache.read_text())["split"] == "val"  # the cache follows

    again = measure_throughput(run, "val", **fast)
    assert again == val  # the same request: the cache

    rec = json.loads(cache.read_text())
    rec["threads"] = 7  # measured with other threads: not the speed asked for
    cache.write_text(json.dumps(rec))
    assert measure_throughput(run, "val", **fast)["threads"] == 1

    with pytest.raises(DataError, match="on split 'nope': its dataset has 'train', 'val'"):
        measure_throughput(run, "nope", **fast)


@pytest.mark.parametrize(
    "damage", [{"frames_per_second": None}, {"frames_per_second": "fast"}, {"threads": 0}]
)
def test_a_damaged_throughput_cache_is_measured_again(runs, registry, tmp_path, damage):
    """A cache that is JSON but not a whole record (no usable rate, threads or device) is
    measured again and rewritten, not read (it ended a report in a traceback)."""
    import shutil

    run = tmp_path / "b"
    shutil.copytree(runs["b"], run, ignore=shutil.ignore_patterns(".lock"))
    fast = {"min_seconds": 0.0, "min_passes": 1, "registry": registry}
    rec = measure_throughput(run, "test", **fast)
    bad = {k: v for k, v in {**rec, **damage}.items() if v is not None}
    (run / THROUGHPUT_FILE).write_text(json.dumps(bad))
    again = measure_throughput(run, "test", **fast)
    assert isinstance(again["frames_per_second"], float) and again["frames_per_second"] > 0
    assert json.loads((run / THROUGHPUT_FILE).read_text()) == again


def _frames_per_second(folder: Path) -> dict[str, str]:
    import csv

    with (folder / "summary.csv").open() as fh:
        return {r["variant"]: r["frames_per_second"] for r in csv.DictReader(fh)}


def test_no_throughput_shows_only_caches_of_the_split_and_of_one_setup(
    cli, runs, registry, tmp_path
):
    """``--no-throughput`` reads caches, but a cache measured on another split is not shown as
    this split's, and caches measured on different devices or thread counts are not put in
    one column: each case leaves the frames/s out with a note saying why."""
    import shutil

    copies = {}
    for name, src in runs.items():
        copies[name] = tmp_path / "runs" / name
        shutil.copytree(src, copies[name], ignore=shutil.ignore_patterns(".lock"))
    fast = {"min_seconds": 0.0, "min_passes": 1, "registry": registry}
    measure_throughput(copies["a"], "test", **fast)
    measure_throughput(copies["b"], "val", **fast)  # another split than the report's
    res = report(cli, str(copies["a"]), str(copies["b"]), "--out", str(tmp_path / "r1"))
    assert res.returncode == 0, res.stderr
    shown = _frames_per_second(tmp_path / "r1")
    assert float(shown["a"]) > 0 and shown["b"] == ""
    text = " ".join((tmp_path / "r1" / "report.md").read_text().split())
    assert "b: no frames/s:" in text and "measured on split 'val', not 'test'" in text

    measure_throughput(copies["b"], "test", **fast)
    cache = copies["b"] / THROUGHPUT_FILE
    rec = json.loads(cache.read_text())
    cache.write_text(json.dumps({**rec, "device": "cuda:0", "threads": 16}))  # another machine
    res = report(cli, str(copies["a"]), str(copies["b"]), "--out", str(tmp_path / "r2"))
    assert res.returncode == 0, res.stderr
    assert set(_frames_per_second(tmp_path / "r2").values()) == {""}
    text = " ".join((tmp_path / "r2" / "report.md").read_text().split())
    assert "frames/s left out: the cached measurements were made on different devices" in text
    assert "b: cuda:0, 16 thread(s)" in text
