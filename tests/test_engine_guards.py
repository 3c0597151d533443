"""Guards of the small engine pieces users meet on every reload and every log: threads that
never oversubscribe the machine, the device and precision a run is re-run in, a reloaded run
in eval mode on the data it was evaluated on, progress lines in log files, workers that die
with the process that started them, the runs a report leaves out (and says so), report
folders that are only replaced when fusionkit made them, and report figures that draw the
numbers they are given."""

from __future__ import annotations

import copy
import csv
import io
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fusionkit.engine.progress as progress_mod
import fusionkit.engine.session as session_mod
import fusionkit.engine.workers as workers_mod
from fusionkit.cli.stream import _summary as stream_summary
from fusionkit.core.errors import CheckpointError, DataError, FusionkitError, RecipeError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.checkpoint import WeightsMismatch
from fusionkit.engine.files import load_tensors, save_tensors
from fusionkit.engine.runs import BEST_FILE, MARKER_FILE, METRICS_FILE
from fusionkit.engine.session import (
    available_cores,
    check_recipe,
    data_as_evaluated,
    load_run,
    resolve_device,
    set_threads,
    use_bf16,
)
from fusionkit.studies.plots import ccc_bars_figure, delta_figure, zoomed_limits
from fusionkit.studies.reportdir import check_report_dir
from fusionkit.studies.scan import scan_runs
from tests.conftest import (
    TinyDataset,
    TinyParams,
    assert_streams_trailing_windows,
    tiny_recipe,
    tiny_stream_run,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, registry):
    """A complete tiny run (z-scored features) and 60 frames of a test video as a file."""
    return tiny_stream_run(tmp_path_factory.mktemp("engine_guards"), registry, num_threads=1)


# ----------------------------------------------------------------- threads and devices


