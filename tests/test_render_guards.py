"""Guards for the comparison report's statistics, rendering and output folder.

Statistics (:mod:`fusionkit.studies.stats`) are checked against numpy written out in the test;
the rendered tables (:mod:`fusionkit.studies.render`) against values worked out by hand from a
report built here (no training); the report folder (:mod:`fusionkit.studies.reportdir`)
against what it promises: every file listed in its mark, an earlier report or a user's files
never lost, the mark moved in last.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from fusionkit.core.errors import FusionkitError
from fusionkit.studies import reportdir
from fusionkit.studies.render import (
    delta_table,
    latex_table,
    markdown_table,
    render_html,
    render_markdown,
    report_files,
    results_table,
)
from fusionkit.studies.report import Curve, FlagGate, LearningCurve, Report, Sweep, adjust_holm
from fusionkit.studies.reportdir import REPORT_MARK, check_report_dir, write_report
from fusionkit.studies.scan import Excluded
from fusionkit.studies.stats import (
    BootstrapResult,
    auc_normalised,
    holm,
    paired_bootstrap,
    video_sums,
)

KEYS = ("ccc_valence", "ccc_arousal", "ccc_mean")

# ------------------------------------------------------------------------------ statistics


def _runs(n_runs: int, n_videos: int, noise: float, seed: int) -> list[np.ndarray]:
    """Per run, per-video sums ``(V, 2, 6)`` of noisy predictions of shared targets."""
    rng = np.random.default_rng(seed)
    trng = np.random.default_rng(99)
    targets = [trng.normal(size=(int(trng.integers(20, 40)), 2)) for _ in range(n_videos)]
    out = []
    for _ in range(n_runs):
        sums = [
            video_sums(t + noise * rng.normal(size=t.shape), t, np.ones(len(t), bool))
            for t in targets
        ]
        out.append(np.stack(sums))
    return out


def test_a_bootstrap_needs_runs_on_both_sides():
    """A side without runs is refused with the reason, not turned into NaN or an index error."""
    a = _runs(1, 4, 0.5, 0)
    for left, right in ((a, []), ([], a)):
        with pytest.raises(ValueError, match="at least one run on each side"):
            paired_bootstrap(left, right, n_boot=20)


def test_a_bootstrap_refuses_runs_on_other_videos_or_targets():
    """Runs on a different number of videos (or targets) cannot be paired by video: the
    refusal names the shapes that disagree."""
    a, b = _runs(1, 4, 0.5, 0), _runs(1, 5, 0.5, 1)
    with pytest.raises(ValueError, match=r"runs disagree on .*\(4, 2, 6\), \(5, 2, 6\)"):
        paired_bootstrap(a, b, n_boot=20)
    one_target = [a[0][:, :1]]
    with pytest.raises(ValueError, match="runs disagree"):
        paired_bootstrap(a, one_target, n_boot=20)


def test_the_bootstrap_seed_chooses_the_resamples():
    """The same seed repeats the interval and p exactly; another seed draws other videos."""
    a, b = _runs(2, 6, 0.4, 0), _runs(2, 6, 0.8, 1)
    first = paired_bootstrap(a, b, n_boot=200, seed=7)
    again = paired_bootstrap(a, b, n_boot=200, seed=7)
    other = paired_bootstrap(a, b, n_boot=200, seed=8)
    np.testing.assert_array_equal(first.ci_low, again.ci_low)
    np.testing.assert_array_equal(first.p_value, again.p_value)
    assert not np.array_equal(first.ci_low, other.ci_low)
    np.testing.assert_array_equal(first.delta, other.delta)  # the observed Δ is no draw


def test_the_bootstrap_defaults_are_2000_resamples_and_a_95_percent_interval():
    """The documented defaults: 2000 resamples, a 95% interval."""
    a, b = _runs(1, 5, 0.4, 0), _runs(1, 5, 0.8, 1)
    res = paired_bootstrap(a, b)
    assert (res.n_boot, res.n_videos, res.confidence) == (2000, 5, 0.95)


def test_the_auc_of_a_sweep_at_one_strength_is_the_mean_of_its_values():
    """All points at one strength (no axis to rescale): the AUC is the mean of the values,
    not NaN from dividing by a zero range."""
    assert auc_normalised([2, 2], [0.3, 0.5]) == pytest.approx(0.4)
    assert auc_normalised([0, 0, 0], [0.1, 0.2, 0.6]) == pytest.approx(0.3)


def test_a_bootstrap_where_every_resample_is_undefined_gives_nan_not_a_crash():
    """A target whose CCC is 0 / 0 on every video leaves no resample: the interval and p are
    NaN (no test), as for the observed difference, rather than an exception."""
    mask = np.ones(30, bool)
    label = np.zeros((30, 2))
    label[:, 1] = np.random.default_rng(0).normal(size=30)
    pred = label.copy()  # the first target: prediction and label both constant 0
    a = [np.stack([video_sums(pred, label, mask) for _ in range(3)])]
    b = [np.stack([video_sums(pred * 0.5, label, mask) for _ in range(3)])]
    res = paired_bootstrap(a, b, n_boot=50)
    assert np.isnan(res.delta[0]) and np.isnan(res.p_value[0]) and np.isnan(res.ci_low[0])


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ([0.2, 1.2], r"must lie in \[0, 1\]"),
        ([-0.01, 0.3], r"must lie in \[0, 1\]"),
        ([[0.1, 0.2]], "expects a 1-D sequence"),
    ],
    ids=["above-1", "below-0", "2-d"],
)
def test_holm_refuses_what_are_not_p_values(bad: list[Any], why: str):
    """p-values outside [0, 1] and a table instead of a list are refused, not adjusted."""
    with pytest.raises(ValueError, match=why):
        holm(bad)


# ------------------------------------------------------------------------------ a report


def _run(name: str, seed: int) -> SimpleNamespace:
    """A stand-in for a run record: what the report files read of a run."""
    metrics = {
        "splits": {"test": {"ccc_mean": 0.5}},
        "parameters": 7,
        "train_seconds": 1.0,
        "epochs_run": 2,
        "best_epoch": 1,
    }
    return SimpleNamespace(
        name=name,
        seed=seed,
        run_dir=Path("/runs") / f"{name}_{seed}",
        metrics=metrics,
        fingerprint=lambda split: f"fp-{split}",
    )


def _row(
    variant: str,
    means: list[float],
    std: float = 0.01,
    seeds: tuple[int, ...] = (0, 1),
    delta: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """A report row as ``build_report`` makes it, with chosen means."""
    row: dict[str, Any] = {
        "variant": variant,
        "seeds": list(seeds),
        "runs": [_run(variant, s) for s in seeds],
        "params": 12345,
        "train_seconds": 12.0,
        "epochs": 3.0,
        "throughput": None,
        "components": {},
        "delta": delta,
        "same_data": True,
        "left_out": [],
    }
    row.update({k: (m, std) for k, m in zip(KEYS, means, strict=True)})
    row.update(extra)
    return row


def _boot(delta: list[float], p: list[float], half: float = 0.01) -> BootstrapResult:
    d = np.asarray(delta, dtype=np.float64)
    return BootstrapResult(d, d - half, d + half, np.asarray(p, dtype=np.float64), 2000, 10, 0.95)


def _report(rows: list[dict[str, Any]], **kw: Any) -> Report:
    adjust_holm(rows)
    kw = {
        "plots": {"ccc": b"\x89PNG"},
        "plot_titles": {"ccc": "CCC"},
        "sources": ["runs"],
        "command": "fusionkit report runs",
        **kw,
    }
    return Report(split="test", baseline="base", rows=rows, targets=["valence", "arousal"], **kw)


def _simple_report(**kw: Any) -> Report:
    return _report(
        [
            _row("base", [0.5, 0.5, 0.5]),
            _row("x", [0.6, 0.5, 0.55], delta=_boot([0.1, 0.0, 0.05], [0.01] * 3)),
        ],
        **kw,
    )


# ------------------------------------------------------------------------- report folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_mark_lists_every_file_written_and_says_who_made_it(tmp_path):
    """report.json names fusionkit, the command, sources and split, and lists every other
    file of the folder; write_report returns the paths of all of them, the mark included."""
    rep = _simple_report(sources=["grid_a", "run_b"], command="fusionkit report grid_a run_b")
    out = tmp_path / "rep"
    written = write_report(rep, out)
    files = _tree(out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(files)
    mark = json.loads(files[REPORT_MARK])
    assert mark["files"] == sorted(set(files) - {REPORT_MARK})
    assert "plots/ccc.png" in mark["files"] and "report.html" in mark["files"]
    assert mark["created_by"] == "fusionkit" and mark["split"] == "test"
    assert mark["command"] == "fusionkit report grid_a run_b"
    assert mark["sources"] == ["grid_a", "run_b"]
    # and so the next report replaces it whole, leaving nothing of it beside
    assert check_report_dir(out) == "report"
    write_report(_simple_report(command="again"), out)
    assert json.loads((out / REPORT_MARK).read_text())["command"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


@pytest.mark.parametrize(
    "mark",
    ["{not json", json.dumps({"created_by": "fusionkit", "files": "report.md"})],
    ids=["broken-json", "files-not-a-list"],
)
def test_a_mark_that_cannot_be_read_is_not_taken_for_a_report(tmp_path, mark: str):
    """A report.json that is not valid JSON, or lists no files, does not make the folder a
    report of fusionkit's: it is refused as such, never replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / REPORT_MARK).write_text(mark)
    with pytest.raises(FusionkitError, match=rf"--out {out} was not made by fusionkit report"):
        check_report_dir(out)
    assert (out / REPORT_MARK).read_text() == mark


