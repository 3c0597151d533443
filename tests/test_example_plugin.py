"""The example third-party package (examples/fusionkit-xattn) used like a user would use it.

It must be pip-installed (the CI command does: ``pip install -e '.[test]' -e
examples/fusionkit-xattn``); otherwise these tests are skipped.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_distribution

DIST = "fusionkit-xattn"
EXAMPLE = REPO / "examples" / "fusionkit-xattn"


def _installed() -> bool:
    try:
        md.distribution(DIST)
    except md.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _installed(),
    reason=f"{DIST} is not installed; run: python -m pip install -e examples/fusionkit-xattn",
)

BROKEN = "raise ImportError('fk_broken_demo needs the package `missing_dependency`')\n"

# A small, fast version of the example recipe (2 epochs, a few short videos).
SMALL = [
    "training.epochs=2",
    "training.batch_size=4",
    "data.window=48",
    "data.hop=32",
    "data.params.num_train=4",
    "data.params.num_val=2",
    "data.params.num_test=2",
    "data.params.min_frames=60",
    "data.params.max_frames=120",
    "model.encoders.audio.params.channels=[8,8]",
    "model.encoders.video.params.channels=[8,8]",
    "model.fusion.params.dim=16",
    "model.fusion.params.window=8",
    "model.gate.params.hidden=8",
    "model.head.params.hidden=16",
]


def fk(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusionkit", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def broken_env(tmp_path: Path) -> dict[str, str]:
    """The environment plus a deliberately broken plugin distribution beside the example."""
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "fk-broken-demo", "fk_broken_demo", BROKEN)
    env = {k: v for k, v in os.environ.items() if k != "FUSIONKIT_STRICT_PLUGINS"}
    return dict(env, PYTHONPATH=f"{site}{os.pathsep}{REPO}")


def test_listed_with_version_components_and_requirement(broken_env, tmp_path):
    proc = fk(["plugins", "list", "--json"], broken_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    dists = {d["name"]: d for d in data["distributions"]}
    xattn = dists[DIST]
    assert xattn["version"] == md.version(DIST)
    assert "fusionkit" in xattn["requires_fusionkit"]
    assert [(c["kind"], c["name"]) for c in xattn["components"]] == [
        ("fusion", "xattn"),
        ("gate", "xattn_gated"),
    ]
    assert [f["distribution"] for f in data["failures"]] == ["fk-broken-demo"]
    assert "missing_dependency" in dists["fk-broken-demo"]["failures"][0]["error"]
    text = fk(["plugins", "list"], broken_env, tmp_path)
    assert DIST in text.stdout and "xattn_gated" in text.stdout
    assert "not loaded" in text.stdout and "fk-broken-demo" in text.stdout


def test_plugins_check_passes(tmp_path):
    proc = fk(["plugins", "check", DIST], dict(os.environ), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 2 components conform" in proc.stdout


def test_recipe_trains_next_to_builtins_despite_a_broken_plugin(broken_env, tmp_path):
    recipe = EXAMPLE / "recipes" / "xattn.yaml"
    args = ["run", str(recipe), *SMALL, f"output.dir={tmp_path / 'runs'}", "-q"]
    proc = fk(args, broken_env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, proc.stderr
    assert "fk-broken-demo" in warnings[0] and "missing_dependency" in warnings[0]
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "xattn"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"val", "test"}
    used = {
        (c["kind"], c["name"]): c["distribution"]
        for c in json.loads((run_dir / "run.json").read_text())["components"]
    }
    assert used[("fusion", "xattn")] == used[("gate", "xattn_gated")] == DIST
    assert used[("encoder", "tcn")] == used[("head", "regression")] == "fusionkit"


def test_strict_makes_the_broken_plugin_an_error(broken_env, tmp_path):
    recipe = EXAMPLE / "recipes" / "xattn.yaml"
    proc = fk(["run", str(recipe), *SMALL, "--strict"], broken_env, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: plugin 'fk_broken_demo' from distribution 'fk-broken-demo'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
    env = dict(broken_env, FUSIONKIT_STRICT_PLUGINS="1")
    listed = fk(["plugins", "list"], env, tmp_path)
    assert listed.returncode == 2 and "fk-broken-demo" in listed.stderr


def test_recipe_strict_plugins_setting_fails_on_a_broken_plugin(tmp_path):
    """`strict_plugins: true` in a recipe turns the tolerant warning into an error."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, make_distribution

    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "fk-broken", "fk_broken", "raise ImportError('no such thing')\n")
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}")
    base = [
        sys.executable,
        "-m",
        "fusionkit",
        "recipe",
        "validate",
        str(REPO / "recipes" / "quickstart.yaml"),
    ]
    ok = subprocess.run(base, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "fk-broken" in ok.stderr  # tolerant: one warning
    run = [
        sys.executable,
        "-m",
        "fusionkit",
        "run",
        str(REPO / "recipes" / "quickstart.yaml"),
        "strict_plugins=true",
        "training.epochs=1",
        "-q",
    ]
    res = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "fk-broken" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()
