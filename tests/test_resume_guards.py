"""Resume guards: what a resumed run reads back and checks, and the run-folder bookkeeping
around it.

Pinned here: the CPU threads a resume takes (capped at the cores there are now), how a
leftover ``model.next`` is rolled forward or back and a stray best-weights file refused, what
``fit(resume=True)`` restores (the optimizer's graph mode, the run's normalization statistics,
the progress count, ``history.csv``), which damaged training states and run markers are
refused, and the run folder's lock, completion record, clean-up and resume advice.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shlex
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fusionkit.engine.runs as runs_mod
import fusionkit.engine.train as train_mod
from fusionkit.core.errors import CheckpointError
from fusionkit.core.recipe import Recipe, validate_recipe
from fusionkit.core.registry import Registry
from fusionkit.engine.checkpoint import TrainState, load_state, read_train_state, save_state
from fusionkit.engine.files import tensors_metadata
from fusionkit.engine.runs import (
    BEST_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    MARKER_FILE,
    METRICS_FILE,
    NORMALIZATION_FILE,
    STATE_FILE,
    RecipeChanged,
    RunDir,
)
from fusionkit.engine.session import build_session
from fusionkit.engine.train import ResumeRefused, Trainer, recover_best_weights, resumed_threads
from tests.conftest import tiny_recipe

NEXT_FILE = "model.next.safetensors"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def small_state(path: Path, rng: dict[str, torch.Tensor] | None = None, **fields: Any) -> None:
    """A training state of a one-layer model after one Adam step, with ``fields`` set."""
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")
    state = TrainState(recipe_sha256="r", **fields)
    save_state(
        path, model, opt, sched, state, {"cpu": torch.get_rng_state()} if rng is None else rng
    )


def fresh_objects() -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max")


def recipe(tmp_path: Path, registry: Registry, **training: Any) -> Recipe:
    return validate_recipe(tiny_recipe(tmp_path, **training), "r.yaml", registry)


def zscored(tmp_path: Path, registry: Registry, **training: Any) -> Recipe:
    raw = tiny_recipe(tmp_path, **training)
    raw["data"]["normalize"] = "zscore"
    return validate_recipe(raw, "r.yaml", registry)


def stopped_after(rc: Recipe, registry: Registry, epoch: int) -> RunDir:
    """A run of ``rc`` killed right after ``epoch`` committed, reopened and locked."""

    def stop(e: int, record: dict[str, Any]) -> None:
        if e == epoch:
            raise KeyboardInterrupt

    run = RunDir.create(rc, registry)
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_session(rc, registry), run, on_epoch_end=stop).fit()
    run.unlock()
    return RunDir.open(run.path).lock()


def rewrite_state_meta(path: Path, key: str, value: Any) -> None:
    meta = tensors_metadata(path)
    meta[key] = json.dumps(value)
    save_file(load_file(str(path)), str(path), metadata=meta)


# ----------------------------------------------------------------------------- threads


@pytest.mark.parametrize(("recorded", "cores", "expected"), [(3, 2, 2), (3, 8, 3), (1, 8, 1)])
def test_resumed_threads_are_those_of_the_first_epoch_capped_at_the_cores_now(
    tmp_path, monkeypatch, recorded, cores, expected
):
    """A resume trains with the threads its first epoch had, but never more than the cores
    this process may use now."""
    small_state(tmp_path / STATE_FILE, cpu_threads=recorded)
    monkeypatch.setattr(train_mod, "available_cores", lambda: cores)
    assert resumed_threads(tmp_path) == expected


def test_resumed_threads_of_a_damaged_missing_or_silent_state_are_none(tmp_path):
    """No readable record of the threads means no choice: a damaged state is left to the
    resume itself to report, not raised here."""
    assert resumed_threads(tmp_path) is None  # no state yet
    small_state(tmp_path / STATE_FILE)  # a state of an older version: cpu_threads absent
    assert resumed_threads(tmp_path) is None
    (tmp_path / STATE_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    assert resumed_threads(tmp_path) is None


# ----------------------------------------------------------------------------- best weights


def test_a_committed_leftover_best_file_is_rolled_forward(tmp_path):
    """A kill after the state named the new best weights but before their rename: the
    leftover becomes ``model.safetensors``."""
    old, new = b"weights of epoch 1", b"weights of epoch 2"
    (tmp_path / BEST_FILE).write_bytes(old)
    (tmp_path / NEXT_FILE).write_bytes(new)
    state = TrainState(
        recipe_sha256="r", epochs_done=2, best_epoch=2, best_weights_sha256=sha256(new)
    )
    recover_best_weights(RunDir(tmp_path), state)
    assert (tmp_path / BEST_FILE).read_bytes() == new
    assert not (tmp_path / NEXT_FILE).exists()


def test_an_uncommitted_leftover_best_file_is_deleted_and_the_best_kept(tmp_path):
    """A kill before the state named the new weights: the leftover is removed and the
    committed best file stays as it is."""
    old = b"weights of epoch 1"
    (tmp_path / BEST_FILE).write_bytes(old)
    (tmp_path / NEXT_FILE).write_bytes(b"half-written weights of epoch 2")
    state = TrainState(
        recipe_sha256="r", epochs_done=1, best_epoch=1, best_weights_sha256=sha256(old)
    )
    recover_best_weights(RunDir(tmp_path), state)
    assert (tmp_path / BEST_FILE).read_bytes() == old
    assert not (tmp_path / NEXT_FILE).exists()


def test_best_weights_without_a_state_that_names_them_are_refused(tmp_path):
    """With no best epoch recorded, a ``model.safetensors`` does not belong to the run; a
    leftover ``model.next`` alone is simply removed."""
    (tmp_path / NEXT_FILE).write_bytes(b"never committed")
    recover_best_weights(RunDir(tmp_path), None)
    assert not (tmp_path / NEXT_FILE).exists()
    (tmp_path / BEST_FILE).write_bytes(b"weights of another run")
    with pytest.raises(CheckpointError, match=r"state\.safetensors is missing or not a regular"):
        recover_best_weights(RunDir(tmp_path), None)  # the state itself is what is missing
    with pytest.raises(CheckpointError, match="the training state records no best epoch"):
        recover_best_weights(RunDir(tmp_path), TrainState(recipe_sha256="r", epochs_done=1))


def test_resuming_a_run_without_a_state_refuses_a_stray_best_file(tmp_path, registry):
    """A run with no finished epoch starts from scratch, but not over a weights file that
    no training state accounts for."""
    rc = recipe(tmp_path, registry, epochs=1)
    with RunDir.create(rc, registry) as run:
        (run / BEST_FILE).write_bytes(b"weights of another run")
        with pytest.raises(
            CheckpointError, match=r"model\.safetensors exists but .*state\.safetensors is missing"
        ):
            Trainer(build_session(rc, registry), run).restore()


# ----------------------------------------------------------------------------- fit on resume


def test_restore_puts_the_optimizer_in_this_process_graph_mode(tmp_path, registry):
    """A state saved by a CUDA-graphs run (capturable Adam) resumes without graphs with a
    non-capturable optimizer: the setting is this run's, not the saved one."""
    rc = recipe(tmp_path, registry, epochs=2)
    with RunDir.create(rc, registry) as run:
        first = Trainer(build_session(rc, registry), run)
        for group in first.optimizer.param_groups:
            group["capturable"] = True
        state = TrainState(recipe_sha256=rc.training_sha256(), world_size=1)
        rng = {"cpu": torch.get_rng_state()}
        save_state(run / STATE_FILE, first.model, first.optimizer, first.scheduler, state, rng)
        again = Trainer(build_session(rc, registry), run)
        again.restore()
    assert [g["capturable"] for g in again.optimizer.param_groups] == [False]


