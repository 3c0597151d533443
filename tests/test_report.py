"""Statistics against independent computations, and the report against the runs' files."""

from __future__ import annotations

import base64
import csv
import json
import shutil
import statistics
from importlib.metadata import version

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fusionkit.cli import app
from fusionkit.core.errors import FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.files import load_tensors
from fusionkit.engine.metrics import ccc
from fusionkit.engine.runs import RunDir
from fusionkit.studies import plots
from fusionkit.studies.grid import run_grid, train_and_evaluate
from fusionkit.studies.render import latex_table
from fusionkit.studies.report import Report, adjust_holm, build_report
from fusionkit.studies.reportdir import write_report
from fusionkit.studies.stats import (
    BootstrapResult,
    auc_normalised,
    bootstrap_deltas,
    ccc_from_sums,
    holm,
    paired_bootstrap,
    resample_counts,
    video_sums,
)
from tests.conftest import tiny_recipe

# ------------------------------------------------------------------------------- statistics


def plain_ccc(p: np.ndarray, t: np.ndarray) -> float:
    """Lin's CCC written out directly (population moments)."""
    mp, mt = p.mean(), t.mean()
    cov = ((p - mp) * (t - mt)).mean()
    return 2 * cov / (p.var() + t.var() + (mp - mt) ** 2)


def fake_runs(n_runs: int, n_videos: int, quality: float, seed: int):
    """Per run: list of (pred, target, mask) per video; targets shared across runs."""
    rng = np.random.default_rng(seed)
    trng = np.random.default_rng(123)
    targets = [
        np.cumsum(trng.normal(0, 0.1, (trng.integers(30, 90), 2)), 0) for _ in range(n_videos)
    ]
    runs = []
    for _ in range(n_runs):
        vids = []
        for t in targets:
            p = quality * t + rng.normal(0, 0.3, t.shape)
            mask = rng.random(t.shape[0]) > 0.1
            vids.append((p, t, mask))
        runs.append(vids)
    return runs


def test_pooled_ccc_from_sums_equals_ccc_over_concatenated_frames():
    (run,) = fake_runs(1, 6, 0.8, 0)
    sums = np.stack([video_sums(*v) for v in run]).sum(0)
    p = np.concatenate([v[0][v[2]] for v in run])
    t = np.concatenate([v[1][v[2]] for v in run])
    for k in range(2):
        ref = float(ccc(torch.from_numpy(p[:, k]), torch.from_numpy(t[:, k])))
        assert ccc_from_sums(sums[k]) == pytest.approx(ref, abs=1e-12)
        assert ccc_from_sums(sums[k]) == pytest.approx(plain_ccc(p[:, k], t[:, k]), abs=1e-12)


def test_bootstrap_deltas_match_a_brute_force_loop():
    a_runs, b_runs = fake_runs(2, 7, 0.9, 1), fake_runs(3, 7, 0.6, 2)
    a = [np.stack([video_sums(*v) for v in r]) for r in a_runs]
    b = [np.stack([video_sums(*v) for v in r]) for r in b_runs]
    counts = resample_counts(7, 60, seed=5)
    fast = bootstrap_deltas(a, b, counts)

    def stat(runs, idx):  # concatenate the drawn videos' frames, CCC per target, mean
        per_run = []
        for r in runs:
            p = np.concatenate([r[i][0][r[i][2]] for i in idx])
            t = np.concatenate([r[i][1][r[i][2]] for i in idx])
            c = [plain_ccc(p[:, k], t[:, k]) for k in range(2)]
            per_run.append([*c, np.mean(c)])
        return np.mean(per_run, axis=0)

    slow = []
    for row in counts:
        idx = np.repeat(np.arange(7), row.astype(int))
        slow.append(stat(a_runs, idx) - stat(b_runs, idx))
    slow = np.array(slow)
    np.testing.assert_allclose(fast, slow, atol=1e-10)

    res = paired_bootstrap(a, b, counts=counts)
    np.testing.assert_allclose(res.delta, stat(a_runs, range(7)) - stat(b_runs, range(7)), 1e-10)
    np.testing.assert_allclose(res.ci_low, np.quantile(slow, 0.025, axis=0), atol=1e-10)
    np.testing.assert_allclose(res.ci_high, np.quantile(slow, 0.975, axis=0), atol=1e-10)
    le = ((slow <= 0).sum(0) + 1) / 61
    ge = ((slow >= 0).sum(0) + 1) / 61
    np.testing.assert_allclose(res.p_value, np.minimum(1, 2 * np.minimum(le, ge)))