@pytest.mark.parametrize(
    ("plots", "kind"), [({}, "report"), ({"a.png": b"png"}, "report"), ({"notes.txt": b"x"}, None)]
)
def test_an_unmarked_report_is_recognised_with_an_empty_or_png_only_plots_folder(
    tmp_path, plots: dict[str, bytes], kind: str | None
):
    """A report written before reports were marked (report.md of fusionkit's, only report
    file names) is an earlier report, also when its plots folder is empty; a plots folder
    holding anything but PNGs makes it a folder of someone else's."""
    out = tmp_path / "old"
    (out / "plots").mkdir(parents=True)
    (out / "report.md").write_text("# Comparison report: a\n")
    (out / "summary.csv").write_text("variant\n")
    for name, data in plots.items():
        (out / "plots" / name).write_bytes(data)
    if kind is None:
        with pytest.raises(FusionkitError, match="was not made by fusionkit report"):
            check_report_dir(out)
    else:
        assert check_report_dir(out) == kind


def test_a_shell_inside_a_report_folder_keeps_it_from_being_replaced(tmp_path, monkeypatch):
    """The current folder inside the report (its plots) would be deleted with the report."""
    out = tmp_path / "rep"
    write_report(_simple_report(), out)
    monkeypatch.chdir(out / "plots")
    with pytest.raises(FusionkitError, match="is or holds the current folder"):
        check_report_dir(out)


