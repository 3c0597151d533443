"""Run lifecycle trust fixes (audit of run / resume / eval / stream / runs list): a complete run
resumes its missing robustness values, eval pins the run's threads, a read-only run folder and
an edited recipe.yaml end in one line naming the file, stream refuses non-finite, empty and
wrong-width features, runs list sees missing files, suggested commands are shell-quoted, and
SIGTERM takes Ctrl-C's path."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import time

import pytest
import torch
import yaml
from safetensors.torch import save_file

import fusionkit.core.registry as fk_registry
from fusionkit.core.errors import CheckpointError, DataError
from fusionkit.engine import runs as runs_module
from fusionkit.engine.files import file_sha256
from fusionkit.engine.runs import RunDir
from fusionkit.engine.session import load_run
from fusionkit.engine.streaming import read_feature_file
from tests.conftest import tiny_recipe
from tests.test_reliability import one_line_error

SWEEP = {
    "name": "ash",
    "perturbation": "shift",
    "params": {"modality": "audio"},
    "axis": "k",
    "values": [0, 3, 6],
    "splits": ["val", "test"],
}


@pytest.fixture
def cli(cli_inproc, monkeypatch):
    """The CLI's entry point in this process with the in-test `tiny` dataset."""
    monkeypatch.setenv("COLUMNS", "400")
    yield lambda *args: cli_inproc([str(a) for a in args])
    torch.set_num_threads(1)