def test_bootstrap_closed_form_cases():
    runs = [np.stack([video_sums(*v) for v in r]) for r in fake_runs(2, 8, 0.7, 3)]
    same = paired_bootstrap(runs, runs, n_boot=300)
    assert np.all(same.delta == 0) and np.all(same.p_value == 1.0)
    # a perfect model beats a noisy one on every resample: p is the bootstrap floor 2/(B+1)
    perfect = [np.stack([video_sums(t, t, m) for _, t, m in r]) for r in fake_runs(1, 8, 0.7, 3)]
    res = paired_bootstrap(perfect, runs, n_boot=300)
    assert np.all(res.delta > 0) and np.all(res.ci_low > 0)
    np.testing.assert_allclose(res.p_value, 2 / 301)


def test_auc_is_the_trapezoid_over_the_normalised_axis():
    x = [30, -30, 0, 5, -5, 15, -15]
    y = [0.3, 0.2, 0.7, 0.65, 0.6, 0.5, 0.4]
    order = np.argsort(x)
    xs, ys = np.array(x, float)[order], np.array(y)[order]
    u = (xs - xs[0]) / (xs[-1] - xs[0])
    ref = sum((u[i + 1] - u[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(u) - 1))
    assert auc_normalised(x, y) == pytest.approx(ref)
    assert auc_normalised([0, 10], [0.5, 0.5]) == pytest.approx(0.5)
    assert auc_normalised([3], [0.42]) == 0.42


# ---------------------------------------------------------------------------------- report


@pytest.fixture(scope="module")
def grid(tmp_path_factory, registry):
    tmp = tmp_path_factory.mktemp("report")
    raw = tiny_recipe(tmp, epochs=2)
    raw["model"]["fusion"] = {"name": "rjca", "params": {"recursions": 2}}
    raw["model"]["gate"] = {"name": "grjca"}
    raw["variants"] = {
        "concat": {"model.fusion": {"name": "concat"}, "model.gate.name": "last"},
        "grjca": {"model.gate.name": "grjca"},
        "rjca": {"model.gate.name": "last"},
    }
    raw["sweep"] = {"training.seed": [0, 1]}
    raw["evaluation"]["robustness"] = [
        {"name": "shift", "perturbation": "shift", "axis": "k", "values": [-8, 0, 8]}
    ]
    rc = validate_recipe(raw, "grid", registry)
    run_grid(rc, registry=registry)
    grid_dir = tmp / "tiny"
    rep = build_report([grid_dir], n_boot=300, registry=registry)
    out = tmp / "out"
    write_report(rep, out)
    return grid_dir, rep, out


def metrics(grid_dir, tag):
    return json.loads((grid_dir / tag / "metrics.json").read_text())


def read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_summary_numbers_equal_the_metrics_files(grid):
    grid_dir, _, out = grid
    rows = {r["variant"]: r for r in read_csv(out / "summary.csv")}
    assert list(rows) == ["concat", "grjca", "rjca"]  # grid order, not alphabetical
    for variant in rows:
        for key in ("ccc_valence", "ccc_arousal", "ccc_mean"):
            vals = [metrics(grid_dir, f"{variant}_seed-{s}")["splits"]["test"][key] for s in (0, 1)]
            assert float(rows[variant][f"{key}_mean"]) == pytest.approx(statistics.fmean(vals))
            assert float(rows[variant][f"{key}_std"]) == pytest.approx(statistics.stdev(vals))
        m = metrics(grid_dir, f"{variant}_seed-0")
        assert int(rows[variant]["params"]) == m["parameters"]
        secs = [metrics(grid_dir, f"{variant}_seed-{s}")["train_seconds"] for s in (0, 1)]
        assert float(rows[variant]["train_seconds_mean"]) == pytest.approx(statistics.fmean(secs))
        assert float(rows[variant]["frames_per_second"]) > 0
    runs = read_csv(out / "runs.csv")
    assert len(runs) == 6
    for r in runs:
        tag = f"{r['variant']}_seed-{r['seed']}"
        assert float(r["ccc_mean"]) == metrics(grid_dir, tag)["splits"]["test"]["ccc_mean"]


def test_delta_point_estimate_is_the_difference_of_the_table_means(grid):
    _, _, out = grid
    rows = {r["variant"]: r for r in read_csv(out / "summary.csv")}
    assert rows["concat"]["delta_ccc_mean"] == ""  # the baseline
    for key in ("ccc_valence", "ccc_arousal", "ccc_mean"):
        expected = float(rows["grjca"][f"{key}_mean"]) - float(rows["concat"][f"{key}_mean"])
        assert float(rows["grjca"][f"delta_{key}"]) == pytest.approx(expected, abs=1e-6)
        lo, hi = (
            float(rows["grjca"][f"delta_{key}_ci_low"]),
            float(rows["grjca"][f"delta_{key}_ci_high"]),
        )
        assert lo <= float(rows["grjca"][f"delta_{key}"]) <= hi
        assert 0 < float(rows["grjca"][f"delta_{key}_p"]) <= 1


def test_robustness_curves_and_auc_match_the_run_files(grid):
    grid_dir, _, out = grid
    table = read_csv(out / "robustness.csv")
    assert {r["value"] for r in table} == {"-8", "0", "8"}
    summary = {r["variant"]: r for r in read_csv(out / "summary.csv")}
    for variant in ("concat", "grjca"):
        files = [
            json.loads((grid_dir / f"{variant}_seed-{s}" / "robustness" / "shift.json").read_text())
            for s in (0, 1)
        ]
        for r in (r for r in table if r["variant"] == variant):
            vals = [f["results"]["test"][r["value"]]["metrics"]["ccc_mean"] for f in files]
            assert float(r["ccc_mean_mean"]) == pytest.approx(statistics.fmean(vals))
        aucs = []
        for f in files:
            y = [f["results"]["test"][k]["metrics"]["ccc_mean"] for k in ("-8", "0", "8")]
            aucs.append((y[0] + y[1]) / 4 + (y[1] + y[2]) / 4)  # u = 0, 0.5, 1
        assert float(summary[variant]["auc_shift_mean"]) == pytest.approx(statistics.fmean(aucs))


def test_markdown_html_and_plots(grid):
    grid_dir, _, out = grid
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    vals = [metrics(grid_dir, f"grjca_seed-{s}")["splits"]["test"]["ccc_mean"] for s in (0, 1)]
    cell = f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"
    assert cell in md and cell in html
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    # concat and rjca (gate "last") have no gate plot
    assert pngs == ["ccc.png", "curves.png", "delta.png", "gates_grjca.png", "robustness_shift.png"]
    for name in pngs:
        assert f"](plots/{name})" in md
    embedded = [
        base64.b64decode(chunk.split('"', 1)[0])
        for chunk in html.split('src="data:image/png;base64,')[1:]
    ]
    assert len(embedded) == len(pngs)
    assert {bytes(e) for e in embedded} == {(out / "plots" / n).read_bytes() for n in pngs}
    assert all(e.startswith(b"\x89PNG\r\n\x1a\n") for e in embedded)
    assert "<script" not in html and "http" not in html.split("<body>")[1]


def test_unknown_baseline_lists_the_variants(grid, registry):
    grid_dir, _, _ = grid
    with pytest.raises(FusionkitError, match=r"--baseline 'tagf'.*variants: concat, grjca, rjca"):
        build_report([grid_dir], baseline="tagf", throughput=False, registry=registry)
    rep = build_report([grid_dir], baseline="grjca", throughput=False, n_boot=200)
    assert rep.rows[1]["delta"] is None and rep.rows[0]["delta"].delta[-1] == pytest.approx(
        -build_report([grid_dir], throughput=False, n_boot=200).rows[1]["delta"].delta[-1]
    )


def test_holm_matches_hand_computed_examples():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.3, 0.4]), [0.6, 0.6])  # 0.3*2 = 0.6 > 0.4*1
    np.testing.assert_allclose(holm([0.6, 0.9, 0.7]), [1.0, 1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.02, 0.02]), [0.04, 0.04])  # ties
    out = holm([np.nan, 0.02, 0.5])  # NaN is no test: m = 2
    assert np.isnan(out[0])
    np.testing.assert_allclose(out[1:], [0.04, 0.5])
    assert holm([0.012]).tolist() == [0.012]  # one test: unchanged


