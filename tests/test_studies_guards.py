"""The comparison report's numbers against independent computations: the bootstrap the
command line asks for, the cells of the tables, the robustness curves of the reported split,
and the setups that must never share a row or a comparison. Each guard fails when the report
would show a wrong number with exit code 0."""

from __future__ import annotations

import csv
import json
import shutil
import statistics

import numpy as np
import pytest
from typer.testing import CliRunner

from fusionkit.cli import app
from fusionkit.core.errors import FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.files import file_sha256, load_tensors, save_tensors
from fusionkit.engine.runs import RunDir
from fusionkit.studies.grid import run_grid, train_and_evaluate
from fusionkit.studies.render import delta_table, results_table
from fusionkit.studies.report import Report, build_report
from fusionkit.studies.robustness import measure_throughput
from fusionkit.studies.stats import (
    BootstrapResult,
    bootstrap_deltas,
    paired_bootstrap,
    resample_counts,
    video_sums,
)
from tests.conftest import flagged_gate_recipe, tiny_recipe, user_cli
from tests.test_report import fake_row

VARIANTS = ("concat", "rjca")
KEYS = ("ccc_valence", "ccc_arousal", "ccc_mean")


@pytest.fixture(scope="module")
def grid(tmp_path_factory, registry):
    """Two variants x two seeds, one epoch, with a robustness sweep on val and test."""
    tmp = tmp_path_factory.mktemp("guards")
    raw = tiny_recipe(tmp, epochs=1)
    raw["name"] = "g"
    raw["variants"] = {
        "concat": {"model.fusion": {"name": "concat"}},
        "rjca": {"model.fusion": {"name": "rjca", "params": {"recursions": 1}}},
    }
    raw["sweep"] = {"training.seed": [0, 1]}
    raw["evaluation"]["robustness"] = [
        {
            "name": "shift",
            "perturbation": "shift",
            "axis": "k",
            "values": [8, -8],
            "splits": ["val", "test"],
        }
    ]
    run_grid(validate_recipe(raw, "g.yaml", registry), registry=registry)
    return tmp / "g"


def _copy(grid, dst):
    shutil.copytree(grid, dst)
    return dst