def test_out_that_is_neither_file_nor_folder_is_refused_as_not_a_folder(tmp_path):
    """A named pipe (or the like) at --out is called what it is, not a file."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with pytest.raises(FusionkitError, match=rf"--out {pipe} is not a folder; the report is a"):
        check_report_dir(pipe)


def test_out_below_a_file_is_refused_before_anything_is_written(tmp_path):
    """--out under a file: the refusal says which path is a file, not a failed write."""
    afile = tmp_path / "afile"
    afile.write_text("keep\n")
    with pytest.raises(FusionkitError, match=rf"{afile} is a file, not a folder") as info:
        write_report(_simple_report(), afile / "sub")
    assert "could not write" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_file_added_to_out_while_the_report_renders_is_never_deleted(tmp_path, monkeypatch):
    """The folder is checked again just before the swap: a file that appeared in the earlier
    report's folder meanwhile makes the write fail, and it and the earlier report stay."""
    out = tmp_path / "rep"
    write_report(_simple_report(), out)
    before = _tree(out)
    render = reportdir.report_files

    def render_and_meddle(rep: Report, html_page: bool = True) -> dict[str, bytes]:
        (out / "notes.txt").write_text("mine\n")
        return render(rep, html_page)

    monkeypatch.setattr(reportdir, "report_files", render_and_meddle)
    with pytest.raises(FusionkitError, match="holds files its earlier report did not write"):
        write_report(_simple_report(), out)
    assert _tree(out) == {**before, "notes.txt": b"mine\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_into_an_empty_folder_the_mark_is_moved_in_last(tmp_path, monkeypatch):
    """The mark says the folder is a complete report, so it arrives after every other file."""
    out = tmp_path / "empty"
    out.mkdir()
    moved: list[str] = []
    rename = os.rename

    def record(src: Any, dst: Any) -> None:
        moved.append(Path(dst).name)
        rename(src, dst)

    monkeypatch.setattr(os, "rename", record)
    write_report(_simple_report(), out)
    assert moved[-1] == REPORT_MARK and len(moved) == len(list(out.iterdir()))


def test_a_failed_move_into_an_empty_folder_leaves_it_empty(tmp_path, monkeypatch):
    """When moving the files into an empty folder fails part way, the files already moved
    are taken out again: no half report, no temporary folder left."""
    out = tmp_path / "empty"
    out.mkdir()
    rename = os.rename
    calls: list[Any] = []

    def fail_third(src: Any, dst: Any) -> None:
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_third)
    with pytest.raises(FusionkitError, match="moving the new report in: No space left"):
        write_report(_simple_report(), out)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_failed_swap_puts_the_earlier_report_back(tmp_path, monkeypatch):
    """The earlier report is renamed aside before the new one is renamed in; when that second
    rename fails, the earlier report is renamed back, unchanged."""
    out = tmp_path / "rep"
    write_report(_simple_report(command="first"), out)
    before = _tree(out)
    rename = os.rename

    def refuse_new(src: Any, dst: Any) -> None:
        if Path(dst) == out.resolve() and ".old-" not in Path(src).name:
            raise OSError(5, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", refuse_new)
    with pytest.raises(FusionkitError, match=r"earlier report there \(if any\) is intact"):
        write_report(_simple_report(command="second"), out)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


# ------------------------------------------------------------------------------ rendering


def _cells(table: str) -> dict[str, list[str]]:
    """A Markdown table's body rows as cells (split at unescaped pipes), by the first cell."""
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        out[cells[0]] = cells
    return out


def _read_csv(text: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text.decode("utf-8"))))