def holm_reference(ps: list[float]) -> list[float]:
    """Holm written as its definition: the adjusted p of hypothesis i is the largest
    min(1, (m - r + 1) p_(r)) over the ranks r up to its own."""
    m = len(ps)
    ranked = sorted(ps)
    return [max(min(1.0, (m - r) * ranked[r]) for r in range(m) if ranked[r] <= p) for p in ps]


def test_holm_adjusts_over_the_variants_compared_with_the_baseline(grid):
    _, _, out = grid
    rows = {r["variant"]: r for r in read_csv(out / "summary.csv")}
    for key in ("ccc_valence", "ccc_arousal", "ccc_mean"):
        raw = [float(rows[v][f"delta_{key}_p"]) for v in ("grjca", "rjca")]
        expected = holm_reference(raw)
        got = [float(rows[v][f"delta_{key}_p_holm"]) for v in ("grjca", "rjca")]
        assert got == pytest.approx(expected)
        for v, adj in zip(("grjca", "rjca"), expected, strict=True):
            assert rows[v][f"delta_{key}_significant"] == str(adj < 0.05)


def test_learning_curves_are_mean_and_range_over_seeds_of_the_histories(grid):
    grid_dir, _, out = grid
    table = read_csv(out / "curves.csv")
    assert {r["variant"] for r in table} == {"concat", "grjca", "rjca"}
    for r in table:
        hist = [
            metrics(grid_dir, f"{r['variant']}_seed-{s}")["history"][int(r["epoch"]) - 1]
            for s in (0, 1)
        ]
        assert all(h["epoch"] == int(r["epoch"]) for h in hist)
        assert int(r["runs"]) == 2
        for key in ("val_ccc_mean", "train_loss", "val_ccc_valence"):
            vals = [h[key] for h in hist]
            assert float(r[f"{key}_mean"]) == pytest.approx(statistics.fmean(vals))
            assert float(r[f"{key}_min"]) == pytest.approx(min(vals))
            assert float(r[f"{key}_max"]) == pytest.approx(max(vals))
    assert sorted(int(r["epoch"]) for r in table if r["variant"] == "concat") == [1, 2]
    md = (out / "report.md").read_text()
    assert "## Learning curves" in md and "](plots/curves.png)" in md