def _read_csv(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _edit_json(run_dir, name, fn):
    """Edit a run's JSON file and record its new SHA-256 in run.json when it lists the file
    (as if the run had been made that way)."""
    path = run_dir / name
    rec = json.loads(path.read_text())
    fn(rec)
    path.write_text(json.dumps(rec))
    marker = json.loads((run_dir / "run.json").read_text())
    if name in marker["files"]:
        marker["files"][name] = file_sha256(path)
        (run_dir / "run.json").write_text(json.dumps(marker))


def _rewrite_predictions(run_dir, fingerprint, negate_targets=False):
    """Give a run's test predictions file another data fingerprint (and, optionally, other
    targets), recording its new SHA-256 in run.json as if the run had been made that way."""
    path = run_dir / "predictions" / "test.safetensors"
    tensors, meta = load_tensors(path)
    if negate_targets:
        tensors = {k: -v if k.startswith("target/") else v for k, v in tensors.items()}
    save_tensors(path, tensors, {**meta, "data_fingerprint": fingerprint})
    marker = json.loads((run_dir / "run.json").read_text())
    marker["files"]["predictions/test.safetensors"] = file_sha256(path)
    (run_dir / "run.json").write_text(json.dumps(marker))


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def _report(*args):
    res = CliRunner().invoke(app, ["report", *map(str, args), "--no-throughput"])
    assert res.exit_code == 0, res.output
    return res


# ------------------------------------------------------------------------------ bootstrap


def test_bootstrap_resamples_draw_as_many_videos_as_the_split_has_and_follow_the_seed():
    """Each resample draws V of the split's V videos with replacement; the seed chooses the
    draws (the same seed repeats them, another seed gives others)."""
    counts = resample_counts(7, 400, seed=3)
    assert counts.shape == (400, 7)
    assert np.all(counts == np.round(counts)) and np.all(counts >= 0)
    assert np.all(counts.sum(axis=1) == 7)
    # every video is drawn once per resample on average
    assert counts.mean(axis=0) == pytest.approx(np.ones(7), abs=0.2)
    np.testing.assert_array_equal(counts, resample_counts(7, 400, seed=3))
    assert not np.array_equal(counts, resample_counts(7, 400, seed=4))


def test_resamples_where_a_ccc_is_undefined_are_left_out_of_that_targets_interval_and_p():
    """A resample that draws only videos on which a target's CCC is undefined (constant
    prediction and label) gives no Δ for that target, nor for the mean over targets: it is
    left out of their interval and p, and only of theirs: the other target keeps every
    resample."""
    rng = np.random.default_rng(0)
    flat = np.zeros((40, 2))
    flat[:, 1] = rng.normal(size=40)  # the first target constant, the second not
    moving = rng.normal(size=(40, 2))
    mask = np.ones(40, bool)

    def sums(noise):
        return np.stack([video_sums(v + noise * rng.normal(size=v.shape) * [0, 1], v, mask)
                         for v in (flat, moving)])  # fmt: skip

    a, b = [sums(0.3)], [sums(0.9)]
    counts = np.array([[2, 0], [1, 1], [0, 2], [1, 1], [0, 2]], dtype=float)
    res = paired_bootstrap(a, b, counts=counts)
    assert res.n_boot == 5
    # [2, 0] draws the flat video only: CCC valence (and so the mean) is 0 / 0 there
    assert res.n_used.tolist() == [4, 5, 4]
    kept = bootstrap_deltas(a, b, counts[1:])
    every = bootstrap_deltas(a, b, counts)
    assert np.all(np.isfinite(kept)) and np.all(np.isfinite(every[:, 1]))
    for j, draws in ((0, kept[:, 0]), (1, every[:, 1]), (2, kept[:, 2])):
        n = draws.size
        assert res.ci_low[j] == pytest.approx(np.quantile(draws, 0.025))
        assert res.ci_high[j] == pytest.approx(np.quantile(draws, 0.975))
        le, ge = ((draws <= 0).sum() + 1) / (n + 1), ((draws >= 0).sum() + 1) / (n + 1)
        assert res.p_value[j] == pytest.approx(min(1, 2 * min(le, ge)))
    assert all(res.undefined(j) is None for j in range(3))


def _plain_ccc(p, t):
    """Lin's CCC written out (population moments)."""
    mp, mt = p.mean(), t.mean()
    return 2 * ((p - mp) * (t - mt)).mean() / (p.var() + t.var() + (mp - mt) ** 2)


def _videos(run_dir, split="test"):
    """Per video of a run's predictions file: (pred, target, label mask), in file order."""
    tensors, meta = load_tensors(run_dir / "predictions" / f"{split}.safetensors")
    return json.loads(meta["videos"]), [
        (
            tensors[f"pred/{n}"].double().numpy(),
            tensors[f"target/{n}"].double().numpy(),
            tensors[f"label_mask/{n}"].bool().numpy(),
        )
        for n in json.loads(meta["videos"])
    ]


def _statistic(runs, idx):
    """CCC per target and their mean over the labelled frames of the videos ``idx`` (with
    repeats), averaged over the runs."""
    per_run = []
    for vids in runs:
        p = np.concatenate([vids[i][0][vids[i][2]] for i in idx])
        t = np.concatenate([vids[i][1][vids[i][2]] for i in idx])
        c = [_plain_ccc(p[:, k], t[:, k]) for k in range(p.shape[1])]
        per_run.append([*c, np.mean(c)])
    return np.mean(per_run, axis=0)


def test_the_reported_interval_and_p_are_the_bootstrap_the_command_asked_for(grid, tmp_path):
    """`--bootstrap B --seed S`: the Δ, interval and p of summary.csv are those of B
    resamples drawn with seed S, each recomputing every run's pooled CCC on the drawn videos
    (a brute-force loop over the predictions files); the report says B and S."""
    out = tmp_path / "out"
    _report(grid, "--bootstrap", 120, "--seed", 3, "--out", out)
    rows = {r["variant"]: r for r in _read_csv(out / "summary.csv")}
    names, _ = _videos(grid / "concat_seed-0")
    a = [_videos(grid / f"rjca_seed-{s}")[1] for s in (0, 1)]
    b = [_videos(grid / f"concat_seed-{s}")[1] for s in (0, 1)]
    v = len(names)
    deltas = np.array(
        [
            _statistic(a, idx) - _statistic(b, idx)
            for idx in (np.repeat(np.arange(v), c.astype(int)) for c in resample_counts(v, 120, 3))
        ]
    )
    point = _statistic(a, range(v)) - _statistic(b, range(v))
    le = ((deltas <= 0).sum(0) + 1) / 121
    ge = ((deltas >= 0).sum(0) + 1) / 121
    p = np.minimum(1, 2 * np.minimum(le, ge))
    got = rows["rjca"]
    for j, k in enumerate(KEYS):
        assert float(got[f"delta_{k}"]) == pytest.approx(point[j], abs=1e-9)
        assert float(got[f"delta_{k}_ci_low"]) == pytest.approx(
            np.quantile(deltas[:, j], 0.025), abs=1e-9
        )
        assert float(got[f"delta_{k}_ci_high"]) == pytest.approx(
            np.quantile(deltas[:, j], 0.975), abs=1e-9
        )
        assert float(got[f"delta_{k}_p"]) == pytest.approx(p[j], abs=1e-12)
    assert "(120 resamples, seed 3)" in (out / "report.md").read_text()


# --------------------------------------------------------------------------------- tables


def _fake_row(variant, means, delta=None, p=None, p_holm=None):
    """:func:`tests.test_report.fake_row` with a training time, a chosen Δ and Holm p-values."""
    row = fake_row(variant, means)
    row.update(params=1000, train_seconds=2.0, throughput=None)
    row["p_holm"] = None if p_holm is None else np.array(p_holm)
    if delta is not None:
        d = np.array(delta)
        row["delta"] = BootstrapResult(d, d - 0.01, d + 0.01, np.array(p), 1000, 10, 0.95)
    return row


def _md_rows(table):
    """Markdown table body as lists of cells, by the first cell."""
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        out[cells[0]] = cells
    return out


def _tables_report():
    # Holm over the two tested rows, per column (m = 2), by hand:
    #   valence 0.004, 0.040 -> 0.008, 0.040; arousal 0.30, 0.01 -> 0.30, 0.02;
    #   mean 0.020, 0.600 -> 0.040, 0.600
    rows = [
        _fake_row("base", [0.600, 0.500, 0.550]),
        _fake_row(
            "x",
            [0.611, 0.522, 0.5672],
            [0.011, 0.022, 0.0172],
            [0.004, 0.30, 0.020],
            [0.008, 0.30, 0.040],
        ),
        _fake_row(
            "y",
            [0.640, 0.510, 0.5366],
            [0.040, 0.010, -0.0134],
            [0.040, 0.01, 0.600],
            [0.040, 0.02, 0.600],
        ),
    ]
    return Report(split="test", baseline="base", rows=rows, targets=["valence", "arousal"])


def test_the_results_table_shows_the_mean_delta_its_raw_p_and_holm_p_per_column():
    """Main table: the Δ column is the Δ of the CCC mean (the last metric) with its interval,
    `p` the raw bootstrap p and `p Holm` the adjusted one; each CCC cell carries † when its
    own column's Holm p is below 0.05."""
    body = _md_rows(results_table(_tables_report()))
    dag = " †"
    assert body["base"][2:8] == ["0.600 ± 0.010", "0.500 ± 0.010", "0.550 ± 0.010",
                                 "(baseline)", "", ""]  # fmt: skip
    assert body["x"][2:8] == ["0.611 ± 0.010" + dag, "0.522 ± 0.010", "0.567 ± 0.010" + dag,
                              "+0.017 [+0.007, +0.027]", "0.020", "0.040" + dag]  # fmt: skip
    assert body["y"][2:8] == ["0.640 ± 0.010" + dag, "0.510 ± 0.010" + dag, "0.537 ± 0.010",
                              "−0.013 [−0.023, −0.003]", "0.600", "0.600"]  # fmt: skip


def test_the_delta_table_shows_each_targets_raw_and_holm_p():
    """Differences table: per metric the Δ [interval], the raw p and the Holm p (with † below
    0.05), the baseline row left out."""
    body = _md_rows(delta_table(_tables_report()))
    assert set(body) == {"x", "y"}
    assert body["x"][1:] == ["+0.011 [+0.001, +0.021]", "0.004", "0.008 †",
                             "+0.022 [+0.012, +0.032]", "0.300", "0.300",
                             "+0.017 [+0.007, +0.027]", "0.020", "0.040 †"]  # fmt: skip
    assert body["y"][1:] == ["+0.040 [+0.030, +0.050]", "0.040", "0.040 †",
                             "+0.010 [+0.000, +0.020]", "0.010", "0.020 †",
                             "−0.013 [−0.023, −0.003]", "0.600", "0.600"]  # fmt: skip


# -------------------------------------------------------------------------------- setups


def test_seeds_trained_in_another_precision_are_not_pooled(grid, tmp_path):
    """A seed that metrics.json says ran in bf16 beside fp32 seeds of one recipe is another
    setup: its own row, not part of the fp32 row's mean ± std."""
    gdir = _copy(grid, tmp_path / "g")
    _edit_json(gdir / "rjca_seed-1", "metrics.json", lambda m: m.update(precision="bf16"))
    rep = build_report([gdir], throughput=False, n_boot=100)
    rjca = [r for r in rep.rows if r["label"] == "rjca"]
    assert sorted(r["seeds"] for r in rjca) == [[0], [1]]
    fp32 = next(r for r in rjca if r["seeds"] == [0])
    assert fp32["ccc_mean"][0] == _metrics(gdir / "rjca_seed-0")["splits"]["test"]["ccc_mean"]
    assert any("precision used" in n and "separate rows" in n for n in rep.notes)


def test_a_variant_baseline_compares_rows_split_by_setup_with_the_baselines_same_setup(
    grid, tmp_path
):
    """`--baseline concat` when both variants' rows are split by precision: each row is
    compared with the concat row of its own setup, and its Δ is the difference of those two
    rows' means."""
    gdir = _copy(grid, tmp_path / "g")
    for variant in VARIANTS:
        _edit_json(gdir / f"{variant}_seed-1", "metrics.json", lambda m: m.update(precision="bf16"))
    rep = build_report([gdir], baseline="concat", throughput=False, n_boot=100)
    rows = {r["variant"]: r for r in rep.rows}
    for prec in ("bf16", "fp32"):
        row, base = rows[f"rjca [precision used={prec}]"], rows[f"concat [precision used={prec}]"]
        assert rep.baseline_of[row["variant"]] == base["variant"]
        assert row["delta"].delta[-1] == pytest.approx(row["ccc_mean"][0] - base["ccc_mean"][0])


# ------------------------------------------------------------------------------ gate flags


def test_gate_weights_on_flagged_frames_reach_the_table_and_csv_in_their_columns(
    tmp_path, registry
):
    """gate_flags.csv and the Markdown table put the mean step weights on flagged frames under
    "flagged" and the others under "elsewhere", and the share of flagged frames is the mean
    over the seeds (each computed here from the predictions files)."""
    raw = flagged_gate_recipe(tmp_path)
    run_grid(validate_recipe(raw, "flags.yaml", registry), registry=registry)
    gdir = tmp_path / "tiny"
    out = tmp_path / "out"
    _report(gdir, "--bootstrap", 100, "--out", out)
    table = _read_csv(out / "gate_flags.csv")
    assert table
    text = (out / "report.md").read_text()
    section = text[text.index("| variant | stream | flag |") :].split("\n\n")[0]
    lines = section.splitlines()[2:]
    shown = {
        (c[1], c[2]): c for c in ([x.strip() for x in ln.strip("|").split(" | ")] for ln in lines)
    }
    checked = 0
    for (stream, flag), cells in shown.items():
        inside, outside, share = [], [], []
        for seed in (0, 1):
            tensors, meta = load_tensors(gdir / f"seed-{seed}" / "predictions" / "test.safetensors")
            names = json.loads(meta["videos"])
            w = np.concatenate([tensors[f"gate/{stream}/{n}"].double().numpy() for n in names])
            on = np.concatenate(
                [
                    tensors[f"flag/{flag}/{n}"].bool().numpy()
                    if f"flag/{flag}/{n}" in tensors
                    else np.zeros(len(tensors[f"pred/{n}"]), bool)
                    for n in names
                ]
            )
            inside.append(w[on].mean(0))
            outside.append(w[~on].mean(0))
            share.append(on.mean())
        inside, outside = np.mean(inside, axis=0), np.mean(outside, axis=0)
        rows = [r for r in table if (r["stream"], r["flag"]) == (stream, flag)]
        assert [r["step"] for r in rows] == ["audio", "video"]
        for r, a, b in zip(rows, inside, outside, strict=True):
            assert float(r["weight_flagged"]) == pytest.approx(a, abs=1e-6)
            assert float(r["weight_elsewhere"]) == pytest.approx(b, abs=1e-6)
            assert float(r["frames_flagged"]) == pytest.approx(statistics.fmean(share))
        assert cells[3] == f"{100 * statistics.fmean(share):.0f} %"
        assert cells[5] == f"audio {inside[0]:.2f}, video {inside[1]:.2f}"
        assert cells[6] == f"audio {outside[0]:.2f}, video {outside[1]:.2f}"
        checked += 1
    assert checked == len({(r["stream"], r["flag"]) for r in table}) > 0


def test_epochs_and_training_time_are_means_over_the_seeds(grid, tmp_path):
    """summary.csv: `epochs_mean` and `train_seconds_mean` average every seed of the row
    (here one seed stopped after 3 epochs, the other after 1); `--baseline` names the row
    the others are compared with."""
    gdir = _copy(grid, tmp_path / "g")
    _edit_json(gdir / "concat_seed-1", "metrics.json", lambda m: m.update(epochs_run=3))
    out = tmp_path / "out"
    _report(gdir, "--bootstrap", 100, "--baseline", "rjca", "--out", out)
    rows = {r["variant"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["rjca"]["paired_test"] == "baseline" and rows["concat"]["baseline"] == "rjca"
    ms = [_metrics(gdir / f"concat_seed-{s}") for s in (0, 1)]
    assert float(rows["concat"]["epochs_mean"]) == statistics.fmean(m["epochs_run"] for m in ms)
    assert float(rows["concat"]["epochs_mean"]) == 2.0
    assert float(rows["concat"]["train_seconds_mean"]) == pytest.approx(
        statistics.fmean(m["train_seconds"] for m in ms)
    )


# ------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize("split", ["test", "val"])
def test_a_report_on_a_split_shows_that_splits_scores_and_robustness_curves(grid, tmp_path, split):
    """Runs evaluated (and swept) on val and test: the report on a split shows that split's
    CCCs in summary.csv and runs.csv, and that split's robustness curve, each value's cell the
    mean (and the CSV's std the sample std) over the seeds of that value's CCC mean in the
    runs' files, in ascending value order."""
    out = tmp_path / "out"
    _report(grid, "--split", split, "--bootstrap", 100, "--out", out)
    summary = {r["variant"]: r for r in _read_csv(out / "summary.csv")}
    for r in _read_csv(out / "runs.csv"):
        run = grid / f"{r['variant']}_seed-{r['seed']}"
        assert float(r["ccc_mean"]) == _metrics(run)["splits"][split]["ccc_mean"]
    for variant in VARIANTS:
        vals = [_metrics(grid / f"{variant}_seed-{s}")["splits"][split]["ccc_mean"] for s in (0, 1)]
        assert float(summary[variant]["ccc_mean_mean"]) == pytest.approx(statistics.fmean(vals))
    table = _read_csv(out / "robustness.csv")
    assert {r["split"] for r in table} == {split}
    md = (out / "report.md").read_text()
    section = md[md.index("## Robustness: shift") :].split("\n## ")[0]
    head = next(ln for ln in section.splitlines() if ln.startswith("| variant |"))
    assert head.endswith("| k=-8 | k=8 |")
    shown = _md_rows(section[section.index("| variant |") :].split("\n\n")[0])
    for variant in VARIANTS:
        files = [
            json.loads((grid / f"{variant}_seed-{s}" / "robustness" / "shift.json").read_text())
            for s in (0, 1)
        ]
        cells = []
        for value in (-8, 8):
            vals = [f["results"][split][str(value)]["metrics"]["ccc_mean"] for f in files]
            (rec,) = [r for r in table if r["variant"] == variant and r["value"] == str(value)]
            assert float(rec["ccc_mean_mean"]) == pytest.approx(statistics.fmean(vals))
            assert float(rec["ccc_mean_std"]) == pytest.approx(statistics.stdev(vals))
            cells.append(f"{statistics.fmean(vals):.3f}")
        assert shown[variant][3:] == cells


# ------------------------------------------------------------------------- comparability


def test_predictions_of_other_data_than_the_metrics_get_no_paired_test(grid, tmp_path):
    """A predictions file made on other data than its run's metrics.json (its data
    fingerprint differs; here its labels too), even with run.json's digest updated, is not
    used for the bootstrap: the row has no paired test and says why."""
    gdir = _copy(grid, tmp_path / "g")
    run = gdir / "rjca_seed-1"
    _rewrite_predictions(run, "0" * 64, negate_targets=True)
    rep = build_report([gdir], throughput=False, n_boot=100)
    row = next(r for r in rep.rows if r["variant"] == "rjca")
    assert isinstance(row["delta"], str)
    assert row["delta"].startswith("evaluated on different data")
    assert "rjca_seed-1 does not match its metrics" in row["delta"]
    assert row["p_holm"] is None


def test_a_repeated_seed_is_counted_once_and_not_as_a_run_left_out(grid, tmp_path):
    """A grid folder holding a second copy of a seed: the row keeps one run per seed, and the
    repeat is listed as a duplicate but does not make the seeds cell read `2 of 3`."""
    gdir = _copy(grid, tmp_path / "g")
    shutil.copytree(gdir / "concat_seed-1", gdir / "concat_seed-1.0")
    rec = json.loads((gdir / "grid.json").read_text())
    rec["runs"]["concat_seed-1.0"] = {
        "values": {"variant": "concat", "training.seed": 1.0},
        "status": "done",
    }
    (gdir / "grid.json").write_text(json.dumps(rec))
    out = tmp_path / "out"
    _report(gdir, "--bootstrap", 100, "--out", out)
    rows = {r["variant"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["concat"]["seeds"] == "0 1" and rows["concat"]["runs_left_out"] == "0"
    assert "| concat | 2 |" in (out / "report.md").read_text()
    vals = [_metrics(gdir / f"concat_seed-{s}")["splits"]["test"]["ccc_mean"] for s in (0, 1)]
    assert float(rows["concat"]["ccc_mean_std"]) == pytest.approx(statistics.stdev(vals))


def _keep_points(gdir, keep):
    """Remove every point of a copied grid but ``keep`` (folders and grid.json entries)."""
    rec = json.loads((gdir / "grid.json").read_text())
    for tag in list(rec["runs"]):
        if tag not in keep:
            shutil.rmtree(gdir / tag)
            del rec["runs"][tag]
    rec["order"] = [t for t in rec["order"] if t in keep]
    (gdir / "grid.json").write_text(json.dumps(rec))


def test_a_row_whose_seeds_lie_under_two_report_paths_keeps_the_place_of_its_first(grid, tmp_path):
    """Rows follow the first run of each row in report order: a variant whose seed 1 lies
    under the second report path still comes first (and is the default baseline) when its
    seed 0 comes first under the first path."""
    first = _copy(grid, tmp_path / "one" / "g")
    second = _copy(grid, tmp_path / "two" / "g")
    _keep_points(first, {"concat_seed-0", "rjca_seed-0"})
    _keep_points(second, {"concat_seed-1"})
    rep = build_report([first, second], throughput=False, n_boot=100)
    assert [r["variant"] for r in rep.rows] == ["concat", "rjca"]
    assert rep.rows[0]["seeds"] == [0, 1] and rep.baseline == "concat"
    assert rep.rows[0]["delta"] is None and rep.rows[1]["delta"] is not None


def test_sweeps_drawn_with_another_perturbation_seed_are_not_pooled(grid, tmp_path):
    """A run whose sweep of one name drew its perturbations with another seed: its curve is a
    sweep of its own, not averaged into the other runs' curve."""
    gdir = _copy(grid, tmp_path / "g")
    _edit_json(gdir / "rjca_seed-1", "robustness/shift.json", lambda r: r.update(seed=5))
    rep = build_report([gdir], throughput=False, n_boot=100)
    assert sorted((sw.key, sw.seed) for sw in rep.sweeps) == [("shift", 0), ("shift-2", 5)]
    by = {sw.seed: {c.variant: c for c in sw.curves} for sw in rep.sweeps}
    assert by[0]["rjca"].runs == 1 and by[0]["concat"].runs == 2
    assert list(by[5]) == ["rjca"] and by[5]["rjca"].runs == 1
    one = json.loads((gdir / "rjca_seed-0" / "robustness" / "shift.json").read_text())
    assert by[0]["rjca"].mean["ccc_mean"] == [
        one["results"]["test"][k]["metrics"]["ccc_mean"] for k in ("-8", "8")
    ]


def test_a_report_refuses_runs_whose_targets_come_in_another_order(grid, tmp_path, registry):
    """Runs predicting [arousal, valence] beside runs predicting [valence, arousal]: their
    per-target columns do not line up, so the report refuses them in one line."""
    raw = tiny_recipe(tmp_path / "other", epochs=1)
    raw["name"] = "swapped"
    raw["model"]["targets"] = ["arousal", "valence"]
    rc = validate_recipe(raw, "swapped.yaml", registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    with pytest.raises(FusionkitError, match=r"predict different targets.*\[arousal, valence\]"):
        build_report([grid, run.path], throughput=False, n_boot=100)


# ------------------------------------------------------------------------------- runs list


@pytest.fixture
def cli(monkeypatch, capsys, registry):
    """The `fusionkit` entry point in this process, with the in-test `tiny` dataset."""
    monkeypatch.setenv("COLUMNS", "300")
    yield from user_cli(monkeypatch, capsys, registry)


def test_runs_list_shows_scores_of_complete_runs_and_what_is_missing(grid, tmp_path, cli):
    """`fusionkit runs list`: each complete run with the test CCC mean of its metrics.json; a
    run whose sweep misses a value says how many of how many; a run with a file gone is
    incomplete and shows no score; a grid point that never ran is listed as pending."""
    gdir = _copy(grid, tmp_path / "g")
    _edit_json(
        gdir / "rjca_seed-0", "robustness/shift.json", lambda r: r["results"]["test"].pop("8")
    )
    (gdir / "concat_seed-1" / "predictions" / "test.safetensors").unlink()
    rec = json.loads((gdir / "grid.json").read_text())
    rec["runs"]["rjca_seed-2"] = {
        "values": {"variant": "rjca", "training.seed": 2},
        "status": "pending",
    }
    (gdir / "grid.json").write_text(json.dumps(rec))
    code, out, err = cli("runs", "list", gdir)
    assert code == 0, err
    lines = {ln.split()[0]: ln.split(maxsplit=1)[1] for ln in out.splitlines()[1:] if ln.strip()}
    assert lines[str(gdir / "rjca_seed-2")].split() == ["pending"]
    incomplete = lines.pop(str(gdir / "concat_seed-1"))
    assert incomplete.startswith("incomplete (files missing: predictions/test.safetensors)")
    assert incomplete.split()[-1] == "1"  # epochs; no score
    for variant, seed in (("concat", 0), ("rjca", 0), ("rjca", 1)):
        run = gdir / f"{variant}_seed-{seed}"
        score = _metrics(run)["splits"]["test"]["ccc_mean"]
        assert lines[str(run)].split()[-1] == f"{score:.4f}"
        status = lines[str(run)].rsplit(maxsplit=2)[0]
        if run.name == "rjca_seed-0":
            assert status == "complete, robustness partial (shift: 1 of 4 missing)"
        else:
            assert status == "complete"


def test_runs_list_says_what_it_could_not_check(grid, tmp_path, monkeypatch, capsys):
    """A grid point recorded without a status is pending (as the report calls it), and a run
    whose recipe cannot be validated where the list runs (its dataset's plugin is not
    installed here) says its robustness sweeps were not checked instead of "complete"."""
    from fusionkit.core.registry import load_registry

    gdir = _copy(grid, tmp_path / "g")
    rec = json.loads((gdir / "grid.json").read_text())
    rec["runs"]["rjca_seed-2"] = {"values": {"variant": "rjca", "training.seed": 2}}
    (gdir / "grid.json").write_text(json.dumps(rec))
    monkeypatch.setenv("COLUMNS", "300")
    plain = load_registry()  # without the in-test `tiny` dataset the runs were made with
    session = user_cli(monkeypatch, capsys, plain)
    try:
        code, out, err = next(session)("runs", "list", gdir)
    finally:
        next(session, None)  # restores the registry cache
    assert code == 0, err
    lines = {ln.split()[0]: ln.split(maxsplit=1)[1] for ln in out.splitlines()[1:] if ln.strip()}
    assert lines[str(gdir / "rjca_seed-2")].split() == ["pending"]
    status = lines[str(gdir / "concat_seed-0")]
    assert status.startswith("complete, robustness not checked (recipe.yaml: "), status
    assert "tiny" in status


# ------------------------------------------------------------------------------ throughput


def test_throughput_is_the_splits_frames_over_the_fastest_pass(grid, tmp_path, registry):
    """frames/s: every frame of the split (counted here from the predictions file) divided by
    the time of the fastest timed pass."""
    run = _copy(grid / "concat_seed-0", tmp_path / "run")
    rec = measure_throughput(run, "test", min_seconds=0.0, min_passes=3, registry=registry)
    _, videos = _videos(run)
    assert rec["frames"] == sum(len(pred) for pred, _, _ in videos)
    assert len(rec["pass_seconds"]) >= 3
    assert rec["frames_per_second"] == pytest.approx(rec["frames"] / min(rec["pass_seconds"]))


def test_the_seed_spread_is_not_judged_against_a_baseline_of_one_seed(grid, tmp_path):
    """Whether a Δ lies within the spread between seeds needs two seeds on both sides: with a
    one-seed baseline the summary leaves it blank (and adds no caveat), even though the other
    row has two seeds."""
    gdir = _copy(grid, tmp_path / "g")
    _keep_points(gdir, {"concat_seed-0", "rjca_seed-0", "rjca_seed-1"})
    out = tmp_path / "out"
    res = _report(gdir, "--bootstrap", 100, "--out", out)
    rows = {r["variant"]: r for r in _read_csv(out / "summary.csv")}
    assert rows["concat"]["seeds"] == "0" and rows["rjca"]["seeds"] == "0 1"
    assert rows["rjca"]["paired_test"] == "ok"
    assert rows["rjca"]["delta_ccc_mean_within_seed_spread"] == ""
    assert "more seeds are needed" not in res.output


def test_a_baseline_seed_on_other_data_is_found_whatever_the_seed_counts(grid, tmp_path):
    """Every run of both rows must have been evaluated on the same data: a one-seed baseline
    on other data (its data fingerprint differs) refuses the paired test of a two-seed row."""
    gdir = _copy(grid, tmp_path / "g")
    _keep_points(gdir, {"concat_seed-0", "rjca_seed-0", "rjca_seed-1"})
    base = gdir / "concat_seed-0"
    _edit_json(base, "metrics.json", lambda m: m["data_fingerprints"].update(test="f" * 64))
    _rewrite_predictions(base, "f" * 64)
    rep = build_report([gdir], throughput=False, n_boot=100)
    row = next(r for r in rep.rows if r["variant"] == "rjca")
    assert row["seeds"] == [0, 1] and row["same_data"] is False
    assert row["delta"] == "evaluated on different data" and row["p_holm"] is None
