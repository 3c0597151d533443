"""Reports over grids with conditions: a baseline per condition, flagged frames and named
gate steps in the gate plots."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch

from fusionkit.core.errors import FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.files import load_tensors, save_tensors
from fusionkit.engine.runs import RunDir
from fusionkit.studies.grid import run_grid, train_and_evaluate
from fusionkit.studies.report import build_report
from fusionkit.studies.reportdir import write_report
from tests.conftest import flagged_gate_recipe, tiny_recipe


@pytest.fixture(scope="module")
def condition_grid(tmp_path_factory, registry):
    tmp = tmp_path_factory.mktemp("conditions")
    raw = tiny_recipe(tmp, epochs=1)
    raw["model"]["fusion"] = {"name": "rjca", "params": {"recursions": 1}}
    raw["variants"] = {
        "concat": {"model.fusion": {"name": "concat"}, "model.gate.name": "last"},
        "grjca": {"model.gate.name": "grjca"},
    }
    raw["sweep"] = {"data.params.seed": [0, 1], "training.seed": [0, 1]}
    rc = validate_recipe(raw, "grid", registry)
    run_grid(rc, registry=registry)
    return tmp / "tiny"


def test_a_variant_name_as_baseline_compares_within_each_condition(condition_grid, tmp_path):
    rep = build_report([condition_grid], baseline="concat", n_boot=200, throughput=False)
    rows = {r["variant"]: r for r in rep.rows}
    assert rep.baseline == "concat (same sweep values)"
    for seed in (0, 1):
        base, other = rows[f"concat (params.seed={seed})"], rows[f"grjca (params.seed={seed})"]
        assert base["delta"] is None
        # the point estimate is the difference of the two rows' seed-averaged means
        runs = [json.loads((r.run_dir / "metrics.json").read_text()) for r in other["runs"]]
        want = statistics.fmean(m["splits"]["test"]["ccc_mean"] for m in runs) - base["ccc_mean"][0]
        assert other["delta"].delta[-1] == pytest.approx(want, abs=1e-9)
        assert rep.baseline_of[other["variant"]] == base["variant"]
    write_report(rep, tmp_path / "out")
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        summary = {r["variant"]: r for r in csv.DictReader(f)}
    assert summary["grjca (params.seed=1)"]["baseline"] == "concat (params.seed=1)"
    assert summary["concat (params.seed=0)"]["paired_test"] == "baseline"


def test_a_row_label_baseline_still_means_one_baseline(condition_grid):
    rep = build_report(
        [condition_grid], baseline="concat (params.seed=0)", n_boot=200, throughput=False
    )
    assert set(rep.baseline_of.values()) == {"concat (params.seed=0)"}
    # seed 1 of the data is other videos: no paired test against seed 0's
    assert isinstance({r["variant"]: r for r in rep.rows}["grjca (params.seed=1)"]["delta"], str)


def test_an_unknown_variant_name_is_refused(condition_grid):
    with pytest.raises(FusionkitError, match=r"--baseline 'tagf' is not a variant"):
        build_report([condition_grid], baseline="tagf", throughput=False)


def test_flagged_frames_and_step_names_reach_the_predictions_and_the_gate_plot(tmp_path, registry):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["data"] = {
        "name": "synthetic",
        "params": {
            "seed": 3,
            "num_train": 2,
            "num_val": 1,
            "num_test": 2,
            "min_frames": 120,
            "max_frames": 160,
            "audio_dim": 8,
            "video_dim": 8,
            "reliability_rate": 0.5,
            "reliability_span": 1.0,
        },
        "window": 64,
        "hop": 48,
    }
    raw["model"]["fusion"] = {"name": "modality_stack", "params": {"dim": 8}}
    raw["model"]["gate"] = {"name": "moe_gate", "params": {"hidden": 8, "reliability_hidden": 8}}
    rc = validate_recipe(raw, "flags", registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    tensors, meta = load_tensors(run.path / "predictions" / "test.safetensors")
    assert json.loads(meta["step_names"]) == ["audio", "video"]
    dataset = registry.build("dataset", rc.data.name, rc.data.params)
    seen = 0
    for info in dataset.info("test"):
        for m in ("audio", "video"):
            want = info.unreliable(m)
            dropout = info.audio_dropout if m == "audio" else info.video_dropout
            if dropout is not None:
                want[dropout[0] : dropout[1]] = True
            key = f"flag/{m} unreliable/{info.name}"
            if bool(want.any()):
                assert torch.equal(tensors[key].bool(), want)
                seen += 1
            else:
                assert key not in tensors
    assert seen > 0
    rep = build_report([run.path], n_boot=100, throughput=False)
    assert rep.gates == ["gates_tiny"]
    assert rep.plots["gates_tiny"].startswith(b"\x89PNG")
    (tmp_path / "gates.png").write_bytes(rep.plots["gates_tiny"])


def test_bad_flags_are_refused_with_the_video_named():
    from fusionkit.core.errors import DataError
    from fusionkit.core.interfaces import Video
    from fusionkit.engine.data import FrameStore

    def video(flags):
        return Video(
            name="v1",
            features={"audio": torch.zeros(5, 2)},
            labels=torch.zeros(5, 2),
            label_mask=torch.ones(5, dtype=torch.bool),
            flags=flags,
        )

    with pytest.raises(DataError, match=r"'v1'.*flags\['noisy'\] is torch.float32 \(5,\)"):
        FrameStore([video({"noisy": torch.zeros(5)})], ["audio"], [0, 1], 4, 2)
    with pytest.raises(DataError, match=r"flag name 'a/b'"):
        FrameStore([video({"a/b": torch.zeros(5, dtype=torch.bool)})], ["audio"], [0, 1], 4, 2)
    store = FrameStore(
        [video({"noisy": torch.tensor([True, False, False, True, True])})], ["audio"], [0, 1], 4, 2
    )
    assert store.flags["noisy"].tolist() == [True, False, False, True, True]


def test_gate_weights_on_flagged_frames_match_a_direct_computation(tmp_path, registry):
    raw = flagged_gate_recipe(tmp_path)
    run_grid(validate_recipe(raw, "grid", registry), registry=registry)
    grid_dir = tmp_path / "tiny"
    rep = build_report([grid_dir], n_boot=100, throughput=False)
    got = {(g.stream, g.flag): g for g in rep.flag_gates}
    assert got, "the synthetic dataset with reliability spans flags frames"
    seed0 = {}
    for (stream, flag), g in got.items():
        assert g.runs == 2 and g.steps == ("audio", "video")
        inside, outside = [], []
        for seed in (0, 1):
            tensors, meta = load_tensors(grid_dir / f"seed-{seed}" / "predictions/test.safetensors")
            names = json.loads(meta["videos"])
            w = torch.cat([tensors[f"gate/{stream}/{n}"].double() for n in names])
            on = torch.cat(
                [
                    tensors[f"flag/{flag}/{n}"].bool()
                    if f"flag/{flag}/{n}" in tensors
                    else torch.zeros(len(tensors[f"pred/{n}"]), dtype=torch.bool)
                    for n in names
                ]
            )
            inside.append(w[on].mean(0))
            outside.append(w[~on].mean(0))
        seed0[(stream, flag)] = (inside[0].tolist(), outside[0].tolist())
        assert g.inside == pytest.approx(torch.stack(inside).mean(0).tolist(), abs=1e-6)
        assert g.outside == pytest.approx(torch.stack(outside).mean(0).tolist(), abs=1e-6)
    write_report(rep, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "weights flagged" in md and (tmp_path / "out" / "gate_flags.csv").is_file()

    # a predictions file changed after its run finished is not used for the table either
    path = grid_dir / "seed-1" / "predictions/test.safetensors"
    tensors, meta = load_tensors(path)
    save_tensors(path, {k: v + 1 if k.startswith("gate/") else v for k, v in tensors.items()}, meta)
    again = {(g.stream, g.flag): g for g in build_report([grid_dir], throughput=False).flag_gates}
    assert again.keys() == got.keys()
    for key, g in again.items():
        assert g.runs == 1
        assert g.inside == pytest.approx(seed0[key][0], abs=1e-6)
        assert g.outside == pytest.approx(seed0[key][1], abs=1e-6)


def test_a_condition_without_baseline_runs_is_an_error_naming_it(condition_grid, tmp_path):
    import shutil

    grid = tmp_path / "tiny"
    shutil.copytree(condition_grid, grid)
    for run in grid.glob("concat_seed-1_*"):
        (run / "run.json").unlink()  # no longer a complete run: left out of the report
    with pytest.raises(FusionkitError, match=r"no complete runs for concat \(params.seed=1\)"):
        build_report([grid], baseline="concat", throughput=False)