def test_available_cores_are_the_affinity_of_the_process_not_the_machines(monkeypatch):
    """Under taskset or a batch scheduler's CPU set, counting the machine's cores gives one
    thread per core of other jobs: many times slower training."""
    monkeypatch.setattr(session_mod.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(session_mod.os, "cpu_count", lambda: 64)
    assert available_cores() == 1


def test_a_thread_request_above_the_cores_is_capped_and_none_shares_the_cores(monkeypatch):
    """``training.num_threads`` above the available cores is capped (with a warning), and
    parallel workers split the cores among them instead of each taking all of them."""
    monkeypatch.setattr(session_mod, "available_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        with pytest.warns(UserWarning, match="num_threads=6 exceeds the 4 cores"):
            assert set_threads(6) == 4
        assert torch.get_num_threads() == 4
        assert set_threads(None, share=2) == 2 == torch.get_num_threads()
        assert set_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("env", "share", "expected"), [("1", 1, 1), ("3", 1, 3), ("8", 1, 4), ("3", 2, 2), ("x", 1, 4)]
)
def test_the_default_threads_never_exceed_omp_num_threads(monkeypatch, env, share, expected):
    """A user's OMP_NUM_THREADS caps the default (no training.num_threads): the cores shared
    among workers, or fewer when the variable says so; a value that is not a positive number
    is ignored. An explicit training.num_threads is used as asked."""
    monkeypatch.setattr(session_mod, "available_cores", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", env)
    try:
        assert set_threads(None, share=share) == expected == torch.get_num_threads()
        assert set_threads(2) == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_a_containers_cpu_quota_caps_the_available_cores(tmp_path, monkeypatch, files, expected):
    """Under a cgroup CPU quota (docker --cpus=2 on a large host) the affinity still lists
    every core of the host: the quota (v2 cpu.max or v1 cfs_quota_us / cfs_period_us,
    rounded up) caps the cores used instead."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert session_mod._cgroup_cpus(tmp_path) == expected
    monkeypatch.setattr(session_mod.os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(session_mod, "_cgroup_cpus", lambda: expected)
    assert available_cores() == (64 if expected is None else expected)


def test_device_auto_is_cuda_when_present_and_bf16_auto_only_there(monkeypatch):
    """``--device auto`` takes the GPU when there is one; ``precision: auto`` is bf16 on CUDA
    only (without AMX, bf16 trains slower on the CPU than float32, and it is less exact)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", what="--device") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", what="--device") == torch.device("cpu")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [use_bf16(p, cpu) for p in ("auto", "bf16", "fp32")] == [False, True, False]
    assert [use_bf16(p, cuda) for p in ("auto", "bf16", "fp32")] == [True, True, False]


# ----------------------------------------------------------------- reloading a run


def test_a_reloaded_run_predicts_in_eval_mode(trained, registry):
    """Dropout left on at reload makes every prediction of a run a random draw."""
    loaded = load_run(trained[0], registry=registry, device="cpu")
    assert not [name for name, m in loaded.session.model.named_modules() if m.training]


def test_data_overrides_reach_the_dataset_a_run_is_reloaded_with(trained, registry):
    """The dataset of the last recipe is reused within a process: a reload with ``--data``
    must not be handed the dataset built without it."""
    plain = load_run(trained[0], registry=registry, device="cpu")
    other = load_run(trained[0], registry=registry, device="cpu", data_overrides=["seed=3"])
    assert plain.session.dataset.params.seed == 0 and other.session.dataset.params.seed == 3
    a, b = plain.session.dataset.videos("test")[0], other.session.dataset.videos("test")[0]
    assert not torch.equal(a.labels[:100], b.labels[:100])


def test_data_as_evaluated_compares_the_features_and_the_labels_of_the_split(trained, registry):
    """Numbers computed from features or labels other than those a run's metrics were
    computed on are refused, each named; a record of another split does not speak for it."""
    loaded = load_run(trained[0], registry=registry, device="cpu")
    metrics = json.loads((trained[0] / "metrics.json").read_text())
    recorded = (metrics["features_sha256"]["test"], metrics["data_fingerprints"]["test"])
    assert data_as_evaluated(loaded.run_dir, loaded.session, "test") == recorded
    for key, what in (("features_sha256", "features"), ("data_fingerprints", "labels")):
        changed = copy.deepcopy(metrics)
        changed[key]["test"] = "0" * 64
        with pytest.raises(DataError, match=f"the test {what} are not those the run was"):
            data_as_evaluated(loaded.run_dir, loaded.session, "test", changed)
        other_split = copy.deepcopy(metrics)
        other_split[key]["val"] = "0" * 64
        assert data_as_evaluated(loaded.run_dir, loaded.session, "test", other_split) == recorded


# ----------------------------------------------------------------- progress in logs


def test_epoch_lines_estimate_the_time_left_from_the_epochs_trained_now(monkeypatch):
    """The eta of a log line is the time per epoch trained in this process times the epochs
    left; a resumed run does not count the epochs trained before it."""
    now = iter([0.0, 0.0, 10.0, 0.0, 0.0, 30.0])  # made, started, epoch done
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(perf_counter=lambda: next(now)))
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    record = {"train_loss": 0.5, "val_ccc_mean": 0.6, "lr": 1e-3, "seconds": 10.0}
    fresh = progress_mod.train_progress(console, "r")
    fresh.start(4, 0, 10)  # t0 = 0
    fresh.epoch({**record, "epoch": 1}, improved=True)  # 10 s per epoch, 3 left
    resumed = progress_mod.train_progress(console, "r")
    resumed.start(8, 5, 10)  # t0 = 0, epochs 1..5 trained earlier
    resumed.epoch({**record, "epoch": 6}, improved=False)  # 30 s for one epoch, 2 left
    lines = console.file.getvalue().splitlines()
    assert lines[1].startswith("r epoch 1/4") and lines[1].endswith("eta 30s")
    assert lines[3].startswith("r epoch 6/8") and lines[3].endswith("eta 1m00s")


# ----------------------------------------------------------------- workers


class _Exited(Exception):
    pass


