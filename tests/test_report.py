"""Statistics against independent computations, and the report against the runs' files."""

from __future__ import annotations

import base64
import csv
import json
import statistics

import numpy as np
import pytest
import torch

from fusionkit.core.errors import FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.metrics import ccc
from fusionkit.studies.grid import run_grid
from fusionkit.studies.report import build_report, write_report
from fusionkit.studies.stats import (
    auc_normalised,
    bootstrap_deltas,
    ccc_from_sums,
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
    assert list(rows) == ["concat", "grjca"]  # grid order, not alphabetical by run name
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
    assert len(runs) == 4
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
    assert pngs == ["ccc.png", "gates_grjca.png", "robustness_shift.png"]  # concat has no gate
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
    with pytest.raises(FusionkitError, match=r"--baseline 'tagf'.*variants: concat, grjca"):
        build_report([grid_dir], baseline="tagf", throughput=False, registry=registry)
    rep = build_report([grid_dir], baseline="grjca", throughput=False, n_boot=200)
    assert rep.rows[1]["delta"] is None and rep.rows[0]["delta"].delta[-1] == pytest.approx(
        -build_report([grid_dir], throughput=False, n_boot=200).rows[1]["delta"].delta[-1]
    )