def test_p_values_print_with_three_decimals_below_a_floor_and_dagger_below_alpha():
    """p prints with three decimals down to 0.001 itself and as <0.001 below it; the dagger
    marks a Holm p strictly below 0.05 (one tested row: Holm p = raw p)."""
    rep = _report(
        [
            _row("base", [0.5, 0.5, 0.5]),
            _row("x", [0.6, 0.5, 0.55], delta=_boot([0.1, 0.0, 0.05], [0.001, 0.0009, 0.05])),
        ]
    )
    x = _cells(delta_table(rep))["x"]
    assert x[1:] == [
        "+0.100 [+0.090, +0.110]",
        "0.001",
        "0.001 †",
        "+0.000 [−0.010, +0.010]",
        "<0.001",
        "<0.001 †",
        "+0.050 [+0.040, +0.060]",
        "0.050",
        "0.050",
    ]
    main = _cells(results_table(rep))["x"]
    assert main[2:8] == [
        "0.600 ± 0.010 †",
        "0.500 ± 0.010 †",
        "0.550 ± 0.010",
        "+0.050 [+0.040, +0.060]",
        "0.050",
        "0.050",
    ]


def _flat_valence_sums(scale: float) -> np.ndarray:
    """Three videos whose valence label and prediction are both constant 0 (CCC 0 / 0) and
    whose arousal prediction is the label scaled by ``scale``."""
    mask = np.ones(30, bool)
    label = np.zeros((30, 2))
    videos = []
    for v in range(3):
        label[:, 1] = np.random.default_rng(v).normal(size=30)
        pred = label * [0.0, scale] + [0.0, 0.2 * v]
        videos.append(video_sums(pred, label, mask))
    return np.stack(videos)