def test_components_name_the_distribution_and_version_from_run_json(grid):
    grid_dir, _, out = grid
    rows = {r["variant"]: r for r in read_csv(out / "summary.csv")}
    marker = json.loads((grid_dir / "grjca_seed-0" / "run.json").read_text())
    gate = next(c for c in marker["components"] if c["kind"] == "gate")
    assert gate["name"] == "grjca" and gate["version"] == version(gate["distribution"])
    cell = f"grjca ({gate['distribution']} {gate['version']})"
    assert f"gate: {cell}" in rows["grjca"]["components"]
    assert "gate: last (" in rows["concat"]["components"]
    md = (out / "report.md").read_text()
    assert "## Components" in md and cell in md


def test_latex_table_of_the_grid_uses_booktabs_and_bolds_the_best_mean(grid):
    _, _, out = grid
    tex = (out / "table.tex").read_text()
    lines = tex.splitlines()
    rules = [lines.index(r) for r in ("\\toprule", "\\midrule", "\\bottomrule")]
    assert rules == sorted(rules)
    summary = {r["variant"]: r for r in read_csv(out / "summary.csv")}
    body = {ln.split(" & ")[0]: ln.split(" & ") for ln in lines[rules[1] + 1 : rules[2]]}
    assert list(body) == ["concat", "grjca", "rjca"]
    for col, key in enumerate(("ccc_valence", "ccc_arousal", "ccc_mean"), start=1):
        means = {v: round(float(r[f"{key}_mean"]), 3) for v, r in summary.items()}
        for v, cells in body.items():
            assert cells[col].startswith("\\textbf{") == (means[v] == max(means.values()))


def fake_row(variant, means, p=None, same_data=True, delta=None):
    """A report row as build_report makes it, with chosen means and raw p-values."""
    row = {
        "variant": variant,
        "seeds": [0, 1],
        "runs": [],
        "params": 12345,
        "same_data": same_data,
        "delta": delta,
    }
    for key, m in zip(("ccc_valence", "ccc_arousal", "ccc_mean"), means, strict=True):
        row[key] = (m, 0.01)
    if p is not None:
        d = np.array(means) - 0.5
        row["delta"] = BootstrapResult(d, d - 0.1, d + 0.1, np.array(p), 1000, 10, 0.95)
    return row


