"""Grid points dispatched to a local Ray instance give the runs a local executor gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_plugin_env, tiny_recipe

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
