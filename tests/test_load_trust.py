"""Reloading a trained run is trusted only when it is the run's: `load_run` (predict, stream,
eval, robustness, throughput) refuses unfinished runs and files changed after completion,
`predict` refuses to merge runs that predicted different data, and wrong `--device` /
`--split` values end in one line naming the option."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fusionkit.core.errors import CheckpointError, DataError, FusionkitError, RecipeError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.predict import RunPredictions, write_submission
from fusionkit.engine.runs import BEST_FILE, NORMALIZATION_FILE, RunDir
from fusionkit.engine.session import build_session, load_run, resolve_device
from fusionkit.engine.train import Trainer
from tests.conftest import TinyDataset, TinyParams, tiny_recipe


def _train(parent, registry, name, *, epochs=1, stop_after=None, targets=None, seed=0):
    raw = tiny_recipe(parent, epochs=epochs)
    raw["output"]["name"] = name
    raw["data"]["params"]["seed"] = seed
    if targets is not None:
        raw["model"]["targets"] = targets
    rc = validate_recipe(raw, f"{name}.yaml", registry)

    def stop(epoch, _record):
        if epoch == stop_after:
            raise KeyboardInterrupt  # as Ctrl-C after that epoch was saved

    with RunDir.create(rc, registry) as run:
        try:
            Trainer(build_session(rc, registry), run, on_epoch_end=stop).fit()
        except KeyboardInterrupt:
            pass
    return run.path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, registry):
    """A complete run, one interrupted after epoch 1 of 3, and two single-target runs: one
    on the same data as ``done`` and one on data generated with another seed."""
    parent = tmp_path_factory.mktemp("trust")
    paths = {
        "done": _train(parent, registry, "done"),
        "part": _train(parent, registry, "part", epochs=3, stop_after=1),
        "val0": _train(parent, registry, "val0", targets=["valence"]),
        "aro0": _train(parent, registry, "aro0", targets=["arousal"]),
        "aro1": _train(parent, registry, "aro1", targets=["arousal"], seed=1),
    }
    feats = parent / "feat.safetensors"
    video = TinyDataset(TinyParams()).videos("test")[0]
    save_file({m: x[:30].contiguous() for m, x in video.features.items()}, str(feats))
    paths["features"] = feats
    return paths


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ----------------------------------------------------------------- 3: unfinished runs


def test_an_interrupted_run_is_refused_by_load_run_predict_and_stream(runs, tmp_path, cli):
    assert RunDir.open(runs["part"]).marker().status == "running"
    assert (runs["part"] / BEST_FILE).is_file()  # best weights of epoch 1 exist
    spaced = _copy(runs["part"], tmp_path / "sp ace" / "part")
    with pytest.raises(CheckpointError) as info:
        load_run(spaced)
    msg = str(info.value)
    assert msg.startswith(f"{spaced} did not finish")
    assert f"finish it with `fusionkit resume {shlex.quote(str(spaced))}`" in msg

    out = tmp_path / "pred.csv"
    code, _, err = cli("predict", runs["part"], "--out", out)
    assert code == 2 and err.startswith(f"error: {runs['part']} did not finish"), err
    assert f"fusionkit resume {runs['part']}" in err and not out.exists()
    code, _, err = cli("stream", runs["part"], runs["features"], "-q")
    assert code == 2 and "did not finish" in err, err
    code, _, err = cli("eval", runs["part"])
    assert code == 2 and "fusionkit resume" in err, err


def test_a_run_still_training_is_refused_naming_its_holder(runs, tmp_path, registry):
    path = _copy(runs["part"], tmp_path / "busy")
    with RunDir.open(path):  # another "process" holds the lock: it is training now
        with pytest.raises(CheckpointError, match=r"is still training \(in use by pid \d+"):
            load_run(RunDir.open(path), registry=registry)


def test_complete_runs_still_load(runs, registry):
    loaded = load_run(runs["done"], registry=registry)
    assert not loaded.session.model.training


# ----------------------------------------------------------------- 4: changed files


def _scale_weights(path, factor=1.5):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[key] = tensors[key] * factor
    save_file(tensors, str(path), metadata=meta)


def test_weights_changed_after_completion_are_refused(runs, tmp_path, cli, registry):
    run = _copy(runs["done"], tmp_path / "dmg")
    load_run(run, registry=registry)  # intact: loads
    _scale_weights(run / BEST_FILE)
    with pytest.raises(CheckpointError) as info:
        load_run(run, registry=registry)
    assert str(info.value).startswith(f"{run / BEST_FILE} changed after the run finished")
    out = tmp_path / "pred.csv"
    code, _, err = cli("predict", run, "--out", out)
    assert code == 2 and "model.safetensors changed after the run finished" in err, err
    assert not out.exists()
    code, _, err = cli("stream", run, runs["features"], "-q")
    assert code == 2 and "model.safetensors changed" in err, err


def test_a_recipe_edited_after_completion_is_refused(runs, tmp_path, cli, registry):
    """Swapping model.targets in a complete run's recipe.yaml used to make predict write the
    arousal values under "valence" (exit 0)."""
    run = _copy(runs["done"], tmp_path / "edit")
    recipe = run / "recipe.yaml"
    text = recipe.read_text()
    swapped = text.replace("- valence\n  - arousal", "- arousal\n  - valence")
    assert swapped != text
    recipe.write_text(swapped)
    with pytest.raises(CheckpointError) as info:
        load_run(run, registry=registry)
    msg = str(info.value)
    assert msg.startswith(f"{recipe} was edited after the run was created")
    assert "model.targets: created with ['valence', 'arousal']" in msg
    out = tmp_path / "pred.csv"
    code, _, err = cli("predict", run, "--out", out)
    assert code == 2 and "recipe.yaml was edited" in err and not out.exists(), err
    code, _, err = cli("stream", run, runs["features"], "-q")
    assert code == 2 and "recipe.yaml was edited" in err, err
    lines = [ln for ln in text.splitlines() if not ln.startswith("description:")]
    recipe.write_text("\n".join(["description: notes added later", *lines]) + "\n")
    loaded = load_run(run, registry=registry)  # not a training setting: still the same run
    assert loaded.session.recipe.description == "notes added later"


def test_normalization_changed_after_completion_is_refused(runs, tmp_path, registry):
    run = _copy(runs["done"], tmp_path / "norm")
    assert NORMALIZATION_FILE in RunDir.open(run).marker().files
    _scale_weights(run / NORMALIZATION_FILE, 2.0)
    with pytest.raises(CheckpointError, match=r"normalization\.safetensors changed after"):
        load_run(run, registry=registry)


# ----------------------------------------------------------------- 6: merging runs


def test_predict_merges_runs_of_the_same_data(runs, tmp_path, cli):
    out = tmp_path / "sub.csv"
    code, stdout, err = cli("predict", runs["val0"], runs["aro0"], "--out", out)
    assert code == 0, err
    assert "columns valence, arousal" in stdout and out.is_file()


def test_predict_refuses_runs_that_predicted_different_data(runs, tmp_path, cli):
    out = tmp_path / "sub.csv"
    code, _, err = cli("predict", runs["val0"], runs["aro1"], "--out", out)
    assert code == 2, err
    assert err.startswith(f"error: {runs['val0']} and {runs['aro1']} predicted different data")
    assert "frames in" in err and not out.exists()


def _fake(name, targets, ids, labels=None):
    pred = torch.zeros(len(ids), len(targets))
    run = RunPredictions(
        name, targets, ("valence", "arousal"), {"a": (torch.as_tensor(ids), pred)}, None
    )
    run.labels = labels
    return run


def test_write_submission_compares_videos_frames_and_labels(tmp_path):
    out = tmp_path / "s.csv"
    v = _fake("v", ("valence",), [0, 1, 2], {"a": "x"})
    with pytest.raises(DataError, match=r"v and a predicted different data: video 'a' has 3"):
        write_submission([v, _fake("a", ("arousal",), [0, 1, 2, 3])], out)
    with pytest.raises(DataError, match=r"other frame numbers"):
        write_submission([v, _fake("a", ("arousal",), [0, 1, 5])], out)
    with pytest.raises(DataError, match=r"video 'a' has other labels"):
        write_submission([v, _fake("a", ("arousal",), [0, 1, 2], {"a": "y"})], out)
    other = RunPredictions(
        "b", ("arousal",), ("valence", "arousal"), {"b": (torch.arange(3), torch.zeros(3, 1))}, None
    )
    with pytest.raises(DataError, match=r"the videos differ \(only v has a; only b has b\)"):
        write_submission([v, other], out)
    write_submission([v, _fake("a", ("arousal",), [0, 1, 2], {"a": "x"})], out)  # same data
    assert out.read_text().splitlines()[0] == "video,frame,valence,arousal"


# ----------------------------------------------------------------- 9: --device


def test_device_typos_are_one_line_naming_the_option(runs, tmp_path, cli, monkeypatch):
    choices = "use auto, cpu, cuda or cuda:N (e.g. cuda:0)"
    code, _, err = cli("eval", runs["done"], "--device", "gpu")
    assert code == 2 and err == f"error: --device gpu: unknown device; {choices}", err
    code, _, err = cli("predict", runs["done"], "--out", tmp_path / "x.csv", "--device", "mps")
    assert code == 2 and err == f"error: --device mps: unknown device; {choices}", err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli("stream", runs["done"], runs["features"], "--device", "cuda:0")
    assert code == 2, err
    assert (
        err
        == "error: --device cuda:0: no CUDA device is available on this machine; use --device cpu"
    )
    code, _, err = cli("eval", runs["done"], "--device", "cuda")
    assert code == 2 and err.startswith("error: --device cuda: no CUDA device"), err
    assert "recipe" not in err


def test_resolve_device_words_recipe_keys_and_device_indices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FusionkitError, match=r"^--device cuda:1: this machine has 1 CUDA"):
        resolve_device("cuda:1", what="--device")
    assert resolve_device("cuda:0", what="--device") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError) as info:
        resolve_device("cuda", source="r.yaml")
    assert str(info.value) == (
        "invalid recipe r.yaml: training.device: 'cuda': no CUDA device is available on this "
        "machine; set training.device to cpu or auto"
    )
    assert resolve_device("cpu", what="--device") == torch.device("cpu")


def test_recipe_validation_resolves_the_device(monkeypatch, tmp_path, registry):
    """A recipe asking for CUDA on a machine without it used to validate "ok" and fail in run."""
    from fusionkit.engine.session import check_recipe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raw = tiny_recipe(tmp_path)
    raw["training"]["device"] = "cuda"
    with pytest.raises(RecipeError, match=r"^invalid recipe gpu\.yaml: training\.device: 'cuda'"):
        check_recipe(validate_recipe(raw, "gpu.yaml", registry), registry)


# ----------------------------------------------------------------- 14: --split


def test_an_unknown_split_names_the_option_not_the_recipe(runs, tmp_path, cli):
    want = (
        "split 'tset': dataset 'tiny' has no such split (splits: train, val, test); "
        "choose one with --split"
    )
    code, _, err = cli("predict", runs["done"], "--out", tmp_path / "x.csv", "--split", "tset")
    assert code == 2 and err == f"error: {want}", err
    code, _, err = cli("eval", runs["done"], "--split", "tset")
    assert code == 2 and err == f"error: {want}", err


def test_predict_uses_the_threads_the_run_was_trained_with(tmp_path, registry):
    """predict used torch's thread count (all cores), so its last digits could differ from
    the run's own predictions; it now pins training.num_threads as run and eval do."""
    from fusionkit.engine.predict import predict_run

    raw = tiny_recipe(tmp_path, epochs=1, num_threads=1)
    rc = validate_recipe(raw, "one_thread.yaml", registry)
    with RunDir.create(rc, registry) as run:
        Trainer(build_session(rc, registry), run).fit()
    torch.set_num_threads(2)
    try:
        predict_run(run.path, "test", registry=registry, device="cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


def test_predict_uses_the_threads_the_run_was_evaluated_with(tmp_path, registry):
    """Without training.num_threads, eval re-ran a run on the thread count its metrics.json
    records while predict used the cores available now: one run, two sets of last digits."""
    from fusionkit.engine.predict import predict_run
    from fusionkit.engine.session import available_cores

    if available_cores() < 2:
        pytest.skip("needs 2 cores to tell the recorded thread count from another one")
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["training"].pop("num_threads", None)
    rc = validate_recipe(raw, "cores.yaml", registry)
    assert rc.training.num_threads is None
    torch.set_num_threads(1)  # the run is evaluated on this process's setting for it
    try:
        with RunDir.create(rc, registry) as run:
            Trainer(build_session(rc, registry), run).fit()
        recorded = json.loads((run.path / "metrics.json").read_text())["cpu_threads"]
        other = 1 if recorded > 1 else 2
        torch.set_num_threads(other)
        predict_run(run.path, "test", registry=registry, device="cpu")
        assert torch.get_num_threads() == recorded != other
    finally:
        torch.set_num_threads(1)


def test_a_run_is_loaded_in_the_precision_it_was_evaluated_in(tmp_path, registry, monkeypatch):
    """`precision: auto` is bf16 on CUDA: a run trained on a CPU (fp32) used to be predicted
    and re-evaluated in bf16 on a GPU; and `predict` ran fp32 even for a bf16 run, so its
    numbers were not the run's own."""
    import fusionkit.engine.session as session_mod
    from fusionkit.engine.files import load_tensors
    from fusionkit.engine.predict import predict_run

    fp32 = _train(tmp_path / "a", registry, "fp32")
    monkeypatch.setattr(session_mod, "use_bf16", lambda precision, device: True)  # as on CUDA
    assert load_run(fp32, registry=registry).session.bf16 is False
    monkeypatch.undo()

    raw = tiny_recipe(tmp_path / "b", epochs=1, precision="bf16")
    rc = validate_recipe(raw, "bf16.yaml", registry)
    with RunDir.create(rc, registry) as run:
        Trainer(build_session(rc, registry), run).fit()
    got = predict_run(run.path, "test", registry=registry, device="cpu")
    stored, _ = load_tensors(run.path / "predictions" / "test.safetensors")
    for name, (_, pred) in got.per_video.items():
        assert torch.equal(pred, stored[f"pred/{name}"].to(pred.dtype)), name


def test_data_of_another_width_is_blamed_on_the_data_not_the_weights(tmp_path, registry):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["data"] = {
        "name": "synthetic",
        "params": {"num_train": 2, "num_val": 2, "num_test": 2, "audio_dim": 8},
        "window": 64,
        "hop": 48,
    }
    rc = validate_recipe(raw, "syn.yaml", registry)
    with RunDir.create(rc, registry) as run:
        Trainer(build_session(rc, registry), run).fit()
    load_run(run.path, registry=registry, data_overrides=["audio_dim=8"])  # same width: fine
    with pytest.raises(DataError) as info:
        load_run(run.path, registry=registry, data_overrides=["audio_dim=7"])
    msg = str(info.value)
    assert msg.startswith("the data given with --data (audio_dim=7) has features of widths")
    assert "audio 7" in msg and "give features of the widths the run was trained on" in msg


def test_eval_of_a_complete_run_without_metrics_says_the_file_was_removed(runs, tmp_path, cli):
    run = _copy(runs["done"], tmp_path / "nometrics")
    (run / "metrics.json").unlink()
    code, _, err = cli("eval", run)
    assert code == 2, err
    assert "has no metrics.json: run.json says complete, so the file was removed" in err, err
    assert "did not finish" not in err
