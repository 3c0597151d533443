"""The CLI as a user meets it: Ctrl-C then --resume, eval reproducibility, recipe commands."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, hears_ctrl_c, tiny_plugin_env, tiny_recipe


@pytest.fixture
def cli_env(tmp_path):
    env = tiny_plugin_env(tmp_path, PYTHONUNBUFFERED="1")
    recipe = tmp_path / "tiny.yaml"
    raw = tiny_recipe(tmp_path / "runs", epochs=12)
    raw["training"]["early_stopping"] = 50
    recipe.write_text(yaml.safe_dump(raw))
    return env, recipe


def fk(args, env, cwd, **kw):
    return subprocess.run(
        [sys.executable, "-m", "fusionkit", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def test_ctrl_c_then_resume_matches_uninterrupted_run(cli_env, tmp_path):
    env, recipe = cli_env
    ref = fk(["run", str(recipe), "output.name=ref", "-q"], env, tmp_path)
    assert ref.returncode == 0, ref.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusionkit", "run", str(recipe), "output.name=cut", "-q"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=hears_ctrl_c,
    )
    state = tmp_path / "runs" / "cut" / "state.safetensors"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    hint = err.strip().splitlines()[-1]  # names the exact run directory, on one line
    assert hint == f"resume with: fusionkit resume {tmp_path / 'runs' / 'cut'}", err
    assert not (tmp_path / "runs" / "cut" / "metrics.json").exists()
    res = fk([*hint.removeprefix("resume with: fusionkit ").split(), "-q"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    a = json.loads((tmp_path / "runs" / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "runs" / "cut" / "metrics.json").read_text())
    assert a["splits"] == b["splits"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_a_closed_stdout_does_not_stop_the_run(cli_env, tmp_path):
    """`fusionkit run ... | head -1`: rich's default ended the run with status 1 and no word
    once the reader was gone, leaving an interrupted run folder."""
    env, recipe = cli_env
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusionkit", "run", str(recipe), "training.epochs=2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("fusionkit run tiny")
    proc.stdout.close()  # the reader goes away, as `head -1` does
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=300) == 0, err
    assert "warning: standard output was closed" in err and "Traceback" not in err
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    assert (run_dir / "metrics.json").is_file()


def test_a_closed_stdout_ends_a_stream_and_not_a_report(cli_env, tmp_path, registry):
    """`stream` prints its product: a closed reader ends it (it used to go on through every
    frame, at the frame rate with --realtime). `report` has written its files by then: it
    goes on, where it used to end with status 1 and no word."""
    from tests.conftest import tiny_stream_run

    env, _ = cli_env
    run, feats, _ = tiny_stream_run(tmp_path, registry)
    cmd = [sys.executable, "-m", "fusionkit", "stream", str(run), str(feats), "--realtime"]
    proc = subprocess.Popen(
        [*cmd, "--fps", "5"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("frame,seconds,")
    assert proc.stdout.readline().startswith("0,0.000,")
    proc.stdout.close()
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=60) == 141, err  # 128 + SIGPIPE, as a killed pipe writer
    assert "streamed" not in err and "Traceback" not in err and "warning" not in err

    proc = subprocess.Popen(
        [sys.executable, "-m", "fusionkit", "report", str(run.parent), "--no-throughput",
         "--bootstrap", "100", "--out", str(tmp_path / "rep")],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # closed before anything is printed
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=120) == 0, err
    assert "warning: standard output was closed" in err
    assert (tmp_path / "rep" / "report.md").is_file()


@pytest.mark.parametrize("listing", [["recipe", "list"], ["plugins", "list"]])
def test_a_closed_stdout_ends_a_listing_quietly(cli_env, tmp_path, listing):
    """`fusionkit recipe list | head -1`: the listing is the command's whole product, so a
    closed reader ends it as it ends `stream` (status 141), with no warning that it goes on."""
    env, _ = cli_env
    proc = subprocess.Popen(
        [sys.executable, "-m", "fusionkit", *listing], env=env, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    proc.stdout.close()  # closed before anything is printed
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(timeout=120) == 141, err
    assert "warning" not in err and "Traceback" not in err


def test_eval_reproduces_metrics_and_detects_tampering(cli_env, tmp_path, cli_inproc):
    """A run trained by the installed command; eval (in this process) reproduces it."""
    env, recipe = cli_env
    run = fk(["run", str(recipe), "training.epochs=2", "-q"], env, tmp_path)
    assert run.returncode == 0, run.stderr
    run_dir = tmp_path / "runs" / "tiny"
    ok = cli_inproc(["eval", str(run_dir)])
    assert ok.returncode == 0 and "reproduces metrics.json exactly" in ok.stdout
    # a split the run never evaluated is shown and said to be so, not silently skipped
    extra = cli_inproc(["eval", str(run_dir), "--split", "train", "--split", "test"])
    assert extra.returncode == 0, extra.stderr
    lines = extra.stdout.splitlines()
    assert "train: not in metrics.json (the run evaluated test, val); shown, not compared" in lines
    assert "reproduces metrics.json exactly (test;" in extra.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    val_ccc = metrics["splits"]["val"]["ccc_mean"]
    metrics["splits"]["val"]["ccc_mean"] += 0.01
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    bad = cli_inproc(["eval", str(run_dir)])
    assert bad.returncode == 1 and "val.ccc_mean" in bad.stderr
    # every stored number is compared, not only the CCCs: one ulp or one frame is found
    metrics["splits"]["val"]["ccc_mean"] = val_ccc
    test = metrics["splits"]["test"]
    test["rmse_valence"] = math.nextafter(test["rmse_valence"], math.inf)
    test["pcc_arousal"] = math.nextafter(test["pcc_arousal"], -math.inf)
    test["n_frames"] += 1
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    bad = cli_inproc(["eval", str(run_dir)])
    assert bad.returncode == 1, bad.stdout + bad.stderr
    named = {line.split(":")[0].strip() for line in bad.stderr.splitlines()[1:]}
    assert named == {"test.rmse_valence", "test.pcc_arousal", "test.n_frames"}, bad.stderr


def test_eval_on_missing_run_dir_is_one_clear_line(tmp_path):
    res = fk(["eval", str(tmp_path / "nope")], dict(os.environ), tmp_path)
    assert res.returncode == 2 and "run directory not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_recipe_show_prints_resolved_defaults(cli_env, tmp_path):
    env, recipe = cli_env
    res = fk(["recipe", "show", str(recipe), "training.lr=0.5"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    assert shown["training"]["lr"] == 0.5
    assert shown["model"]["head"]["params"]["batchnorm"] is True


def test_run_saves_resolved_recipe_with_overrides(cli_env, tmp_path):
    env, recipe = cli_env
    res = fk(["run", str(recipe), "training.epochs=1", "training.lr=0.002", "-q"], env, tmp_path)
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((tmp_path / "runs" / "tiny" / "recipe.yaml").read_text())
    assert saved["training"]["lr"] == 0.002 and saved["training"]["epochs"] == 1
    manifest = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert {"kind": "dataset", "name": "tiny", "distribution": "fk-tiny", "version": "0.3"} in (
        manifest["components"]
    )
    assert Path(tmp_path / "runs" / "tiny" / "model.safetensors").is_file()


def test_failed_start_leaves_no_empty_run_dir(tmp_path):
    """A data error before training starts removes the fresh run folder."""
    res = fk(
        ["run", str(REPO / "recipes" / "quickstart.yaml"), "model.targets=[valence, dominance]"],
        dict(os.environ),
        tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "'dominance' is not a label" in res.stderr
    assert not (tmp_path / "runs" / "quickstart").exists()


def test_data_root_shorthand_reaches_dataset_params(tmp_path, registry):
    from fusionkit.core.errors import RecipeError
    from fusionkit.core.recipe import validate_recipe

    raw = tiny_recipe(tmp_path)
    raw["data"]["root"] = "/data"
    with pytest.raises(RecipeError, match=r"data\.root: dataset 'tiny' reads no folder"):
        validate_recipe(raw, "r.yaml", registry)
    affwild = {**tiny_recipe(tmp_path)["data"], "name": "affwild2", "root": "/data/aw2"}
    raw = {**tiny_recipe(tmp_path), "data": affwild}
    raw["data"].pop("params")
    rc = validate_recipe(raw, "r.yaml", registry)
    assert str(rc.data.params.root) == "/data/aw2"


def test_error_message_keeps_bracketed_text(monkeypatch, capsys):
    import fusionkit.cli.root as cli
    from fusionkit.core.errors import DataError

    def boom():
        raise DataError("labels file x.txt: column [arousal] is missing")

    monkeypatch.setattr(cli, "app", boom)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    assert "column [arousal] is missing" in capsys.readouterr().err


def test_help_texts_wrap_to_the_terminal_not_at_the_docstrings_line_breaks():
    from typer.testing import CliRunner

    from fusionkit.cli import app

    wide = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    res = CliRunner().invoke(app, ["--help"], env=wide)
    assert res.exit_code == 0
    sentence = "compares with metrics.json (exactly: every stored number"
    assert any(sentence in line for line in res.output.splitlines()), res.output
    res = CliRunner().invoke(app, ["robustness", "--help"], env=wide)
    example = "skipped. Example: fusionkit robustness runs/misalignment --perturb shift"
    assert any(example in line for line in res.output.splitlines()), res.output