def test_latex_marks_best_values_and_holm_significance():
    rows = [
        fake_row("base", [0.5, 0.5, 0.5]),
        # raw p (valence, arousal, mean); Holm over the two tested variants per column:
        # valence 0.03, 0.04 -> 0.06, 0.06 (no mark although both raw p < 0.05)
        # arousal 0.01, 0.04 -> 0.02, 0.04 (both marked); mean 0.2, 0.001 -> 0.2, 0.002
        fake_row("tagf_temporal", [0.612, 0.55, 0.5814], p=[0.03, 0.01, 0.2]),
        fake_row("b&c", [0.6, 0.58, 0.5906], p=[0.04, 0.04, 0.001]),
        # evaluated on other data: no test, not in the Holm family, never bold
        fake_row("other", [0.9, 0.9, 0.9], same_data=False, delta="evaluated on different data"),
    ]
    adjust_holm(rows)
    np.testing.assert_allclose(rows[1]["p_holm"], [0.06, 0.02, 0.2])
    np.testing.assert_allclose(rows[2]["p_holm"], [0.06, 0.04, 0.002])
    assert rows[0]["p_holm"] is None and rows[3]["p_holm"] is None
    tex = latex_table(
        Report(split="test", baseline="base", rows=rows, targets=["valence", "arousal"])
    )
    assert "\\usepackage{booktabs}" in tex
    body = {}
    for line in tex.splitlines():
        if line.endswith("\\\\") and not line.startswith("Variant"):
            cells = line.removesuffix(" \\\\").split(" & ")
            body[cells[0]] = cells
    assert list(body) == ["base", "tagf\\_temporal", "b\\&c", "other$^{\\ddagger}$"]
    body["other"] = body.pop("other$^{\\ddagger}$")  # marked: not on the baseline's data
    dag = "$^{\\dagger}$"
    assert body["tagf\\_temporal"][1] == "\\textbf{0.612} $\\pm$ 0.010"  # best valence, no mark
    assert body["tagf\\_temporal"][2] == f"0.550 $\\pm$ 0.010{dag}"
    assert body["tagf\\_temporal"][3] == "0.581 $\\pm$ 0.010"
    assert body["b\\&c"][1] == "0.600 $\\pm$ 0.010"
    assert body["b\\&c"][2] == f"\\textbf{{0.580}} $\\pm$ 0.010{dag}"
    assert body["b\\&c"][3] == f"\\textbf{{0.591}} $\\pm$ 0.010{dag}"
    assert body["b\\&c"][4] == f"$+0.091${dag}"  # Δ of the mean, Holm p 0.002
    assert body["tagf\\_temporal"][4] == "$+0.081$"
    assert body["base"][4] == "--" and body["other"][4] == "n/a"
    assert "textbf" not in " ".join(body["other"]) and dag not in " ".join(body["other"])
    assert body["base"][5] == "12.3K"


def test_ccc_bars_do_not_start_at_zero_and_frame_every_error_bar():
    mean = np.array([[0.61, 0.55, 0.58], [0.63, 0.57, 0.60]])
    std = np.array([[0.01, 0.02, 0.01], [0.015, 0.01, 0.01]])
    fig = plots.ccc_bars_figure(["a", "b"], ["valence", "arousal", "mean"], mean, std, "t")
    low, high = fig.axes[0].get_ylim()
    assert 0.4 < low < (mean - std).min() and high > (mean + std).max()
    assert high - low < 0.3  # a 0.02 difference takes a visible share of the axis
    assert "not start at 0" in fig.axes[0].get_ylabel()
    # user names are shown literally: an unescaped "$\\foo$" is a mathtext error
    fig = plots.ccc_bars_figure(["a$\\foo$", "b"], ["v"], mean[:, :1], std[:, :1], "$\\x$")
    assert fig.axes[0].get_xticklabels()[0].get_text() == "a\\$\\foo\\$"
    assert plots.png(
        plots.ccc_bars_figure(["a$\\foo$"], ["v"], mean[:1, :1], std[:1, :1], "t")
    ).startswith(b"\x89PNG")


# -------------------------------------------------------------------------- comparability