def write_recipe(tmp_path, name="tiny", robustness=None, **training):
    raw = tiny_recipe(tmp_path / "runs", **{"epochs": 1, "num_threads": 1, **training})
    raw["output"]["name"] = name
    if robustness is not None:
        raw["evaluation"]["robustness"] = robustness
    path = tmp_path / f"{name}.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def train(recipe_path):
    """Train a recipe file as `fusionkit run` does, releasing the run's lock at the end (the
    CLI commands below run in this process, where a lock lives as long as its holder)."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.studies.grid import train_and_evaluate

    reg = fk_registry.get_registry()
    rc = validate_recipe(yaml.safe_load(recipe_path.read_text()), str(recipe_path), reg)
    with RunDir.create(rc, reg) as run:
        train_and_evaluate(rc, run, resume=False, registry=reg)
    return run.path


def snapshot(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# ------------------------------------------------------------- 1, 2: robustness of a complete run


def test_resume_of_a_complete_run_evaluates_the_robustness_values_it_misses(cli, tmp_path):
    recipe = write_recipe(tmp_path, robustness=[SWEEP])
    run = train(recipe)
    path = run / "robustness" / "ash.json"
    full = json.loads(path.read_text())
    partial = json.loads(path.read_text())  # as left by a Ctrl-C during the sweep
    del partial["results"]["test"]
    del partial["results"]["val"]["6"]
    path.write_text(json.dumps(partial))
    listed = cli("runs", "list", str(tmp_path / "runs"))
    assert "complete, robustness partial (ash: 4 of 6 missing)" in listed.stdout, listed.stdout

    res = cli("resume", str(run), "-q")
    assert res.returncode == 0, res.stderr
    assert "evaluating the robustness values it misses" in res.stdout, res.stdout
    assert "ash (4 of 6)" in res.stdout and "nothing to do" not in res.stdout
    done = json.loads(path.read_text())
    for split in ("val", "test"):
        for k in ("0", "3", "6"):
            assert done["results"][split][k]["metrics"] == full["results"][split][k]["metrics"]
    assert RunDir(run).is_complete()

    again = cli("run", str(recipe), "--resume", "-q")
    assert again.returncode == 0 and "complete already; nothing to do" in again.stdout


def test_run_resume_with_a_new_robustness_sweep_evaluates_it(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    run = train(recipe)
    before = snapshot(run)
    sweep = "evaluation.robustness=[{name: ash, perturbation: shift, params: {modality: audio}, axis: k, values: [0, 5]}]"  # noqa: E501
    res = cli("run", str(recipe), "--resume", sweep, "-q")
    assert res.returncode == 0, res.stderr
    assert "nothing to do" not in res.stdout
    rec = json.loads((run / "robustness" / "ash.json").read_text())
    assert sorted(rec["results"]["test"]) == ["0", "5"]
    after = snapshot(run)
    changed = {k for k in after if not k.startswith("robustness") and after[k] != before.get(k)}
    assert changed == {"recipe.yaml"}
    # the run's own recipe now names the sweep (it used to keep `robustness: []`), and the
    # run is still the same training: resuming it finds nothing to do
    own = yaml.safe_load((run / "recipe.yaml").read_text())["evaluation"]["robustness"]
    assert [s["name"] for s in own] == ["ash"]
    res = cli("resume", str(run), "-q")
    assert res.returncode == 0 and "nothing to do" in res.stdout, res.stderr


# --------------------------------------------------------------------------- 7: eval's threads


def test_eval_pins_the_threads_the_run_was_trained_with(cli, tmp_path):
    recipe = write_recipe(tmp_path)  # training.num_threads=1
    assert cli("run", str(recipe), "-q").returncode == 0
    torch.set_num_threads(3)  # as on a many-core machine
    res = cli("eval", str(tmp_path / "runs" / "tiny"))
    assert res.returncode == 0, res.stderr
    assert torch.get_num_threads() == 1
    assert "reproduces metrics.json exactly" in res.stdout
    assert "1 thread (training.num_threads=1)" in res.stdout


def test_eval_says_its_comparison_is_exact(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    run = train(recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["splits"]["val"]["ccc_mean"] += 1e-12  # a last-digit difference still counts
    (run / "metrics.json").write_text(json.dumps(metrics))
    res = cli("eval", str(run))
    assert res.returncode == 1 and "val.ccc_mean" in res.stderr
    assert "compared exactly" in res.stderr


# ------------------------------------------------------------------ 8: a read-only run folder


def test_a_read_only_run_folder_is_one_clear_line(cli, tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path)
    run = train(recipe)
    before = snapshot(run)
    real = os.open

    def fake(path, *args, **kw):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *args, **kw)

    monkeypatch.setattr(runs_module.os, "open", fake)
    with pytest.raises(CheckpointError, match="the folder must be writable to train, resume"):
        RunDir(run).lock()
    for args in (["resume", str(run)], ["run", str(recipe), "--resume"]):
        one_line_error(
            cli(*args),
            f"cannot lock {run} (.lock: Read-only file system)",
            "the folder must be writable to train, resume",
        )
    assert snapshot(run) == before


# ------------------------------------------------------------ 10: recipe.yaml edited afterwards


def test_resume_of_a_run_whose_recipe_yaml_was_edited_names_file_and_key(cli, tmp_path):
    recipe = write_recipe(tmp_path, epochs=2)
    run = train(recipe)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    saved["training"]["epochs"] = 5
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    before = snapshot(run)
    line = one_line_error(
        cli("resume", str(run)),
        f"{run / 'recipe.yaml'} was edited after the run was created",
        "training.epochs: created with 2, recipe.yaml has 5",
        "restore it",
    )
    assert "fusionkit resume" not in line  # not the command that just failed
    marker = json.loads((run / "run.json").read_text())
    del marker["training_view"]  # a run made before run.json recorded its settings
    (run / "run.json").write_text(json.dumps(marker))
    one_line_error(
        cli("resume", str(run)),
        "recipe.yaml was edited after the run was created",
        "the changed key cannot be named",
    )
    assert {k: v for k, v in snapshot(run).items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }


# --------------------------------------------------------------------- 11: stream's features


def test_stream_refuses_non_finite_empty_and_wrong_width_features(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    run = train(recipe)
    audio, video = torch.randn(40, 6), torch.randn(40, 5)  # the tiny dataset's widths
    bad_audio = audio.clone()
    bad_audio[5, 2] = float("inf")
    nan_video = video.clone()
    nan_video[7:] = float("nan")
    cases = {
        "inf": ({"audio": bad_audio, "video": video}, ["'audio'", "frame 5", "non-finite"]),
        "nan": ({"audio": audio, "video": nan_video}, ["'video'", "frame 7", "non-finite"]),
        "empty": ({"audio": audio[:0], "video": video[:0]}, ["holds 0 frames"]),
        "width": (
            {"audio": audio, "video": torch.randn(40, 4)},
            ["'video' has 4 features per frame", "expects 5"],
        ),
    }
    for name, (tensors, fragments) in cases.items():
        feats = tmp_path / f"{name}.safetensors"
        save_file({m: x.contiguous() for m, x in tensors.items()}, str(feats))
        out = tmp_path / f"{name}.csv"
        res = cli("stream", str(run), str(feats), "--out", str(out), "-q")
        one_line_error(res, str(feats), *fragments)
        assert not out.exists()
    big = tmp_path / "big.npz"  # finite in float64, inf in float32
    import numpy as np

    np.savez(big, audio=np.full((3, 6), 1e300), video=np.zeros((3, 5)))
    with pytest.raises(DataError, match=r"'audio' has a non-finite value .* frame 0"):
        read_feature_file(big, ["audio", "video"], {"audio": 6, "video": 5})


# ----------------------------------------------------------------- 5: runs list, missing files


def test_runs_list_shows_a_complete_run_with_missing_files_as_incomplete(cli, tmp_path):
    recipe = write_recipe(tmp_path)
    run = train(recipe)
    (run / "predictions" / "test.safetensors").unlink()
    res = cli("runs", "list", str(tmp_path / "runs"))
    assert res.returncode == 0, res.stderr
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith(str(run)))
    assert "incomplete (files missing: predictions/test.safetensors)" in row, row


# ---------------------------------------------------------- 12: suggested commands are quoted


def test_suggested_commands_quote_the_run_path(cli, tmp_path, monkeypatch):
    import fusionkit.studies.grid as grid

    recipe = write_recipe(tmp_path / "sp ace", epochs=2)
    run = train(recipe)
    with RunDir.open(run) as rd:
        rd.mark_running()  # as if stopped before its results were written

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "train_and_evaluate", interrupted)
    res = cli("resume", str(run))
    assert res.returncode == 130, res.stderr
    assert (
        res.stderr.strip().splitlines()[-1]
        == f"resume with: fusionkit resume {shlex.quote(str(run))}"
    )
    assert shlex.split(res.stderr.strip().splitlines()[-1].split(": ", 1)[1])[2] == str(run)
    with pytest.raises(CheckpointError) as err:
        load_run(run)
    assert f"`fusionkit resume {shlex.quote(str(run))}`" in str(err.value)


# --------------------------------------------------------------------- 13: SIGTERM like Ctrl-C


class _Unhandled(Exception):
    pass


@pytest.fixture
def guarded_sigterm():
    """SIGTERM to this test process raises _Unhandled instead of killing pytest."""

    def guard(signum, frame):
        raise _Unhandled("SIGTERM reached the default path")

    previous = signal.signal(signal.SIGTERM, guard)
    yield guard
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_handler_raises_keyboard_interrupt_and_is_restored(guarded_sigterm):
    from fusionkit.engine.workers import sigterm_as_interrupt

    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs at the next bytecode; this is never reached
    assert signal.getsignal(signal.SIGTERM) is guarded_sigterm


def test_sigterm_during_training_takes_the_ctrl_c_path(cli, tmp_path, monkeypatch, guarded_sigterm):
    import fusionkit.studies.grid as grid

    real = grid.train_and_evaluate
    recipe = write_recipe(tmp_path)

    def terminated_before_epoch_1(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return real(*args, **kw)

    monkeypatch.setattr(grid, "train_and_evaluate", terminated_before_epoch_1)
    res = cli("run", str(recipe))
    assert res.returncode == 143, res.stderr
    assert "interrupted" in res.stderr and "before the first epoch finished" in res.stderr
    assert not (tmp_path / "runs" / "tiny").exists()  # a retry gets the same name
    assert signal.getsignal(signal.SIGTERM) is guarded_sigterm


def test_name_and_out_are_taken_as_text(cli, tmp_path):
    """--name 2024 used to be read as YAML (the number 2024) and refused as not a string."""
    recipe = write_recipe(tmp_path)
    res = cli("run", str(recipe), "--name", "2024", "--out", str(tmp_path / "o ut"), "-q")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o ut" / "2024" / "metrics.json").is_file()


def test_sigterm_during_a_grid_exits_like_ctrl_c_with_143(cli, tmp_path, monkeypatch):
    """A grid killed by SIGTERM (a scheduler's preemption) prints the continue hint and exits
    143; its workers are sent Ctrl-C so that they keep their last finished epoch."""
    import fusionkit.studies.grid as grid
    from fusionkit.engine.workers import Terminated

    recipe = write_recipe(tmp_path)
    raw = yaml.safe_load(recipe.read_text())
    raw["sweep"] = {"training.seed": [0, 1]}
    recipe.write_text(yaml.safe_dump(raw))

    def preempted(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(grid, "run_grid", preempted)
    res = cli("run", str(recipe), "training.lr=0.01", "-j", "2", "-q")
    assert res.returncode == 143
    # the command as given: without its overrides and -j it would continue another grid
    again = f"continue with the same command: fusionkit run {recipe} training.lr=0.01 -j 2 -q"
    assert again in " ".join(res.stderr.split())


def test_a_crash_before_the_first_epoch_leaves_no_folder(cli, tmp_path, monkeypatch):
    """Only fusionkit's own errors used to remove an unstarted run's folder; a crash (out of
    memory, a bug in a plugin) left it behind and the retry got the name `tiny-2`."""
    import fusionkit.studies.grid as grid

    def crash(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(grid, "train_and_evaluate", crash)
    recipe = write_recipe(tmp_path)
    with pytest.raises(RuntimeError, match="simulated"):
        cli("run", str(recipe), "-q")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_window_far_longer_than_every_video_gets_a_note(cli, tmp_path):
    """data.window=100000 (within its bound) padded every video to that length with no word,
    80 s instead of 3 s for the quickstart."""
    raw = yaml.safe_load(write_recipe(tmp_path).read_text())
    raw["data"].update(window=2000, hop=2000)
    recipe = tmp_path / "long.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = cli("run", str(recipe))
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    assert "note: data.window 2,000 is more than twice the longest video" in text
