"""Rows of ``fusionkit report`` never pool runs of different setups (training data, evaluated
features, number of processes), and robustness curves only use files made on the run's own
weights and data; a left-out run counts against the row of its own setup.

The ``mut`` dataset below has the features of a fixed recipe depend on a module-level switch
(:data:`FEATURES`), the way re-extracting a features dataset (another extractor build, a fixed
preprocessing bug) changes the arrays behind one unchanged recipe while the labels stay.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from fusionkit.core.interfaces import Video
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.files import atomic_write_json, file_sha256
from fusionkit.engine.runs import RunDir
from fusionkit.studies.grid import train_and_evaluate
from fusionkit.studies.report import build_report
from tests.conftest import TinyDataset, TinyParams, make_registry, tiny_recipe

#: which "extraction" of the features the ``mut`` dataset serves, per split role
FEATURES = {"train": 0, "eval": 0}


class MutDataset(TinyDataset):
    """The tiny dataset (labels fixed by its params) whose features, of the train split and
    of the evaluated splits, carry noise that depends on :data:`FEATURES` (not on the
    recipe), as features extracted anew would."""

    def videos(self, split: str) -> list[Video]:
        version = FEATURES["train" if split == "train" else "eval"]
        noise = torch.Generator().manual_seed(1000 + 17 * version + len(split))
        return [
            dataclasses.replace(
                v,
                features={
                    m: x + 0.3 * torch.randn(x.shape, generator=noise)
                    for m, x in sorted(v.features.items())
                },
            )
            for v in super().videos(split)
        ]


@pytest.fixture(scope="module")
def reg():
    r = make_registry()
    r.add("dataset", "mut", build=MutDataset, params=TinyParams, summary="re-extractable data")
    return r


def _run(folder, registry, seed, name="tiny", data="tiny", robustness=None):
    raw = tiny_recipe(folder, epochs=1, seed=seed)
    raw["name"] = name
    raw["data"]["name"] = data
    raw["output"]["name"] = f"{name}-s{seed}-{FEATURES['train']}{FEATURES['eval']}"
    if robustness:
        raw["evaluation"]["robustness"] = robustness
    rc = validate_recipe(raw, "tiny.yaml", registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    return run.path


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_seeds_evaluated_on_reextracted_features_are_not_pooled(reg, tmp_path, monkeypatch):
    """Two seeds of one recipe evaluated on features extracted anew (same labels) are two
    rows told apart by the features of the split, not one mean ± std."""
    monkeypatch.setitem(FEATURES, "train", 0)
    monkeypatch.setitem(FEATURES, "eval", 0)
    a = _run(tmp_path, reg, 0, data="mut")
    monkeypatch.setitem(FEATURES, "train", 1)
    monkeypatch.setitem(FEATURES, "eval", 1)
    b = _run(tmp_path, reg, 1, data="mut")
    ma, mb = _metrics(a), _metrics(b)
    # the premise: same labels, other features on the evaluated split
    assert ma["data_fingerprints"]["test"] == mb["data_fingerprints"]["test"]
    assert ma["features_sha256"]["test"] != mb["features_sha256"]["test"]
    rep = build_report([tmp_path], throughput=False, n_boot=100)
    assert all(len(r["seeds"]) == 1 for r in rep.rows), [r["variant"] for r in rep.rows]
    assert all("test features=" in r["variant"] for r in rep.rows), rep.rows[0]["variant"]


def test_seeds_trained_on_other_training_data_are_not_pooled(reg, tmp_path, monkeypatch):
    """Two seeds of one recipe whose training split was extracted anew (evaluated data equal)
    are two rows: metrics.json records the data each run trained on."""
    monkeypatch.setitem(FEATURES, "eval", 0)
    monkeypatch.setitem(FEATURES, "train", 0)
    a = _run(tmp_path, reg, 0, data="mut")
    monkeypatch.setitem(FEATURES, "train", 1)
    b = _run(tmp_path, reg, 1, data="mut")
    ma, mb = _metrics(a), _metrics(b)
    assert ma["features_sha256"]["test"] == mb["features_sha256"]["test"]  # eval data equal
    train_a, train_b = ma["trained_on"]["train"], mb["trained_on"]["train"]
    assert train_a["split"] == "train" and train_a["features_sha256"] != train_b["features_sha256"]
    assert ma["trained_on"]["val"] == mb["trained_on"]["val"]
    rep = build_report([tmp_path], throughput=False, n_boot=100)
    assert all(len(r["seeds"]) == 1 for r in rep.rows), [r["variant"] for r in rep.rows]
    assert all("training data=" in r["variant"] for r in rep.rows), rep.rows[0]["variant"]


def _rehash_metrics(run_dir, **updates):
    """Rewrite ``metrics.json`` with ``updates`` and record its new SHA-256 in ``run.json``, as
    a run that really had these values would have written them (used to stand in for a
    ``torchrun`` run, which a 15 s test cannot start)."""
    m = _metrics(run_dir)
    m.update(updates)
    atomic_write_json(run_dir / "metrics.json", m)
    marker = json.loads((run_dir / "run.json").read_text())
    marker["files"]["metrics.json"] = file_sha256(run_dir / "metrics.json")
    atomic_write_json(run_dir / "run.json", marker)


def test_seeds_of_other_world_size_are_not_pooled(registry, tmp_path):
    """A seed trained under torchrun with two processes (twice the windows per step) is not
    pooled with single-process seeds of the same recipe."""
    _run(tmp_path, registry, 0)
    b = _run(tmp_path, registry, 1)
    _rehash_metrics(b, world_size=2)
    rep = build_report([tmp_path], throughput=False, n_boot=100)
    assert sorted(r["variant"] for r in rep.rows) == [
        "tiny [processes used=1]",
        "tiny [processes used=2]",
    ]


def test_robustness_file_of_another_checkpoint_is_not_used(registry, tmp_path):
    """A robustness file made on other weights (copied from another run) is left out of the
    curves with a note naming it and the command that recomputes it."""
    sweep = [{"perturbation": "shift", "params": {"modality": "audio"}, "axis": "k",
              "values": [0, 8]}]  # fmt: skip
    a = _run(tmp_path / "src", registry, 0, robustness=sweep)
    b = _run(tmp_path / "src", registry, 1, name="other", robustness=sweep)
    own = json.loads((a / "robustness" / "shift_k.json").read_text())["results"]["test"]
    own_k0 = next(v for v in own.values() if v["value"] == 0)["metrics"]["ccc_mean"]
    dst = tmp_path / "only_a"
    shutil.copytree(a, dst / a.name)
    # a stale sweep file next to the weights, e.g. left by an rsync of a retrained run
    shutil.copy(b / "robustness" / "shift_k.json", dst / a.name / "robustness" / "shift_k.json")
    rep = build_report([dst], throughput=False, n_boot=100)
    for sw in rep.sweeps:
        for c in sw.curves:
            got = c.mean["ccc_mean"][c.x.index(0)]
            assert got == pytest.approx(own_k0), "curve uses another checkpoint's values"
    assert not rep.sweeps
    assert any(
        "shift_k.json is left out" in n and "other weights" in n and "fusionkit robustness" in n
        for n in rep.notes
    ), rep.notes


def test_left_out_run_counts_against_one_row_only(registry, tmp_path):
    """An interrupted run of one setup (lr 0.01) counts against that setup's row only when
    one label is split into rows by setup: '1 of 2' there, not in every row."""
    _run(tmp_path, registry, 0)
    raw = tiny_recipe(tmp_path, epochs=1, seed=0, lr=1e-2)
    raw["output"]["name"] = "lr2"
    rc = validate_recipe(raw, "tiny.yaml", registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    raw["training"]["seed"] = 1
    raw["output"]["name"] = "unfinished"
    with RunDir.create(validate_recipe(raw, "tiny.yaml", registry), registry):
        pass  # created, never trained: an interrupted run of the lr=0.01 setup
    rep = build_report([tmp_path], throughput=False, n_boot=100)
    assert len(rep.rows) == 2
    left = {r["variant"]: len(r["left_out"]) for r in rep.rows}
    assert sorted(left.values()) == [0, 1], left
    (row,) = [r for r in rep.rows if r["left_out"]]
    assert row["runs"][0].recipe["training"]["lr"] == 1e-2, row["variant"]