def test_a_target_with_an_undefined_ccc_reads_n_a_with_the_reason_and_is_not_tested():
    """When one target's CCC is 0 / 0 on the test videos, its Δ, interval and p cells (and
    those of the mean over targets) read n/a with the reason, never 'nan'; the other target
    keeps its test; Holm counts only the defined tests; summary.csv says which target had
    no test and over how many resamples the others were made."""
    res = paired_bootstrap([_flat_valence_sums(1.0)], [_flat_valence_sums(0.3)], n_boot=200)
    assert np.isnan(res.delta[0]) and np.isfinite(res.delta[1])
    rep = _report(
        [
            _row("base", [float("nan"), 0.5, float("nan")]),
            _row("x", [float("nan"), 0.6, float("nan")], delta=res),
        ]
    )
    x = _cells(delta_table(rep))["x"]
    why = "n/a: CCC undefined on these videos (0/0: constant prediction and label)"
    assert x[1:4] == [why, "n/a", "n/a"] and x[7:10] == [why, "n/a", "n/a"]
    assert x[4].startswith("+") and float(x[5].lstrip("<")) < 1
    assert x[6] == x[5] + (" †" if res.p_value[1] < 0.05 else "")  # one test: Holm p = p
    main = _cells(results_table(rep))["x"]
    assert main[2:8] == ["n/a", main[3], "n/a", why, "n/a", "n/a"]
    assert "nan" not in results_table(rep) + delta_table(rep) + latex_table(rep)
    rec = {r["variant"]: r for r in _read_csv(report_files(rep)["summary.csv"])}["x"]
    assert rec["paired_test"] == (
        "n/a for ccc_valence: CCC undefined on these videos (0/0: constant prediction and "
        "label); ccc_mean: CCC undefined on these videos (0/0: constant prediction and label)"
    )
    assert (rec["delta_ccc_valence_p"], rec["delta_ccc_mean_p_holm"]) == ("", "")
    assert rec["delta_ccc_arousal_resamples"] == "200"


def test_a_target_defined_on_the_videos_but_in_no_resample_says_so():
    """An interval that no resample could give (the observed Δ is defined) reads n/a with
    the number of resamples tried."""
    d = np.array([0.1, 0.0, 0.05])
    nan = np.full(3, np.nan)
    res = BootstrapResult(d, nan, nan, nan, 50, 3, 0.95, np.zeros(3, dtype=int))
    rep = _report([_row("base", [0.5, 0.5, 0.5]), _row("x", [0.6, 0.5, 0.55], delta=res)])
    x = _cells(delta_table(rep))["x"]
    assert x[1:4] == ["n/a: CCC undefined in every one of 50 resamples", "n/a", "n/a"]


def test_cells_keep_names_as_written_and_the_table_its_columns():
    """A variant name with a pipe, a tag and stars stays one cell and prints as written; the
    separator row has one cell per column; paths and reasons of left-out runs are code."""
    name = "a|b <i>*c*"
    rep = _report(
        [_row("base", [0.5, 0.5, 0.5]), _row(name, [0.6, 0.5, 0.55], delta="not comparable")],
        excluded=[Excluded("runs/p|q_seed-2", "base", "failed", "error: <bad> *x*")],
    )
    table = results_table(rep)
    lines = table.splitlines()
    assert lines[1] == "|" + "---|" * 11
    assert lines[3].startswith("| a\\|b \\<i>\\*c\\* | 2 |")
    assert _cells(table)["a\\|b \\<i>\\*c\\*"][5:8] == ["n/a: not comparable", "n/a", "n/a"]
    md = render_markdown(rep)
    assert "| `runs/p\\|q_seed-2` | base | failed | `error: <bad> *x*` |" in md


def test_a_code_span_is_fenced_by_more_backticks_than_it_holds():
    """A source path with a backtick stays one code span in the Markdown report."""
    md = render_markdown(_simple_report(sources=["runs/a`b", "`c"]))
    assert "runs from ``runs/a`b``, `` `c ``." in md


def test_one_seed_rows_show_the_mean_without_a_spread():
    """With one seed there is no std: the cell is the mean alone in Markdown and LaTeX, and
    the std column of summary.csv is empty (not 'nan')."""
    nan = float("nan")
    rep = _report(
        [
            _row("base", [0.5, 0.5, 0.5]),
            _row("one", [0.4, -0.05, 0.175], std=nan, seeds=(0,), delta="n/a"),
        ]
    )
    assert _cells(results_table(rep))["one"][1:5] == ["1", "0.400", "-0.050", "0.175"]
    tex = latex_table(rep)
    assert "\none & 0.400 & $-$0.050 & 0.175 & n/a & 12.3K \\\\\n" in tex
    one = _read_csv(report_files(rep)["summary.csv"])[1]
    assert (one["ccc_valence_mean"], one["ccc_valence_std"]) == ("0.4", "")