def _watch_loop(monkeypatch, started_by, ppids):
    """Run the watcher thread of ``die_with_parent`` in this thread with ``os.getppid``
    answering ``ppids`` in turn: the exit status it ends with, or None if it still watches
    when they run out."""
    watchers = []
    calls = iter(ppids)

    def exit_(code):
        raise _Exited(code)

    def sleep(_seconds):
        pass

    monkeypatch.setattr(
        workers_mod, "multiprocessing", SimpleNamespace(parent_process=lambda: started_by)
    )
    monkeypatch.setattr(workers_mod, "time", SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(
        workers_mod,
        "os",
        SimpleNamespace(getppid=lambda: next(calls), _exit=exit_),
    )
    monkeypatch.setattr(
        workers_mod,
        "threading",
        SimpleNamespace(
            Thread=lambda target, name, daemon: SimpleNamespace(
                start=lambda: watchers.append(target)
            )
        ),
    )
    workers_mod.die_with_parent(poll_seconds=0.0)
    try:
        watchers[0]()
    except _Exited as exc:
        return exc.args[0]
    except StopIteration:
        return None
    return None


def test_a_worker_whose_starter_died_before_it_watched_exits(monkeypatch):
    """A worker started by process 4242 that was re-parented (to 1) before it began watching
    exits; watching the OS parent it had by then, it would wait forever."""
    assert _watch_loop(monkeypatch, SimpleNamespace(pid=4242), [1]) == 1
    assert _watch_loop(monkeypatch, SimpleNamespace(pid=4242), [4242, 4242, 1]) == 1
    assert _watch_loop(monkeypatch, None, [77, 77, 1]) == 1  # else its OS parent, 77


# ----------------------------------------------------------------- report folders


def _folder(root, files: dict[str, str]):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    "files",
    [
        pytest.param(
            {"report.json": json.dumps({"created_by": "mytool", "files": ["notes.txt"]}),
             "notes.txt": "mine"},
            id="another-tools-report-json",
        ),
        pytest.param(
            {"report.md": "# Comparison report\n", "summary.csv": "a\n", "thesis.tex": "x"},
            id="report-beside-a-users-file",
        ),
        pytest.param(
            {"report.md": "# My notes on the runs\n", "summary.csv": "a\n"},
            id="a-users-report-md",
        ),
        pytest.param(
            {"report.md": "# Comparison report\n", "plots/figure.svg": "<svg/>"},
            id="a-users-figure-in-plots",
        ),
    ],
)  # fmt: skip
def test_a_folder_fusionkit_did_not_write_is_never_replaced(tmp_path, files):
    """A report replaces its folder whole; only a folder of fusionkit's own (marked, or a
    report from before marks that holds nothing else) may be replaced."""
    out = _folder(tmp_path / "out", files)
    with pytest.raises(FusionkitError, match=r"--out .*(not made by fusionkit|did not write)"):
        check_report_dir(out)


def test_a_report_from_before_marks_is_still_replaced(tmp_path):
    """What the refusals above must not refuse: an unmarked report of fusionkit's."""
    out = _folder(
        tmp_path / "out",
        {"report.md": "# Comparison report\n", "summary.csv": "a\n", "plots/ccc.png": "png"},
    )
    assert check_report_dir(out) == "report"


def test_a_report_is_not_written_over_the_current_folder(tmp_path, monkeypatch):
    """Replacing the folder a shell stands in would leave it in a deleted folder."""
    out = _folder(tmp_path / "out", {"report.md": "# Comparison report\n"})
    monkeypatch.chdir(out)
    with pytest.raises(FusionkitError, match="is or holds the current folder"):
        check_report_dir(out)
    monkeypatch.chdir(tmp_path)
    assert check_report_dir(out) == "report"


# ----------------------------------------------------------------- report figures


