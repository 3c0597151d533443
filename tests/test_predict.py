"""``fusionkit extract`` -> ``fusionkit run`` -> ``fusionkit predict`` on the generated tree,
and the submission writer: row order, padding, truncation, one run per target."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fusionkit.cli import app
from fusionkit.core.errors import DataError
from fusionkit.engine.predict import RunPredictions, submission_rows, write_submission
from tests.affwild2_fixture import TINY_AUDIO, TINY_VIDEO, shared_tree
from tests.conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:affwild2.*label rows")


def flow_args(root: Path) -> list[str]:
    return [
        f"data.params.root={root}",
        f"data.params.audio.backbone={TINY_AUDIO}",
        f"data.params.video.backbone={TINY_VIDEO}",
        "data.params.video.resize=24",
        "data.params.device=cpu",
    ]


def read_csv(path: Path) -> list[list[str]]:
    with path.open() as fh:
        return list(csv.reader(fh))


def test_extract_run_predict_on_the_official_layout(tmp_path_factory, tmp_path):
    fx = shared_tree(tmp_path_factory.getbasetemp())
    recipe = str(REPO / "recipes" / "affwild2" / "tagf.yaml")
    runner = CliRunner()
    args = flow_args(fx.root)
    res = runner.invoke(app, ["extract", recipe, *args, f"data.params.test_list={fx.test_list}"])
    assert res.exit_code == 0, res.output
    assert "skipped (valid)" in res.output and "audio_cnn-" in res.output
    run_args = [
        *args,
        "training.epochs=1",
        "model.targets=[valence,arousal]",  # one run for both columns (fusionkit variant)
        "model.encoders.video.params.channels=[32, 32]",  # small model: a CPU test
        "model.encoders.audio.params.channels=[16, 16]",
    ]
    # the test videos are not in this run's splits (no test_list): said, not silent
    with pytest.warns(UserWarning, match=r"vid_f, vid_g_left.*belong to no split"):
        res = runner.invoke(app, ["run", recipe, *run_args, f"output.dir={tmp_path}", "-q"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "affwild2_tagf_valence"
    out = tmp_path / "test.csv"
    res = runner.invoke(
        app,
        [
            "predict",
            str(run_dir),
            "--out",
            str(out),
            "--data",
            f"test_list={fx.test_list}",
            "--data",
            f"submission_template={fx.template}",
        ],
    )
    assert res.exit_code == 0, res.output
    # vid_f: 45 frames, the template lists 3 more; vid_g_left: 40 frames, 2 fewer listed
    assert "padded with the last prediction: vid_f (3 of 48 rows)" in res.output
    assert "truncated to the listed frames: vid_g_left (2 of 40 frames cut)" in res.output
    assert "far more than a few" not in res.output  # a few frames: no warning
    rows = read_csv(out)
    template = read_csv(fx.template)
    assert rows[0] == ["image_location", "valence", "arousal"]
    assert [r[0] for r in rows] == [r[0] for r in template]  # the official list, in its order
    f_rows = [r for r in rows if r[0].startswith("vid_f/")]
    assert len(f_rows) == fx.media["vid_f"].frames + 3
    assert f_rows[-1][1:] == f_rows[-4][1:] and f_rows[-4][1:] != f_rows[-5][1:]  # padded
    assert len([r for r in rows if r[0].startswith("vid_g_left/")]) == 38  # truncated from 40

    # val predictions reproduce the per-frame predictions the run saved at its end
    out_val = tmp_path / "val.csv"
    with pytest.warns(UserWarning, match=r"vid_f, vid_g_left.*belong to no split"):
        res = runner.invoke(app, ["predict", str(run_dir), "--split", "val", "--out", str(out_val)])
    assert res.exit_code == 0, res.output
    saved = load_file(str(run_dir / "predictions" / "val.safetensors"))
    rows = read_csv(out_val)[1:]
    e_rows = [r for r in rows if r[0].startswith("vid_e/")]
    assert len(e_rows) == fx.trials["vid_e"].label_rows
    assert e_rows[5][0] == "vid_e/00006.jpg"
    got = torch.tensor([[float(x) for x in r[1:]] for r in e_rows])
    torch.testing.assert_close(got, saved["pred/vid_e"], atol=2e-6, rtol=0)


def fake_run(name: str, targets: tuple[str, ...], scale: float) -> RunPredictions:
    ids = torch.arange(4)
    pred = torch.stack([ids * scale + j for j in range(len(targets))], 1).float()
    rows = {"a": [(f"a/{k + 1:05d}.jpg", k) for k in range(6)]}  # two frames past the end
    return RunPredictions(Path(name), targets, ("valence", "arousal"), {"a": (ids, pred)}, rows)


def test_runs_per_target_merge_into_one_file(tmp_path):
    out = tmp_path / "p.csv"
    summary = write_submission(
        [fake_run("aro", ("arousal",), 0.1), fake_run("val", ("valence",), 0.2)], out
    )
    rows = read_csv(out)
    assert rows[0] == ["image_location", "valence", "arousal"]
    assert rows[2] == ["a/00002.jpg", "0.200000", "0.100000"]
    assert rows[6] == ["a/00006.jpg", "0.600000", "0.300000"]  # frame 5 > last: last value
    assert summary["padded"] == {"a": (2, 6)}  # 2 of its 6 listed rows
    with pytest.raises(DataError, match="'valence' is predicted by both"):
        write_submission([fake_run("x", ("valence",), 1), fake_run("y", ("valence",), 1)], out)
    with pytest.raises(DataError, match=r"no run predicts arousal.*--missing-value"):
        write_submission([fake_run("x", ("valence",), 1)], out)
    write_submission([fake_run("x", ("valence",), 1)], out, missing_value=0.0)
    assert read_csv(out)[1] == ["a/00001.jpg", "0.000000", "0.000000"]


def test_runs_listing_other_submission_rows_are_not_merged(tmp_path):
    """Merged runs follow one row list: a run whose dataset lists other rows (another
    template) or none is refused, where the file took the first run's rows."""
    out = tmp_path / "p.csv"
    other = fake_run("val", ("valence",), 0.2)
    other.rows = {"a": [(f"a/{k:05d}.png", k) for k in range(6)]}
    with pytest.raises(DataError, match=r"name different submission rows.*videos a"):
        write_submission([fake_run("aro", ("arousal",), 0.1), other], out)
    other.rows = None
    with pytest.raises(DataError, match="aro lists submission rows, val lists none"):
        write_submission([fake_run("aro", ("arousal",), 0.1), other], out)
    assert not out.exists()


def test_rows_follow_frame_ids():
    ids = torch.tensor([0, 1, 2, 5, 6])  # a dataset that skipped frames 3 and 4
    pred = torch.tensor([0.0, 1.0, 2.0, 5.0, 6.0])
    assert submission_rows(ids, pred, [0, 3, 4, 5, 9]).tolist() == [0, 2, 2, 5, 6]
    assert submission_rows(ids, pred, [2]).tolist() == [2]  # truncation: only listed frames
