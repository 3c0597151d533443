"""Grid points dispatched to a local Ray instance give the runs a local executor gives."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import hears_ctrl_c, tiny_plugin_env, tiny_recipe

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'fusionkit[ray]'")


def test_ray_executor_runs_the_grid_like_the_local_one(tmp_path):
    env = tiny_plugin_env(tmp_path, RAY_ADDRESS="")
    raw = tiny_recipe(tmp_path / "runs", epochs=2)
    raw["training"]["num_threads"] = 1
    raw["sweep"] = {"training.seed": [0, 1], "model.encoders.audio.params.dim": [8, 0]}
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "fusionkit", "run", str(recipe), "-q"]
    # dim=0 is rejected by validation before any run starts, for both executors
    bad = subprocess.run(
        [*cmd, "--executor", "ray"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "model.encoders.audio.params.dim" in bad.stderr
    raw["sweep"] = {"training.seed": [0, 1]}
    recipe.write_text(yaml.safe_dump(raw))
    ray_run = subprocess.run(
        [*cmd, "--executor", "ray", "output.name=viaray"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    local = subprocess.run(
        [*cmd, "output.name=local"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    grid = json.loads((tmp_path / "runs" / "viaray" / "grid.json").read_text())
    assert {r["status"] for r in grid["runs"].values()} == {"done"}
    for tag in grid["runs"]:
        a = json.loads((tmp_path / "runs" / "viaray" / tag / "metrics.json").read_text())
        b = json.loads((tmp_path / "runs" / "local" / tag / "metrics.json").read_text())
        assert a["splits"] == b["splits"]


def _interrupted_ray_grid(folder, sig) -> tuple[int, str, object] | None:
    """A two-seed Ray grid in ``folder``, sent ``sig`` once a point finished an epoch: its
    exit status, standard error and grid folder; None when it did not stop within 60 s."""
    folder.mkdir()
    env = tiny_plugin_env(folder, RAY_ADDRESS="", OMP_NUM_THREADS="1")
    raw = tiny_recipe(folder / "runs", epochs=10_000, early_stopping=10_000)
    raw["data"]["params"]["videos"] = 1
    raw["training"]["num_threads"] = 1
    raw["sweep"] = {"training.seed": [0, 1]}
    recipe = folder / "grid.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    gdir = folder / "runs" / "tiny"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusionkit", "run", str(recipe), "-q", "--executor", "ray"],
        env=env,
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hears_ctrl_c,
    )
    try:
        deadline = time.monotonic() + 60
        while not any(gdir.glob("*/history.csv")):  # a point finished an epoch
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no epoch finished in 60 s"
            time.sleep(0.2)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err, gdir


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_ctrl_c_and_sigterm_stop_a_ray_grid_like_a_local_one(tmp_path, sig, code):
    """The running point keeps its last finished epoch, the others stay pending, the usual
    interrupt line is printed, and the exit status is the signal's (not a Ray crash dump)."""
    got = _interrupted_ray_grid(tmp_path / "grid", sig)
    assert got is not None, f"the Ray grid did not stop on {sig.name} within 60 s"
    returncode, err, gdir = got
    assert returncode == code, err[-3000:]
    assert "interrupted: finished points are kept" in err
    assert "received" not in err and "Traceback" not in err  # no Ray C++ dump
    grid = json.loads((gdir / "grid.json").read_text())
    assert {r["status"] for r in grid["runs"].values()} == {"pending"}
    started = [d for d in gdir.iterdir() if (d / "history.csv").is_file()]
    for run in started:
        assert json.loads((run / "run.json").read_text())["status"] == "running"
        assert (run / "state.safetensors").is_file()  # resumable