def test_ccc_bars_reach_the_means_they_show():
    """The bars stand on the zoomed axis floor; each one's top is its variant's mean."""
    mean = np.array([[0.61, 0.55], [0.66, 0.52], [0.58, 0.57]])
    std = np.array([[0.01, 0.02], [0.015, 0.01], [0.0, 0.03]])
    fig = ccc_bars_figure(["a", "b", "c"], ["valence", "arousal"], mean, std, "t")
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert len(bars) == 2
    for j, container in enumerate(bars):
        tops = [r.get_y() + r.get_height() for r in container]
        np.testing.assert_allclose(tops, mean[:, j], atol=1e-12)


def test_zoomed_limits_frame_the_values_with_a_margin_of_their_range():
    """The margin is 15% of the values' range, and at least 0.01 when they nearly agree."""
    lo, hi = zoomed_limits(np.array([0.50, 0.52]), np.array([0.60, 0.62]))
    assert lo == pytest.approx(0.50 - 0.15 * 0.12) and hi == pytest.approx(0.62 + 0.15 * 0.12)
    lo, hi = zoomed_limits(np.array([0.5, np.nan]), np.array([0.501, np.nan]))
    assert lo == pytest.approx(0.49) and hi == pytest.approx(0.511)


def test_delta_figure_fills_the_significant_points_and_spans_each_interval():
    """Filled markers are the significant deltas, hollow ones the others, and each error bar
    runs from the interval's low to its high end (asymmetric intervals included)."""
    delta = np.array([[0.05], [-0.01], [0.02]])
    low = np.array([[0.01], [-0.04], [-0.02]])
    high = np.array([[0.07], [0.01], [0.09]])
    sig = np.array([[True], [False], [False]])
    fig = delta_figure(["a", "b", "c"], ["valence"], delta, low, high, sig, "t")
    ax = fig.axes[0]
    points = [ln for ln in ax.lines if ln.get_marker() == "o"]
    filled = [ln for ln in points if ln.get_markerfacecolor() != "white"]
    hollow = [ln for ln in points if ln.get_markerfacecolor() == "white"]
    assert list(np.concatenate([ln.get_ydata() for ln in filled])) == [0.05]
    assert sorted(np.concatenate([ln.get_ydata() for ln in hollow])) == [-0.01, 0.02]
    spans = sorted(
        (float(seg[:, 1].min()), float(seg[:, 1].max()))
        for coll in ax.collections
        for seg in coll.get_segments()
    )
    np.testing.assert_allclose(spans, sorted(zip(low[:, 0], high[:, 0], strict=True)))


# ----------------------------------------------------------------- predict and stream commands


def test_predict_reads_the_test_split_of_the_data_given_with_data(trained, tmp_path, cli):
    """Without --split, predict writes the test split; --data params reach the dataset the
    run is re-run on (here another seed: other videos of other lengths)."""
    out = tmp_path / "sub.csv"
    code, _, err = cli("predict", trained[0], "--out", out, "--data", "seed=3", "--device", "cpu")
    assert code == 0, err
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row[0]] = counts.get(row[0], 0) + 1
    expected = {v.name: v.num_frames for v in TinyDataset(TinyParams(seed=3)).videos("test")}
    assert counts == expected


def test_stream_runs_on_the_threads_it_is_given(trained, tmp_path, cli):
    """`stream --threads N` sets torch's threads; left at a many-core default, one frame's
    latency is dominated by thread start-up."""
    torch.set_num_threads(3)
    try:
        code, _, err = cli("stream", trained[0], trained[1], "--threads", "1", "-q")
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def _copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_a_run_json_without_the_weights_hash_is_refused(trained, tmp_path, registry):
    """With the weights' SHA-256 gone from run.json, nothing would tell the run's weights
    from any others put in their place."""
    run = _copy_run(trained[0], tmp_path / "run")
    marker = json.loads((run / MARKER_FILE).read_text())
    del marker["files"][BEST_FILE]
    (run / MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match=f"records no SHA-256 of {BEST_FILE}"):
        load_run(run, registry=registry, device="cpu")