def test_seeds_read_n_of_m_when_grid_points_are_left_out():
    """`seeds` counts the row's seeds and, when points of the variant are left out, all of
    them: 2 used of 3."""
    gone = Excluded("grid/base_seed-2", "base", "failed", "boom")
    rep = _report(
        [_row("base", [0.5, 0.5, 0.5], left_out=[gone]), _row("x", [0.6, 0.5, 0.55], delta="n/a")]
    )
    body = _cells(results_table(rep))
    assert body["base"][1] == "2 of 3" and body["x"][1] == "2"
    assert [r["runs_left_out"] for r in _read_csv(report_files(rep)["summary.csv"])] == ["1", "0"]


def test_parameters_and_speed_print_with_thousands_separators():
    """params 12,345 and frames/s rounded with separators; no count prints as empty."""
    rows = [
        _row("base", [0.5, 0.5, 0.5], throughput={"frames_per_second": 1234.6}),
        _row("x", [0.6, 0.5, 0.55], params=None),
    ]
    body = _cells(results_table(_report(rows)))
    assert body["base"][8:] == ["12,345", "12", "1,235"] and body["x"][8:] == ["", "12", ""]
    plain = _cells(markdown_table(rows))
    assert plain["base"] == [
        "base",
        "0.500 ± 0.010",
        "0.500 ± 0.010",
        "0.500 ± 0.010",
        "2",
        "12,345",
        "12",
    ]
    assert markdown_table([]) == "(no runs)\n"


def test_the_markdown_report_has_its_sections_command_and_notes():
    """Left-out runs, the differences from the baseline, the command and the notes each
    reach the Markdown report; HTML shows the names and notes as text, not markup."""
    gone = Excluded("grid/x_seed-2", "x", "failed", "boom")
    rep = _report(
        [
            _row("base", [0.5, 0.5, 0.5]),
            _row("<b>x</b>", [0.6, 0.5, 0.55], delta=_boot([0.1, 0, 0.05], [0.2] * 3)),
        ],
        excluded=[gone],
        notes=["check <i>this</i>"],
        command="fusionkit report grid --baseline base",
    )
    md = render_markdown(rep)
    assert "\n## Runs left out\n" in md and "| `grid/x_seed-2` | x | failed | `boom` |" in md
    assert "\n## Differences from the baseline `base`\n" in md
    assert "Generated with `fusionkit report grid --baseline base`." in md
    assert md.endswith("\nNotes:\n\n- check <i>this</i>\n")
    page = render_html(rep)
    assert "<b>x</b>" not in page and "<i>this</i>" not in page
    assert "<h1>Comparison report: base, &lt;b&gt;x&lt;/b&gt;</h1>" in page
    assert "<td>&lt;b&gt;x&lt;/b&gt;</td>" in page
    assert "<li>check &lt;i&gt;this&lt;/i&gt;</li>" in page


def _latex_rows(tex: str) -> dict[str, list[str]]:
    body = {}
    for line in tex.splitlines():
        if line.endswith("\\\\") and not line.startswith("Variant"):
            cells = line.removesuffix(" \\\\").split(" & ")
            body[cells[0]] = cells
    return body


def test_latex_prints_names_literally_and_parameters_in_k_and_m():
    """Backslash, bar and tilde print as themselves; parameter counts as 999, 1000.0K,
    1.00M, and '--' for no count (also for a flag stored where a count belongs)."""
    rows = [
        _row("base", [0.5, 0.5, 0.5], params=999),
        _row("a\\b|c~d", [0.6, 0.5, 0.55], params=1_000_000, delta="n/a"),
        _row("k", [0.6, 0.5, 0.55], params=999_999, delta="n/a"),
        _row("none", [0.6, 0.5, 0.55], params=None, delta="n/a"),
        _row("flag", [0.6, 0.5, 0.55], params=True, delta="n/a"),
    ]
    tex = latex_table(_report(rows))
    body = _latex_rows(tex)
    assert list(body) == [
        "base",
        r"a\textbackslash{}b\textbar{}c\textasciitilde{}d",
        "k",
        "none",
        "flag",
    ]
    assert [cells[-1] for cells in body.values()] == ["999", "1.00M", "1000.0K", "--", "--"]
    # one column spec per cell: variant, three CCC columns, Δ and params
    assert "\\begin{tabular}{lccccr}" in tex and all(len(c) == 6 for c in body.values())