def test_a_z_scored_run_resumed_before_its_first_epoch_trains_from_scratch(tmp_path, registry):
    """``resume`` of a run killed before epoch 1 has no statistics file yet: it fits and
    saves them, as a new run does, instead of asking for the missing file."""
    rc = zscored(tmp_path, registry, epochs=1)
    with RunDir.create(rc, registry) as run:
        out = Trainer(build_session(rc, registry), run).fit(resume=True)
    assert out.best_epoch == 1
    assert (run / NORMALIZATION_FILE).is_file()


def test_a_resumed_run_z_scores_with_its_saved_statistics(tmp_path, registry):
    """The statistics a run started with are read back from its file, never refit: statistics
    that no longer match what the finished epochs saw make the resume refuse (the z-scored
    data differ), and the run is left as it was."""
    rc = zscored(tmp_path, registry, epochs=2)
    run = stopped_after(rc, registry, 1)
    path = run / NORMALIZATION_FILE
    saved = load_file(str(path))
    assert sorted(saved) == ["mean/audio", "mean/video", "std/audio", "std/video"]
    shifted = {k: v + 0.5 if k.startswith("mean/") else v for k, v in saved.items()}
    save_file(shifted, str(path), metadata=tensors_metadata(path))
    before = (run / STATE_FILE).read_bytes()
    with pytest.raises(ResumeRefused, match="differ from the data its 1 finished epoch") as err:
        Trainer(build_session(rc, registry), run).fit(resume=True)
    assert "or its normalization.safetensors" in str(err.value)  # the file edited is named
    run.unlock()
    assert (run / STATE_FILE).read_bytes() == before
    assert load_file(str(path))["mean/audio"].equal(shifted["mean/audio"])