def test_weights_of_another_shape_are_blamed_on_the_weights_even_with_data(
    trained, tmp_path, registry
):
    """Weights that no longer fit the model were blamed on the ``--data`` given with them
    ("give features of the widths the run was trained on") although the data fits."""
    run = _copy_run(trained[0], tmp_path / "run")
    with safe_open(str(run / BEST_FILE), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(run / BEST_FILE))
    key = next(k for k, t in tensors.items() if t.ndim == 2)
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, str(run / BEST_FILE), metadata=meta)
    with pytest.raises(CheckpointError, match=f"{BEST_FILE} changed after the run finished"):
        load_run(run, registry=registry, device="cpu", data_overrides=["seed=3"])


def test_weights_that_do_not_fit_the_rebuilt_model_are_not_blamed_on_absent_data(
    trained, registry, monkeypatch
):
    """When the run's own weights no longer fit the model its recipe builds (a plugin changed
    a component), the error says so; without --data there is no data to blame."""

    def mismatch(path, model):
        raise WeightsMismatch(f"{path}: encoders.audio.weight has shape (8, 6), model (8, 7)")

    monkeypatch.setattr(session_mod, "load_weights", mismatch)
    with pytest.raises(WeightsMismatch, match=r"encoders\.audio\.weight has shape"):
        load_run(trained[0], registry=registry, device="cpu")


def test_an_encoder_for_a_modality_the_dataset_lacks_names_the_key(tmp_path, registry):
    """A typo in a modality name is a recipe error naming the file and the key, not a
    KeyError from deep inside the model build."""
    raw = tiny_recipe(tmp_path)
    raw["model"]["encoders"]["vidoe"] = raw["model"]["encoders"].pop("video")
    rc = validate_recipe(raw, "typo.yaml", registry)
    with pytest.raises(RecipeError, match=r"typo\.yaml.*model\.encoders\.vidoe: dataset 'tiny'"):
        check_recipe(rc, registry)


# ----------------------------------------------------------------- runs a report picks up


def _drop_weights(run):
    (run / BEST_FILE).unlink()
    return "incomplete", f"files listed in {MARKER_FILE} are missing: {BEST_FILE}"


def _edit_metrics(run):
    metrics = json.loads((run / METRICS_FILE).read_text())
    metrics["splits"]["test"]["ccc_mean"] = 0.99
    (run / METRICS_FILE).write_text(json.dumps(metrics))
    return "unreadable", f"{run / METRICS_FILE} changed after the run finished"


def _drop_marker(run):
    (run / MARKER_FILE).unlink()  # metrics.json is still there
    return "incomplete", f"no {MARKER_FILE}: not a complete fusionkit run directory"


@pytest.mark.parametrize("damage", [_drop_weights, _edit_metrics, _drop_marker])
def test_a_complete_run_with_a_file_gone_or_changed_is_left_out_of_reports(
    trained, tmp_path, damage
):
    """A run whose weights or run.json were removed, or whose metrics were edited after it
    finished, is listed as left out with the reason (not dropped without a word), and its
    numbers are not reported."""
    run = _copy_run(trained[0], tmp_path / "runs" / "run")
    status, detail = damage(run)
    scan = scan_runs([tmp_path / "runs"])
    assert scan.runs == []
    assert [(e.where, e.status) for e in scan.excluded] == [(str(run), status)]
    assert scan.excluded[0].detail.startswith(detail), scan.excluded[0].detail


def test_stream_context_is_the_number_of_frames_each_prediction_sees(
    trained, tmp_path, cli, registry
):
    """`stream --context 8` predicts each frame from the last 8 frames only: the model's
    offline prediction for the last frame of that window (its causal encoder sees 25)."""
    run, feats, video = trained
    out = tmp_path / "ctx.csv"
    code, _, err = cli("stream", run, feats, "--context", "8", "--out", out, "-q")
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    online = torch.tensor([[float(r["valence"]), float(r["arousal"])] for r in rows])
    session = load_run(run, registry=registry, device="cpu").session
    norm = session.normalizer
    zs = {
        m: (x[:60] - norm.mean[m]) / norm.std[m].clamp(min=norm.eps)
        for m, x in video.features.items()
    }
    assert_streams_trailing_windows(session.model, zs, online, 8, times=[3, 7, 8, 20, 59])