def test_latex_bold_is_the_best_shown_value_among_at_least_two_rows():
    """Bold marks the highest mean at the printed precision (ties all bold), ignores a NaN
    mean, and is not used when only one row is compared."""
    nan = float("nan")
    rows = [
        _row("base", [nan, 0.5, 0.5]),
        _row("x", [0.6004, 0.5, 0.4], delta="n/a"),
        _row("y", [0.6001, 0.3, 0.45], delta="n/a"),
    ]
    body = _latex_rows(latex_table(_report(rows)))
    assert body["x"][1].startswith("\\textbf{0.600}") and body["y"][1].startswith("\\textbf{0.600}")
    assert "textbf" not in body["base"][1]
    assert body["base"][2].startswith("\\textbf{0.500}") and body["base"][3].startswith("\\textbf")
    alone = _latex_rows(latex_table(_report([_row("base", [0.5, 0.5, 0.5])])))
    assert "textbf" not in " ".join(alone["base"])


def test_latex_caption_explains_the_marks_that_the_table_uses():
    """The ddagger line appears when a row was evaluated on other data, and the n/a line
    names the rows without a paired test and why."""
    rows = [
        _row("base", [0.5, 0.5, 0.5]),
        _row("o_1", [0.6, 0.5, 0.55], delta="evaluated on different data", same_data=False),
    ]
    tex = latex_table(_report(rows))
    assert "% $^\\ddagger$: evaluated on different data than the baseline" in tex
    assert "% n/a: no paired test (o\\_1): evaluated on different data\n" in tex
    plain = latex_table(_simple_report())
    assert "ddagger" not in plain and "n/a" not in plain


def _csv_report() -> Report:
    """Two tested rows and a baseline, with a sweep, learning curves and gate weights."""
    rows = [
        _row("base", [0.5, 0.5, 0.5]),
        _row(
            "x",
            [0.6, 0.5, 0.55],
            delta=_boot([0.1, 0.0, 0.05], [0.01, 0.02, 0.5]),
            within_seed_spread=True,
        ),
        _row(
            "y",
            [0.6, 0.5, 0.55],
            delta=_boot([0.1, 0.0, 0.05], [0.5, 0.01, 0.001]),
            within_seed_spread=False,
        ),
        _row("z", [0.6, 0.5, 0.55], delta="evaluated on different data", same_data=False),
    ]
    rows[1]["runs"][1].metrics = {
        **rows[1]["runs"][1].metrics,
        "splits": {"test": {"ccc_mean": 0.5, "ccc_extra": 0.25}},
    }
    sweep = Sweep(
        "shift",
        "shift",
        {"p": 1},
        "k",
        3,
        "test",
        [0, 8],
        curves=[
            Curve("x", [0, 8], {"ccc_mean": [0.6, 0.4]}, {"ccc_mean": [0.02, 0.03]}, (0.5, 0.04), 2)
        ],
    )
    curve = LearningCurve(
        "x",
        [1, 2],
        [2, 1],
        {"train_loss": {"mean": [1.0, 0.5], "min": [0.9, 0.5], "max": [1.1, 0.5]}},
    )
    gate = FlagGate("x", "audio", "occluded", ("0", "1"), (0.7, 0.3), (0.2, 0.8), 0.25, 2)
    return _report(
        rows,
        baseline_of={"x": "base", "y": "base2"},
        sweeps=[sweep],
        curves=[curve],
        flag_gates=[gate],
        gates=["gates_x"],
        plots={"ccc": b"png", "robustness_shift": b"png", "gates_x": b"png"},
        plot_titles={"ccc": "c", "robustness_shift": "r", "gates_x": "g"},
    )