class Recorder:
    """A progress display that keeps what it was told."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, int, int]] = []
        self.epochs: list[int] = []

    def start(self, epochs: int, done: int, steps: int) -> None:
        self.starts.append((epochs, done, steps))

    def step(self) -> None:
        pass

    def epoch(self, record: dict[str, Any], improved: bool) -> None:
        self.epochs.append(record["epoch"])

    def close(self) -> None:
        pass


def test_a_resumed_run_tells_progress_the_epochs_already_done(tmp_path, registry):
    """Progress (epoch count, time left) of a resumed run starts after its finished
    epochs."""
    rc = recipe(tmp_path, registry, epochs=3)
    run = stopped_after(rc, registry, 2)
    seen = Recorder()
    Trainer(build_session(rc, registry), run, progress=seen).fit(resume=True)
    run.unlock()
    assert [s[:2] for s in seen.starts] == [(3, 2)] and seen.starts[0][2] > 0
    assert seen.epochs == [3]


def test_resume_after_the_last_epoch_rewrites_a_lost_history(tmp_path, registry):
    """A kill after the last epoch's state but before ``history.csv``: the resume trains
    nothing and writes the history from the state, one row per epoch."""
    rc = recipe(tmp_path, registry, epochs=2)
    run = stopped_after(rc, registry, 2)
    (run / HISTORY_FILE).unlink()
    out = Trainer(build_session(rc, registry), run).fit(resume=True)
    run.unlock()
    rows = list(csv.DictReader((run / HISTORY_FILE).read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [float(r["val_ccc_mean"]) for r in rows] == pytest.approx(
        [h["val_ccc_mean"] for h in out.history]
    )


# ----------------------------------------------------------------------------- damaged states


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epochs_done", -1),
        ("best_epoch", 0),
        ("bad_epochs", -1),
        ("train_seconds", -1.0),
        ("cpu_threads", 0),
        ("world_size", 0),
        ("epochz", 1),  # a key this version does not know
    ],
)
def test_a_training_state_with_an_impossible_value_is_refused_naming_the_key(tmp_path, key, value):
    """Counts below their minimum and unknown keys are refused with the file and the
    ``trainer.<key>`` path, both when the state is read alone and on resume."""
    path = tmp_path / STATE_FILE
    small_state(path, epochs_done=1)
    trainer = json.loads(tensors_metadata(path)["trainer"])
    rewrite_state_meta(path, "trainer", {**trainer, key: value})
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.*trainer\.{key}"):
        read_train_state(path)
    with pytest.raises(CheckpointError, match=rf"trainer\.{key}"):
        load_state(path, *fresh_objects())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("optimizer", {"param_groups": []}),  # no 'scalars'
        ("optimizer", [1, 2]),
        ("scheduler", [1, 2]),
        ("scheduler", "plateau"),
    ],
)
def test_damaged_optimizer_or_scheduler_state_is_a_checkpoint_error(tmp_path, key, value):
    """Optimizer or scheduler metadata of the wrong shape ends in a CheckpointError naming
    the file (one line), not an exception from torch."""
    path = tmp_path / STATE_FILE
    small_state(path, epochs_done=1)
    rewrite_state_meta(path, key, value)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_state(path, *fresh_objects())


@pytest.mark.parametrize(
    "rng", [{"cpu": torch.zeros(10, dtype=torch.uint8)}, {}], ids=["damaged", "missing"]
)
def test_a_state_with_a_damaged_or_missing_rng_is_refused_naming_the_file(tmp_path, registry, rng):
    """The RNG state is part of what makes resume exact: without a usable one the resume is
    refused as a damaged run file."""
    rc = recipe(tmp_path, registry, epochs=2)
    with RunDir.create(rc, registry) as run:
        trainer = Trainer(build_session(rc, registry), run)
        state = TrainState(recipe_sha256=rc.training_sha256(), epochs_done=1, world_size=1)
        save_state(
            run / STATE_FILE, trainer.model, trainer.optimizer, trainer.scheduler, state, rng
        )
        with pytest.raises(CheckpointError, match=r"state\.safetensors"):
            Trainer(build_session(rc, registry), run).restore()


# ----------------------------------------------------------------------------- run folders


def test_a_run_folder_that_is_gone_is_not_found_not_foreign(tmp_path):
    """Opening a path that does not exist says so, rather than calling it a folder fusionkit
    did not create."""
    with pytest.raises(CheckpointError, match="run directory not found"):
        RunDir.open(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "marker",
    [
        "{not json",
        json.dumps({"created_by": "someone else", "recipe_sha256": "x"}),
        json.dumps({"recipe_sha256": "x", "status": "finished"}),
        json.dumps({"status": "running"}),
    ],
    ids=["not-json", "not-fusionkit", "unknown-status", "no-hash"],
)
def test_a_run_with_a_damaged_marker_is_refused_when_opened(tmp_path, marker):
    """``run.json`` is validated when a run is opened (its maker, status and hash), so a
    damaged one stops a resume before anything is written."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / MARKER_FILE).write_text(marker)
    with pytest.raises(CheckpointError, match=r"run\.json"):
        RunDir.open(tmp_path / "r")