def test_stream_summary_gives_the_median_and_99th_percentile_latency():
    """The latency summary a user sizes a live setup by: p50, p99 (the value 99% of the
    frames stay at or under) and the speed against real time."""
    latencies = list(np.random.default_rng(0).uniform(0.001, 0.02, 1000))  # seconds
    ms = np.array(latencies) * 1e3
    text = stream_summary(latencies, 25.0)
    assert f"p50 {np.median(ms):.2f} ms" in text
    assert f"p99 {np.percentile(ms, 99, method='higher'):.2f} ms" in text
    assert "budget 40.0 ms per frame" in text
    assert f"{(1000 / 25.0) / sum(latencies):.1f}x real time" in text


def test_eval_fails_when_metrics_json_lacks_a_number_it_recomputes(trained, tmp_path, cli):
    """`eval` compares every number it recomputes: one deleted from metrics.json by hand is a
    difference (stored nothing), not a number left out of an "exactly" verdict."""
    run = _copy_run(trained[0], tmp_path / "run")
    metrics = json.loads((run / METRICS_FILE).read_text())
    test = metrics["splits"]["test"]
    gone = sorted(k for k in test if k.startswith(("pcc_", "rmse_")))
    assert gone
    for key in gone:
        del test[key]
    (run / METRICS_FILE).write_text(json.dumps(metrics))
    code, out, err = cli("eval", run, "--device", "cpu")
    assert code == 1, out + err
    assert "reproduces metrics.json exactly" not in out
    assert set(re.findall(r"(test\.\w+): stored None", err)) == {f"test.{k}" for k in gone}, err


def test_eval_evaluates_a_split_given_twice_once(trained, tmp_path, cli, monkeypatch):
    """``--split test --split test`` evaluates test once and lists it once in the verdict."""
    import fusionkit.engine.evaluate as evaluate

    asked = []
    real = evaluate.evaluate_splits

    def spy(session, splits, *args, **kwargs):
        asked.append(list(splits))
        return real(session, splits, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_splits", spy)
    code, out, err = cli("eval", trained[0], "--split", "test", "--split", "test", "--device=cpu")
    assert code == 0, out + err
    assert asked == [["test"]]
    assert "reproduces metrics.json exactly (test;" in " ".join(out.split())


def test_eval_re_runs_a_cpu_run_on_the_cpu_on_a_machine_with_cuda(trained, cli, monkeypatch):
    """Without --device, eval uses the device type the run was evaluated on: a CPU run is not
    re-run on a GPU (whose sums differ, so eval said a correct run differs); --device wins."""
    import fusionkit.engine.session as session

    asked = []
    real = session.load_run

    def spy(run, *args, device="auto", **kwargs):
        asked.append(device)
        return real(run, *args, device="cpu", **kwargs)

    monkeypatch.setattr(session, "load_run", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, out, err = cli("eval", trained[0])
    assert code == 0, out + err
    code, out, err = cli("eval", trained[0], "--device", "auto")
    assert asked == ["cpu", "auto"]


def test_eval_refuses_a_predictions_file_changed_after_the_run(trained, tmp_path, cli):
    """`eval` says a run reproduces its numbers only when the predictions that reports read
    are those the metrics came from: an edited predictions file is named, not passed."""
    run = _copy_run(trained[0], tmp_path / "run")
    path = run / "predictions" / "test.safetensors"
    tensors, meta = load_tensors(path)
    key = next(k for k in tensors if k.startswith("pred/"))
    tensors[key] = tensors[key] + 0.25
    save_tensors(path, tensors, meta)
    code, out, err = cli("eval", run, "--device", "cpu")
    assert code != 0 and "reproduces metrics.json exactly" not in out
    assert "test.safetensors changed after the run finished" in err, err