def test_summary_csv_has_each_rows_test_outcome_and_sources_of_numbers():
    """summary.csv: seeds, the Holm-significance per metric (Holm over x and y by hand), the
    outcome of the paired test, the row's own baseline, the seed-spread caveat and the
    sweep's AUC mean and std."""
    files = report_files(_csv_report())
    rows = {r["variant"]: r for r in _read_csv(files["summary.csv"])}
    # Holm, m = 2: valence 0.01, 0.5 -> 0.02, 0.5; arousal 0.02, 0.01 -> 0.04, 0.02;
    # mean 0.5, 0.001 -> 0.5, 0.002
    sig = {v: [rows[v][f"delta_{k}_significant"] for k in KEYS] for v in ("x", "y")}
    assert sig == {"x": ["True", "True", "False"], "y": ["False", "True", "True"]}
    assert [float(rows["y"][f"delta_{k}_p_holm"]) for k in KEYS] == pytest.approx(
        [0.5, 0.02, 0.002]
    )
    assert {v: r["paired_test"] for v, r in rows.items()} == {
        "base": "baseline",
        "x": "ok",
        "y": "ok",
        "z": "n/a: evaluated on different data",
    }
    assert {v: r["baseline"] for v, r in rows.items()} == {
        "base": "base",
        "x": "base",
        "y": "base2",
        "z": "base",
    }
    spread = [rows[v]["delta_ccc_mean_within_seed_spread"] for v in ("base", "x", "y")]
    assert spread == ["", "True", "False"]
    assert rows["x"]["seeds"] == "0 1" and rows["z"]["same_data_as_baseline"] == "False"
    assert (rows["x"]["auc_shift_mean"], rows["x"]["auc_shift_std"]) == ("0.5", "0.04")
    assert rows["base"]["auc_shift_mean"] == ""


def test_the_other_csv_files_keep_each_value_in_its_column():
    """runs.csv has a column for a metric only some runs have, and each run's data
    fingerprint; curves.csv mean, min and max; robustness.csv mean and std; gate_flags.csv
    the weights on and off the flagged frames; the Markdown table the flagged share in %."""
    rep = _csv_report()
    files = report_files(rep)
    runs = _read_csv(files["runs.csv"])
    assert [r["ccc_extra"] for r in runs if r["variant"] == "x"] == ["", "0.25"]
    assert {r["data_fingerprint"] for r in runs} == {"fp-test"}
    curves = _read_csv(files["curves.csv"])
    assert [(c["train_loss_mean"], c["train_loss_min"], c["train_loss_max"]) for c in curves] == [
        ("1.0", "0.9", "1.1"),
        ("0.5", "0.5", "0.5"),
    ]
    robust = _read_csv(files["robustness.csv"])
    assert [(r["value"], r["ccc_mean_mean"], r["ccc_mean_std"]) for r in robust] == [
        ("0", "0.6", "0.02"),
        ("8", "0.4", "0.03"),
    ]
    assert json.loads(robust[0]["params"]) == {"p": 1} and robust[0]["seed"] == "3"
    gates = _read_csv(files["gate_flags.csv"])
    assert [(g["step"], g["weight_flagged"], g["weight_elsewhere"]) for g in gates] == [
        ("0", "0.7", "0.2"),
        ("1", "0.3", "0.8"),
    ]
    md = files["report.md"].decode()
    assert "| x | audio | occluded | 25 % | 2 | 0 0.70, 1 0.30 | 0 0.20, 1 0.80 |" in md
    assert "| x | 2 | 0.500 ± 0.040 | 0.600 | 0.400 |" in md  # the sweep: AUC, then per value


def test_only_sections_with_content_get_a_file_and_the_title_names_each_source_once():
    """Without curves, sweeps or gate flags there is no curves.csv, robustness.csv or
    gate_flags.csv (nor report.html when not asked for); two rows from one grid put the
    grid's name in the title once."""
    rep = _simple_report()
    for row in rep.rows:
        for run in row["runs"]:
            run.name = "grid"
    files = report_files(rep, html_page=False)
    assert sorted(files) == ["plots/ccc.png", "report.md", "runs.csv", "summary.csv", "table.tex"]
    assert files["report.md"].startswith(b"# Comparison report: grid\n")
    assert "<title>fusionkit report: grid</title>" in render_html(rep)


def test_html_shows_the_command_as_text():
    """The command line in the HTML page is escaped like every other text."""
    page = render_html(_simple_report(command="fusionkit report <runs> --out a&b"))
    assert "Generated with <code>fusionkit report &lt;runs&gt; --out a&amp;b</code>" in page


def test_a_row_evaluated_on_other_data_is_marked_and_never_bold():
    """A row evaluated on other data carries the ddagger and is never bold, even with the
    highest mean."""
    rows = [
        _row("base", [0.5, 0.5, 0.5]),
        _row("other", [0.9, 0.9, 0.9], delta="evaluated on different data", same_data=False),
    ]
    body = _latex_rows(latex_table(_report(rows)))
    assert "textbf" not in " ".join(body["other$^{\\ddagger}$"])