def test_the_lock_file_names_only_the_current_holder(tmp_path, registry):
    """Taking the lock replaces what an earlier holder wrote into ``.lock``: the file names
    this process and nothing else."""
    rc = recipe(tmp_path, registry)
    run = RunDir.create(rc, registry)
    run.unlock()
    (run / LOCK_FILE).write_text("pid 1234567890 on a-much-longer-host-name since 00:00:00 " * 3)
    with RunDir.open(run.path):
        text = (run / LOCK_FILE).read_text()
    pattern = rf"pid {os.getpid()} on {re.escape(socket.gethostname())} since \d\d:\d\d:\d\d"
    assert re.fullmatch(pattern, text), text


def test_the_lock_file_is_readable_by_other_users(tmp_path, registry):
    """``.lock`` is made like any file (0644 under umask 022), so that other users listing
    runs can read who holds one."""
    old = os.umask(0o022)
    try:
        run = RunDir.create(recipe(tmp_path, registry), registry)
    finally:
        os.umask(old)
    run.unlock()
    assert stat.S_IMODE((run / LOCK_FILE).stat().st_mode) == 0o644


def test_holder_names_another_holder_but_not_oneself(tmp_path, registry):
    """``holder()`` reports who else holds the lock; the holder itself gets ``None``."""
    rc = recipe(tmp_path, registry)
    with RunDir.create(rc, registry) as run:
        assert run.holder() is None
        assert f"pid {os.getpid()}" in (RunDir(run.path).holder() or "")
    assert RunDir(run.path).holder() is None


def completed(tmp_path: Path, registry: Registry) -> tuple[Recipe, RunDir]:
    """A run marked complete with one result file (no training), locked."""
    rc = recipe(tmp_path, registry)
    run = RunDir.create(rc, registry)
    (run / METRICS_FILE).write_text('{"splits": {}}')
    run.mark_complete([METRICS_FILE])
    return rc, run


