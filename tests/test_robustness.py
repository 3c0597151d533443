"""Evaluation sweeps on trained checkpoints: no retraining, resume, recorded params, CLI."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

import fusionkit.core.registry as fk_registry
from fusionkit.core.errors import CheckpointError
from fusionkit.core.recipe import RobustnessSpec, validate_recipe
from fusionkit.engine.runs import RunDir
from fusionkit.engine.session import load_run
from fusionkit.engine.train import Trainer
from fusionkit.studies.grid import train_and_evaluate
from fusionkit.studies.robustness import (
    missing_values,
    robustness_complete,
    run_recipe_robustness,
    run_sweep,
)
from tests.conftest import make_registry, tiny_recipe

SHIFT = {"name": "shift", "perturbation": "shift", "params": {"modality": "audio"}, "axis": "k"}


def train(tmp_path, registry, robustness=None, name="run"):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["output"]["name"] = name
    if robustness:
        raw["evaluation"]["robustness"] = robustness
    rc = validate_recipe(raw, "r", registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    return run.path


def sweep_spec(registry, **raw):
    return RobustnessSpec.model_validate(raw, context={"registry": registry})


def robustness(run_dir, specs, registry, **kw):
    with RunDir.open(run_dir) as run:
        return run_recipe_robustness(run, specs, registry=registry, **kw)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, registry):
    tmp = tmp_path_factory.mktemp("rob")
    return train(tmp, registry, [{**SHIFT, "values": [-6, 0, 6], "splits": ["val", "test"]}])


def test_recipe_sweep_runs_after_training_and_records_its_params(trained):
    rec = json.loads((trained / "robustness" / "shift.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert rec["perturbation"] == "shift" and rec["axis"] == "k" and rec["seed"] == 0
    assert rec["params"] == {"modality": "audio"}
    assert rec["checkpoint_sha256"] == sha(trained / "model.safetensors")
    for split in ("val", "test"):
        assert list(rec["results"][split]) == ["-6", "0", "6"]
        assert rec["results"][split]["6"]["params"] == {"modality": "audio", "k": 6}
        # shifting by 0 is the identity: exactly the clean metrics of the run
        assert rec["results"][split]["0"]["metrics"] == metrics["splits"][split]
    assert rec["results"]["test"]["6"]["metrics"] != metrics["splits"]["test"]


def test_new_sweep_reuses_the_checkpoint_and_skips_computed_values(trained, registry, monkeypatch):
    before = {f: sha(trained / f) for f in ("model.safetensors", "state.safetensors")}
    metrics_before = (trained / "metrics.json").read_text()
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("retrained"))
    spec = sweep_spec(registry, perturbation="noise", axis="snr_db", values=[10, 0])
    calls = []
    robustness(trained, [spec], registry, on_value=lambda *a: calls.append(a[:2]))
    assert calls == [("test", 10), ("test", 0)]
    calls.clear()
    bigger = sweep_spec(registry, perturbation="noise", axis="snr_db", values=[10, 0, -5])
    robustness(trained, [bigger], registry, on_value=lambda *a: calls.append(a[:2]))
    assert calls == [("test", -5)]  # only the new value is computed
    assert {f: sha(trained / f) for f in before} == before
    assert (trained / "metrics.json").read_text() == metrics_before


def test_interrupted_sweep_resumes(tmp_path, registry):
    run_dir = train(tmp_path, registry)
    spec = sweep_spec(registry, **SHIFT, values=[-4, 0, 4, 8])
    loaded = load_run(run_dir, registry=registry)

    def stop_after_two(split, value, metrics):
        if value == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(loaded.session, loaded.run_dir, spec, on_value=stop_after_two)
    assert missing_values(run_dir, spec) == [("test", 4), ("test", 8)]
    seen = []
    run_sweep(loaded.session, loaded.run_dir, spec, on_value=lambda s, v, m: seen.append(v))
    assert seen == [4, 8] and not missing_values(run_dir, spec)


def test_results_are_deterministic_and_invalidated_by_a_new_checkpoint(tmp_path, registry):
    spec = sweep_spec(registry, perturbation="jitter", axis="max_k", values=[10], seed=3)
    a, b = train(tmp_path, registry, name="a"), train(tmp_path, registry, name="b")
    ra = robustness(a, [spec], registry)[0]["results"]["test"]["10"]["metrics"]
    rb = robustness(b, [spec], registry)[0]["results"]["test"]["10"]["metrics"]
    assert ra == rb  # same checkpoint recipe and seed -> same perturbed metrics
    other = sweep_spec(registry, perturbation="jitter", axis="max_k", values=[10], seed=4)
    assert missing_values(a, other) == [("test", 10)]  # another seed is another sweep
    (a / "model.safetensors").write_bytes((b / "state.safetensors").read_bytes())
    assert missing_values(a, spec) == [("test", 10)]  # the checkpoint changed: recompute


def test_grid_point_with_missing_robustness_only_evaluates(tmp_path, registry, monkeypatch):
    from fusionkit.studies.grid import run_grid

    raw = tiny_recipe(tmp_path, epochs=1)
    raw["sweep"] = {"training.seed": [0]}
    rc = validate_recipe(raw, "g", registry)
    run_grid(rc, registry=registry)
    raw["evaluation"]["robustness"] = [{**SHIFT, "values": [0, 5]}]
    rc2 = validate_recipe(raw, "g", registry)
    run_dir = tmp_path / "tiny" / "seed-0"
    point = rc2.model_copy(update={"sweep": {}})
    assert not robustness_complete(run_dir, point)
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("retrained"))
    weights = sha(run_dir / "model.safetensors")
    record = run_grid(rc2, registry=registry)
    assert record["runs"]["seed-0"]["status"] == "done"
    assert robustness_complete(run_dir, point)
    assert sha(run_dir / "model.safetensors") == weights
    # anything else changed in a finished point refuses the grid before it runs, naming it
    raw["training"]["lr"] = 0.5
    raw["evaluation"]["robustness"][0]["values"] = [0, 5, 9]
    with pytest.raises(CheckpointError, match=r"seed-0 \(training\.lr 0\.003 -> 0\.5\)"):
        run_grid(validate_recipe(raw, "g", registry), registry=registry)
    assert json.loads((tmp_path / "tiny" / "grid.json").read_text())["runs"] == record["runs"]


@pytest.fixture
def cli_registry(monkeypatch):
    """The CLI's global registry with the in-test `tiny` dataset added."""
    fk_registry.clear_registry_cache()
    monkeypatch.setattr(fk_registry, "load_registry", lambda strict=None: make_registry())
    yield
    fk_registry.clear_registry_cache()