def train_single(tmp_path, registry, name, data_seed):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["name"] = name
    raw["data"]["params"]["seed"] = data_seed
    rc = validate_recipe(raw, name, registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    return run.path


def test_no_paired_test_for_runs_evaluated_on_different_data(tmp_path, registry):
    a = train_single(tmp_path, registry, "a", data_seed=0)
    b = train_single(tmp_path, registry, "b", data_seed=1)
    fp = [json.loads((d / "metrics.json").read_text())["data_fingerprints"]["test"] for d in (a, b)]
    assert fp[0] != fp[1]
    # the same video names in the same order: only the fingerprint tells the data apart
    names = [json.loads(load_tensors(d / "predictions" / "test.safetensors")[1]["videos"])
             for d in (a, b)]  # fmt: skip
    assert names[0] == names[1]

    res = CliRunner().invoke(app, ["report", str(a), str(b), "--no-throughput", "--bootstrap=200"])
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.output.splitlines() if ln.startswith("| b |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:8] == ["n/a: evaluated on different data", "n/a", "n/a"]  # Δ, p, p Holm
    assert "b: no paired test against a (evaluated on different data" in res.output

    out = tmp_path / "report"
    res = CliRunner().invoke(
        app, ["report", str(a), str(b), "--no-throughput", "--bootstrap=200", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    (rec,) = [r for r in read_csv(out / "summary.csv") if r["variant"] == "b"]
    assert rec["paired_test"] == "n/a: evaluated on different data"
    assert all(rec[f"delta_{k}_p"] == "" for k in ("ccc_valence", "ccc_arousal", "ccc_mean"))
    assert rec["same_data_as_baseline"] == "False"
    assert "delta.png" not in {p.name for p in (out / "plots").iterdir()}
    tex = (out / "table.tex").read_text()
    table = tex.split("\\bottomrule")[0]
    assert "\\dagger}$" not in table and "b$^{\\ddagger}$ & " in table and "n/a" in table
    assert "\\textbf" not in table  # no "best" among rows that are not comparable
    html = (out / "report.html").read_text()
    assert "n/a: evaluated on different data" in html


# -------------------------------------------------------------------- left-out grid points


def test_failed_pending_and_incomplete_runs_are_listed_and_never_used(grid, tmp_path):
    src, _, _ = grid
    gdir = tmp_path / "tiny"
    shutil.copytree(src, gdir)
    record = json.loads((gdir / "grid.json").read_text())
    error = "Traceback (most recent call last):\n  ...\nRuntimeError: [bold red]boom[/] <script>"
    record["runs"]["grjca_seed-1"].update(status="failed", error=error)
    record["runs"]["rjca_seed-1"]["status"] = "pending"
    record["runs"]["concat_seed-2"] = {
        "values": {"variant": "concat", "training.seed": 2},
        "status": "done",
    }
    record["order"].append("concat_seed-2")
    (gdir / "grid.json").write_text(json.dumps(record))
    for tag in ("grjca_seed-1", "concat_seed-1"):  # interrupted: metrics.json is still there
        marker = json.loads((gdir / tag / "run.json").read_text())
        marker["status"] = "running"
        (gdir / tag / "run.json").write_text(json.dumps(marker))
        assert (gdir / tag / "metrics.json").is_file()
    shutil.rmtree(gdir / "rjca_seed-1")
    m = json.loads((gdir / "rjca_seed-0" / "metrics.json").read_text())
    m["splits"]["test"]["ccc_mean"] = 0.99  # edited after completion: SHA-256 differs
    (gdir / "rjca_seed-0" / "metrics.json").write_text(json.dumps(m))

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["report", str(gdir), "--no-throughput", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "RuntimeError: [bold red]boom[/] <script>" in res.output  # printed, not rendered

    rep = build_report([gdir], throughput=False, n_boot=200)
    got = {e.where.rsplit("/", 1)[-1]: (e.variant, e.status) for e in rep.excluded}
    assert got == {
        "concat_seed-1": ("concat", "incomplete"),
        "grjca_seed-1": ("grjca", "failed"),
        "rjca_seed-0": ("rjca", "unreadable"),
        "rjca_seed-1": ("rjca", "pending"),
        "concat_seed-2": ("concat", "missing"),
    }
    failed = next(e for e in rep.excluded if e.status == "failed")
    assert failed.detail == "RuntimeError: [bold red]boom[/] <script>"  # the error's last line

    summary = {r["variant"]: r for r in read_csv(out / "summary.csv")}
    assert list(summary) == ["concat", "grjca"]  # rjca has no usable run left
    for variant in ("concat", "grjca"):
        only = metrics(src, f"{variant}_seed-0")["splits"]["test"]
        assert summary[variant]["n_seeds"] == "1"
        assert float(summary[variant]["ccc_mean_mean"]) == only["ccc_mean"]
        assert summary[variant]["ccc_mean_std"] == ""
    assert int(summary["concat"]["runs_left_out"]) == 2
    assert {r["run_dir"].rsplit("/", 1)[-1] for r in read_csv(out / "runs.csv")} == {
        "concat_seed-0",
        "grjca_seed-0",
    }
    md = (out / "report.md").read_text()
    section = md.split("## Runs left out")[1].split("\n## ")[0]
    for tag in got:
        assert tag in section
    assert "`RuntimeError: [bold red]boom[/] <script>`" in section
    assert "| concat | 1 of 3 |" in md
    html = (out / "report.html").read_text()
    assert "<script" not in html and "&lt;script&gt;" in html
    with pytest.raises(FusionkitError, match="--baseline 'rjca' has no complete run"):
        build_report([gdir], baseline="rjca", throughput=False)


def _row(variant: str, seeds: int, mean: float, std: float, delta=None, p_holm=None,
         key: str = "ccc_mean") -> dict:  # fmt: skip
    return {"variant": variant, "seeds": list(range(seeds)), key: (mean, std),
            "delta": delta, "p_holm": p_holm}  # fmt: skip


def _boot(delta_last: float, n: int = 3):
    from fusionkit.studies.stats import BootstrapResult

    d = np.zeros(n)
    d[-1] = delta_last  # the last metric: the mean of the targets, or the only target
    return BootstrapResult(d, d - 0.01, d + 0.01, np.full(n, 0.001), 2000, 24, 0.95)


def test_a_significant_delta_smaller_than_the_seed_spread_gets_a_caveat():
    """The paired test resamples test videos only: a significant Δ CCC mean below the seeds'
    std (of either row) is flagged; a larger one, a non-significant one, or one from single
    seeds is not."""
    from types import SimpleNamespace

    from fusionkit.studies.report import _add_seed_caveats

    base = _row("base", 3, 0.680, 0.022)
    sig = np.array([0.01, 0.01, 0.01])
    rows = [
        base,
        _row("small", 3, 0.696, 0.007, _boot(0.016), sig),  # 0.016 < 0.022 (the base's std)
        _row("large", 3, 0.730, 0.010, _boot(0.050), sig),  # 0.050 > 0.022
        _row("not significant", 3, 0.690, 0.030, _boot(0.010), np.array([0.5, 0.5, 0.5])),
        _row("one seed", 1, 0.690, 0.0, _boot(0.010), sig),
    ]
    rep = SimpleNamespace(
        rows=rows,
        baseline_of={r["variant"]: "base" for r in rows},
        notes=[],
        targets=["valence", "arousal"],
    )
    _add_seed_caveats(rep)
    assert len(rep.notes) == 1
    assert rep.notes[0].startswith("small: Δ CCC mean +0.016 against base is significant")
    assert "std up to 0.022" in rep.notes[0]
    spread = {r["variant"]: r["within_seed_spread"] for r in rows}  # summary.csv's column
    assert spread == {"base": None, "small": True, "large": False, "not significant": True,
                      "one seed": None}  # fmt: skip
    # one target: its CCC is the metric
    one = np.array([0.01])
    rows = [
        _row("base", 2, 0.5, 0.03, key="ccc_valence"),
        _row("x", 2, 0.52, 0.01, _boot(0.02, 1), one, key="ccc_valence"),
    ]
    rep = SimpleNamespace(rows=rows, baseline_of={"base": "base", "x": "base"}, notes=[],
                          targets=["valence"])  # fmt: skip
    _add_seed_caveats(rep)
    assert rep.notes and rep.notes[0].startswith("x: Δ CCC valence +0.020 against base")


def test_significance_is_holm_p_strictly_below_alpha():
    """The dagger means Holm p < 0.05, as the report's legend says; p = 0.05 is not marked."""
    from fusionkit.studies.report import ALPHA, significant

    assert ALPHA == 0.05
    row = {"p_holm": np.array([0.05, np.nextafter(0.05, 0.0), 0.2])}
    assert [significant(row, j) for j in range(3)] == [False, True, False]
    assert not significant({"p_holm": None}, 0)  # the baseline row itself