def test_completion_records_each_file_digest_and_the_time(tmp_path, registry):
    """``mark_complete`` stores the SHA-256 of every listed file and when it finished;
    ``mark_running`` forgets both."""
    before = time.time()
    _, run = completed(tmp_path, registry)
    marker = json.loads((run / MARKER_FILE).read_text())
    assert marker["status"] == "complete"
    assert marker["files"] == {METRICS_FILE: sha256((run / METRICS_FILE).read_bytes())}
    stamp = time.mktime(time.strptime(marker["completed"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert before - 2 <= stamp <= time.time() + 2
    run.mark_running()
    marker = json.loads((run / MARKER_FILE).read_text())
    assert (marker["status"], marker["completed"], marker["files"]) == ("running", None, {})
    run.unlock()


def test_a_complete_run_missing_a_listed_file_is_not_complete(tmp_path, registry):
    """A run is complete only while every file ``run.json`` lists is there; a damaged
    ``run.json`` reads as not complete rather than raising."""
    _, run = completed(tmp_path, registry)
    assert run.is_complete() and run.missing_files() == []
    (run / METRICS_FILE).unlink()
    assert not run.is_complete()
    assert run.missing_files() == [METRICS_FILE]
    (run / MARKER_FILE).write_text("{damaged")
    assert run.is_complete() is False
    run.unlock()


def test_resume_advice_depends_on_whether_the_run_finished(tmp_path, registry):
    """Another recipe on an unfinished run is told to resume it as it was (the command with
    the quoted path); on a finished run, to start a new one."""
    rc = recipe(tmp_path, registry)
    other = recipe(tmp_path, registry, lr=1e-3)
    with RunDir.create(rc, registry) as run:
        with pytest.raises(RecipeChanged) as err:
            run.check_same_training(other, registry)
        assert f"`fusionkit resume {shlex.quote(str(run.path))}`" in str(err.value)
        assert "training.lr" in str(err.value)
        (run / METRICS_FILE).write_text("{}")
        run.mark_complete([METRICS_FILE])
        with pytest.raises(RecipeChanged) as err:
            run.check_same_training(other, registry)
    assert "start a new run (without --resume)" in str(err.value)
    assert "fusionkit resume" not in str(err.value)


def test_an_unstarted_run_is_removed_with_temporary_leftovers_and_its_lock(tmp_path, registry):
    """A run that failed before epoch 1 is deleted even with leftovers of an interrupted
    write, its lock is released (no file stays open), and a second call is a no-op."""
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.is_dir():
        pytest.skip("needs /proc to count open files")
    rc = recipe(tmp_path, registry)
    open_before = len(os.listdir(fd_dir))
    run = RunDir.create(rc, registry)
    (run / ".recipe.yaml.x1y2.tmp").write_text("half")
    assert run.remove_if_unstarted() is True
    assert not run.path.exists()
    assert len(os.listdir(fd_dir)) == open_before
    assert run.remove_if_unstarted() is False
    assert RunDir.create(rc, registry).path.name == "tiny"  # a retry gets the same name


def test_a_run_folder_whose_first_files_fail_to_write_is_removed(tmp_path, registry, monkeypatch):
    """When ``recipe.yaml`` cannot be written, the new folder is removed, so that a retry
    gets the same name."""
    rc = recipe(tmp_path, registry)

    def full(*args: Any, **kwargs: Any) -> None:
        raise CheckpointError("could not write recipe.yaml: No space left on device")

    monkeypatch.setattr(runs_mod, "atomic_write_text", full)
    with pytest.raises(CheckpointError, match="No space left"):
        RunDir.create(rc, registry)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert RunDir.create(rc, registry).path.name == "tiny"


def test_a_run_folder_that_cannot_be_made_is_an_error_at_once(tmp_path, registry, monkeypatch):
    """Only a taken name moves on to ``-2``; any other reason the folder cannot be made (no
    permission, a full disk) is reported with its cause."""
    rc = recipe(tmp_path, registry)
    real = Path.mkdir
    tries: list[Path] = []

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.parent == tmp_path:
            tries.append(self)
            raise OSError(errno.EACCES, "Permission denied")
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(CheckpointError, match=r"cannot create .*tiny: Permission denied"):
        RunDir.create(rc, registry)
    assert tries == [tmp_path / "tiny"]