def test_cli_robustness_and_report(tmp_path, cli_registry):
    from fusionkit.cli import app

    run_dir = train(tmp_path, fk_registry.get_registry())
    runner = CliRunner()
    res = runner.invoke(
        app,
        ["robustness", str(run_dir), "--perturb", "shift", "--axis", "k", "--values", "-5,0,5",
         "--param", "modality=video", "--name", "video_shift"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rec = json.loads((run_dir / "robustness" / "video_shift.json").read_text())
    assert rec["params"] == {"modality": "video"} and list(rec["results"]["test"]) == [
        "-5",
        "0",
        "5",
    ]
    res = runner.invoke(app, ["robustness", str(run_dir), "--perturb", "shift", "--axis", "kk",
                              "--values=1"])  # fmt: skip
    assert res.exit_code != 0 and "has no param 'kk'" in str(res.exception)
    out = tmp_path / "report"
    res = runner.invoke(app, ["report", str(run_dir), "--out", str(out), "--no-throughput"])
    assert res.exit_code == 0, res.output
    assert (out / "plots" / "robustness_video_shift.png").is_file()
    assert "Robustness: video_shift" in (out / "report.md").read_text()


def test_results_of_an_earlier_perturbation_revision_are_recomputed_and_not_reported(
    tmp_path, registry
):
    """noise and span_dropout changed definition (revision 2): a file computed before has
    other numbers for the same params, so a sweep recomputes it and a report leaves it out."""
    from fusionkit.studies.report import build_report

    spec = sweep_spec(registry, perturbation="noise", axis="snr_db", values=[10, 0])
    run_dir = train(tmp_path, registry)
    path = run_dir / "robustness" / "noise_snr_db.json"
    rec = robustness(run_dir, [spec], registry)[0]
    assert rec["revision"] == 2 and not missing_values(run_dir, spec, registry)
    old = {k: v for k, v in rec.items() if k != "revision"}  # as written before revision 2
    path.write_text(json.dumps(old))
    assert missing_values(run_dir, spec, registry) == [("test", 10), ("test", 0)]
    rep = build_report([run_dir], throughput=False, n_boot=50)
    assert not rep.sweeps
    assert any("revision 1 of perturbation 'noise'" in n and "fusionkit robustness" in n
               for n in rep.notes), rep.notes  # fmt: skip
    calls = []
    robustness(run_dir, [spec], registry, on_value=lambda *a: calls.append(a[:2]))
    assert calls == [("test", 10), ("test", 0)]
    assert json.loads(path.read_text())["revision"] == 2
    assert len(build_report([run_dir], throughput=False, n_boot=50).sweeps) == 1


def _features_changed_on_disk(monkeypatch, split="test"):
    """The tiny dataset delivering other ``split`` features (as after a new extraction)."""
    import dataclasses

    from tests.conftest import TinyDataset

    original = TinyDataset.videos

    def videos(self, name):
        out = original(self, name)
        if name != split:
            return out
        return [
            dataclasses.replace(v, features={**v.features, "audio": v.features["audio"] + 0.5})
            for v in out
        ]

    monkeypatch.setattr(TinyDataset, "videos", videos)


def _labels_changed_on_disk(monkeypatch, split="test"):
    """The tiny dataset delivering other ``split`` labels, features untouched (re-annotated)."""
    import dataclasses

    from tests.conftest import TinyDataset

    original = TinyDataset.videos

    def videos(self, name):
        out = original(self, name)
        return out if name != split else [dataclasses.replace(v, labels=-v.labels) for v in out]

    monkeypatch.setattr(TinyDataset, "videos", videos)


def _drop_from_metrics(run_dir, key):
    """``metrics.json`` as a run of an earlier version wrote it (without ``key``)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop(key)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    marker = json.loads((run_dir / "run.json").read_text())
    marker["files"]["metrics.json"] = sha(run_dir / "metrics.json")
    (run_dir / "run.json").write_text(json.dumps(marker))


def test_a_sweep_on_features_changed_since_the_run_is_refused(tmp_path, registry, monkeypatch):
    """A value added after the features were extracted anew used to be computed on the new
    features beside values of the old ones: one curve from two data sets, exit 0."""
    from fusionkit.core.errors import DataError

    run_dir = train(tmp_path, registry, [{**SHIFT, "values": [0, 6]}])
    recorded = json.loads((run_dir / "metrics.json").read_text())["features_sha256"]
    assert set(recorded) == {"val", "test"}
    result = run_dir / "robustness" / "shift.json"
    assert json.loads(result.read_text())["features_sha256"] == {"test": recorded["test"]}
    before = result.read_bytes()
    _features_changed_on_disk(monkeypatch)
    bigger = sweep_spec(registry, **SHIFT, values=[0, 6, 12])
    with pytest.raises(DataError, match="the test features are not those the run was evalu"):
        robustness(run_dir, [bigger], registry)
    assert result.read_bytes() == before
    # the val split is unchanged: a sweep there is fine
    robustness(run_dir, [sweep_spec(registry, **SHIFT, values=[1], splits=["val"])], registry)

    # a run of an earlier version records no features: the sweep's own record tells that its
    # values were computed on other features, so all of them are computed again, not mixed
    _drop_from_metrics(run_dir, "features_sha256")
    calls = []
    robustness(run_dir, [bigger], registry, on_value=lambda *a: calls.append(a[:2]))
    assert calls == [("test", 0), ("test", 6), ("test", 12)]


def test_a_sweep_on_labels_changed_since_the_run_is_refused(tmp_path, registry, monkeypatch):
    """Re-annotated test labels with the same features: a value added to a sweep used to be
    scored against the new labels beside values scored against the old ones, exit 0."""
    from fusionkit.core.errors import DataError

    run_dir = train(tmp_path, registry, [{**SHIFT, "values": [0, 6]}])
    result = run_dir / "robustness" / "shift.json"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stored = json.loads(result.read_text())
    assert stored["data_fingerprints"] == {"test": metrics["data_fingerprints"]["test"]}
    before = result.read_bytes()
    _labels_changed_on_disk(monkeypatch)
    bigger = sweep_spec(registry, **SHIFT, values=[0, 6, 12])
    with pytest.raises(DataError, match="the test labels are not those the run was evaluated"):
        robustness(run_dir, [bigger], registry)
    assert result.read_bytes() == before
    with pytest.raises(DataError, match="test labels"):  # a new sweep too
        robustness(run_dir, [sweep_spec(registry, **{**SHIFT, "name": "s2"}, values=[3])], registry)

    # a sweep file whose values no record ties to labels: computed again, not mixed
    monkeypatch.undo()
    rec = json.loads(result.read_text())
    rec.pop("data_fingerprints")
    result.write_text(json.dumps(rec))
    calls = []
    robustness(run_dir, [bigger], registry, on_value=lambda *a: calls.append(a[:2]))
    assert calls == [("test", 0), ("test", 6), ("test", 12)]


def test_eval_names_features_changed_since_the_run(tmp_path, registry, monkeypatch, capsys):
    from tests.conftest import user_cli

    run_dir = train(tmp_path, registry)
    _features_changed_on_disk(monkeypatch)
    cli = user_cli(monkeypatch, capsys, registry)
    invoke = next(cli)
    code, _, err = invoke("eval", run_dir)
    assert code == 2
    assert "the test features are not those the run was evaluated on" in err
    code, out, _ = invoke("eval", run_dir, "--split", "val")  # unchanged: reproduced
    assert code == 0 and "reproduces metrics.json exactly (val;" in out


def test_eval_names_labels_changed_since_the_run(tmp_path, registry, monkeypatch, capsys):
    from tests.conftest import user_cli

    run_dir = train(tmp_path, registry)
    _labels_changed_on_disk(monkeypatch)
    invoke = next(user_cli(monkeypatch, capsys, registry))
    code, _, err = invoke("eval", run_dir)
    assert code == 2
    assert "the test labels are not those the run was evaluated on" in err


def test_values_of_a_sweep_file_that_names_no_features_are_computed_again(tmp_path, registry):
    """A run and a sweep file from before features were recorded: the stored values may come
    from other features, so adding a value computes them all again, once."""
    run_dir = train(tmp_path, registry, [{**SHIFT, "values": [0, 6]}])
    _drop_from_metrics(run_dir, "features_sha256")
    result = run_dir / "robustness" / "shift.json"
    rec = json.loads(result.read_text())
    rec.pop("features_sha256")
    result.write_text(json.dumps(rec))
    calls = []
    bigger = sweep_spec(registry, **SHIFT, values=[0, 6, 12])
    robustness(run_dir, [bigger], registry, on_value=lambda *a: calls.append(a[:2]))
    assert calls == [("test", 0), ("test", 6), ("test", 12)]
    assert set(json.loads(result.read_text())["features_sha256"]) == {"test"}
    calls.clear()
    biggest = sweep_spec(registry, **SHIFT, values=[0, 6, 12, 18])
    robustness(run_dir, [biggest], registry, on_value=lambda *a: calls.append(a[:2]))
    assert calls == [("test", 18)]


def test_a_split_is_hashed_once_per_session(tmp_path, registry, monkeypatch):
    import fusionkit.engine.session as session_mod

    run_dir = train(tmp_path, registry)
    calls = []
    real = session_mod.features_sha256
    monkeypatch.setattr(session_mod, "features_sha256", lambda *a: calls.append(1) or real(*a))
    session = load_run(run_dir, registry=registry).session
    first = session.data_hashes("test")
    assert session.data_hashes("test") == first and len(calls) == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # training's end hashed the same inputs and labels
    assert first == (metrics["features_sha256"]["test"], metrics["data_fingerprints"]["test"])
    assert load_run(run_dir, registry=registry).session.data_hashes("test") == first
    assert len(calls) == 2  # another session (another process's data) is hashed anew
