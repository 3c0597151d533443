"""`fusionkit stream` (online prediction from a file) and `fusionkit runs list`."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import fusionkit.core.registry as fk_registry
from fusionkit.cli import app
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.runs import RunDir
from fusionkit.engine.session import load_run
from fusionkit.engine.streaming import StreamingPredictor
from tests.conftest import make_registry, tiny_recipe, tiny_stream_run


@pytest.fixture
def trained(tmp_path, monkeypatch):
    fk_registry.clear_registry_cache()
    monkeypatch.setattr(fk_registry, "load_registry", lambda strict=None: make_registry())
    yield tiny_stream_run(tmp_path, fk_registry.get_registry())
    fk_registry.clear_registry_cache()


def test_stream_writes_the_predictions_a_streaming_predictor_makes(trained, tmp_path):
    run, feats, video = trained
    out = tmp_path / "out.csv"
    res = CliRunner().invoke(
        app, ["stream", str(run), str(feats), "--out", str(out), "--fps", "25"]
    )
    assert res.exit_code == 0, res.output
    assert "streamed 60 frames at 25 fps" in res.output and "x real time" in res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 60 and rows[1]["seconds"] == "0.040"
    assert all(float(r["latency_ms"]) > 0 for r in rows)
    session = load_run(run).session  # independently: the same predictor, frame by frame
    sp = StreamingPredictor(session.model, {"audio": 6, "video": 5}, 64, session.normalizer)
    expected = [sp.push({m: video.features[m][t] for m in ("audio", "video")}) for t in range(60)]
    got = torch.tensor([[float(r["valence"]), float(r["arousal"])] for r in rows])
    torch.testing.assert_close(got, torch.stack(expected), atol=2e-6, rtol=0)


def test_stream_reads_npz_and_paces_in_real_time(trained, tmp_path):
    run, _, video = trained
    npz = tmp_path / "video.npz"
    np.savez(npz, **{m: x[:20].numpy() for m, x in video.features.items()})
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["stream", str(run), str(npz), "--fps", "50", "--realtime", "-q"])
    assert res.exit_code == 0, res.output
    assert time.perf_counter() - t0 >= 19 / 50  # frame k is not processed before k / fps


def test_stream_rejects_a_file_without_a_modality(trained, tmp_path):
    run, _, video = trained
    bad = tmp_path / "audio_only.safetensors"
    save_file({"audio": video.features["audio"][:10].contiguous()}, str(bad))
    res = CliRunner().invoke(app, ["stream", str(run), str(bad)])
    assert res.exit_code != 0 and "has no 'video' array" in str(res.exception)


def test_runs_list_shows_each_run_status(trained, tmp_path):
    run, _, _ = trained
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["output"]["name"] = "unfinished"
    rc = validate_recipe(raw, "r.yaml", fk_registry.get_registry())
    RunDir.create(rc, fk_registry.get_registry()).unlock()  # started, then stopped
    res = CliRunner().invoke(app, ["runs", "list", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines()[1:] if ln.strip()}
    assert "complete" in lines[str(run)] and "interrupted" in lines[str(tmp_path / "unfinished")]


@pytest.mark.parametrize(
    "text", ["[1, 2]", '{"runs": {"a": "x"}}', "{not json", '{"runs": {"a": {"values": 3}}}']
)
def test_runs_list_names_a_damaged_grid_record(tmp_path, text):
    """A grid.json of another shape used to end `runs list` in a traceback."""
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "grid.json").write_text(text)
    res = CliRunner().invoke(app, ["runs", "list", str(tmp_path)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    lines = {ln.split()[0]: ln for ln in res.output.splitlines()[1:] if ln.strip()}
    assert "unreadable (damaged" in lines[str(tmp_path / "g" / "grid.json")]


def test_runs_list_names_a_damaged_metrics_file(trained, tmp_path):
    """A metrics.json of another shape used to end `runs list` in a traceback."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy)
    (copy / "metrics.json").write_text('{"splits": ["test"]}')
    res = CliRunner().invoke(app, ["runs", "list", str(tmp_path)], env={"COLUMNS": "500"})
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith(str(copy)))
    text = " ".join(res.output.split())  # cells wrap, never cut
    # the edited file is named as changed since the run finished (its SHA-256 in run.json)
    assert "unreadable:" in line and "metrics.json changed after the run finished" in text
