"""Grids run by more than one process: one process per grid folder (a second one is refused,
naming the first), the last point of a ``-j N`` grid trains with a worker's threads, a missing
Ray is found before anything is written, and a worker stopped by Ctrl-C exits quietly."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from rich.console import Console

import fusionkit.engine.session as session_mod
import fusionkit.studies.grid as grid_mod
from fusionkit.core.errors import CheckpointError, FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.runs import LOCK_FILE, RunDir
from fusionkit.studies.grid import run_grid
from fusionkit.studies.scan import scan_runs
from tests.conftest import REPO, tiny_recipe


def tiny_grid(tmp_path, seeds=(0, 1)) -> dict:
    raw = tiny_recipe(tmp_path / "runs", epochs=1)
    raw["data"]["params"]["videos"] = 1
    raw["sweep"] = {"training.seed": list(seeds)}
    return raw


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- one process


def test_a_second_process_on_a_running_grid_is_refused_at_once_and_writes_nothing(
    tmp_path, registry, cli
):
    raw = tiny_grid(tmp_path)
    run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    gdir = tmp_path / "runs" / "tiny"
    # another process runs the grid (a lock is per open file: this one conflicts like a
    # second process would); its points are half done
    held = RunDir(gdir).lock()
    try:
        before = files(gdir)
        raw["sweep"]["training.seed"] = [0, 1, 2]  # one more point to run
        with pytest.raises(CheckpointError) as err:
            run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
        text = str(err.value)
        assert re.fullmatch(
            rf"{re.escape(str(gdir))} is in use by pid {os.getpid()} on \S+ since "
            r"\d\d:\d\d:\d\d; wait for it to finish or stop it",
            text,
        ), text
        assert files(gdir) == before  # grid.json, the lock's owner line and every run as they were
        assert not (gdir / "seed-2").exists()
        # from the command line: one line, no grid header, exit 2
        recipe = tmp_path / "grid.yaml"
        recipe.write_text(yaml.safe_dump(raw))
        code, out, err_text = cli("run", recipe)
        assert code == 2 and out == ""
        assert err_text == f"error: {text}"
        assert files(gdir) == before
    finally:
        held.unlock()
    # once the first process is gone, the same command continues the grid
    record = run_grid(validate_recipe(raw, "grid.yaml", registry), registry=registry)
    assert [r["status"] for r in record["runs"].values()] == ["done"] * 3


def test_the_grid_lock_is_released_when_the_grid_stops(tmp_path, registry, monkeypatch):
    rc = validate_recipe(tiny_grid(tmp_path), "grid.yaml", registry)
    gdir = tmp_path / "runs" / "tiny"

    def interrupted(*a, **k):
        assert RunDir(gdir).holder() is not None  # held while points run
        raise KeyboardInterrupt

    monkeypatch.setattr(grid_mod, "_run_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(rc, registry=registry)
    assert RunDir(gdir).holder() is None


def test_the_lock_file_does_not_make_the_grid_folder_look_foreign(tmp_path, registry):
    gdir = tmp_path / "runs" / "tiny"
    gdir.mkdir(parents=True)
    (gdir / LOCK_FILE).write_text("pid 1 on host since 00:00:00")  # a grid stopped very early
    rc = validate_recipe(tiny_grid(tmp_path), "grid.yaml", registry)
    record = run_grid(rc, registry=registry)
    assert [r["status"] for r in record["runs"].values()] == ["done", "done"]
    assert record["stale"] == []
    record = run_grid(rc, registry=registry)  # again, with the lock file and grid.json there
    assert record["stale"] == []
    scan = scan_runs([tmp_path / "runs"])
    assert [r.run_dir.name for r in scan.runs] == ["seed-0", "seed-1"]
    assert scan.excluded == [] and scan.notes == []
    # anything else in a folder without grid.json is still refused
    (gdir / "grid.json").unlink()
    (gdir / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="was not made by a fusionkit grid"):
        run_grid(rc, registry=registry)


def test_resume_on_a_grid_folder_names_a_run_and_the_way_to_continue(tmp_path, registry, cli):
    """It said the folder was not made by fusionkit, which it was."""
    rc = validate_recipe(tiny_grid(tmp_path), "grid.yaml", registry)
    run_grid(rc, registry=registry)
    gdir = tmp_path / "runs" / "tiny"
    code, _, err = cli("resume", gdir)
    assert code == 2
    assert err.strip() == (
        f"error: {gdir} is a grid folder (grid.json), not a run: name one of its runs, e.g. "
        f"{gdir / 'seed-0'} (to continue the grid itself, run again the `fusionkit run` "
        "command that made it: finished points are kept)"
    )


# ----------------------------------------------------------------------------- threads


def test_the_last_point_of_a_parallel_grid_trains_with_a_workers_threads(
    tmp_path, registry, monkeypatch
):
    """-j 2 on 4 cores: every point trains with 2 threads, also the one left alone."""
    for mod in (grid_mod, session_mod):
        monkeypatch.setattr(mod, "available_cores", lambda: 4)
    raw = tiny_grid(tmp_path, seeds=(3,))  # one point to run: it trains in this process
    out = io.StringIO()
    try:
        run_grid(
            validate_recipe(raw, "grid.yaml", registry),
            workers=2,
            console=Console(file=out, width=300, color_system=None),
            registry=registry,
        )
    finally:
        torch.set_num_threads(1)
    assert "1 to run with 2 worker(s), 2 thread(s) each" in out.getvalue()
    metrics = json.loads((tmp_path / "runs" / "tiny" / "seed-3" / "metrics.json").read_text())
    assert metrics["cpu_threads"] == 2


# ----------------------------------------------------------------------------- Ray


def test_a_missing_ray_is_reported_before_the_grid_folder_is_made(tmp_path, registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    rc = validate_recipe(tiny_grid(tmp_path), "grid.yaml", registry)
    with pytest.raises(FusionkitError, match=r"--executor ray needs Ray: pip install"):
        run_grid(rc, registry=registry, executor="ray")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- workers


WORKER = textwrap.dedent(
    """
    import atexit, os, signal, time
    from fusionkit.studies import grid

    class Pipe:
        def recv(self):
            return "a recipe"
        def send(self, outcome):
            print("sent", outcome, flush=True)

    def interrupted(recipe, threads):
        raise KeyboardInterrupt  # Ctrl-C while training

    grid._run_point = interrupted
    grid.die_with_parent = lambda: None
    # a second Ctrl-C arrives while the worker shuts down (atexit runs last-registered first)
    atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.3)))
    grid._serve(Pipe(), 1)
    """
)


def run_worker_script(code: str, cwd) -> subprocess.CompletedProcess:
    """Run ``code`` (a grid worker scenario) in a fresh Python of this checkout, one thread."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_a_worker_stopped_by_ctrl_c_reports_and_exits_quietly(tmp_path):
    done = run_worker_script(WORKER, tmp_path)
    assert done.stdout == "sent ('interrupted', 'interrupted')\n"
    assert done.stderr == "" and done.returncode == 0
