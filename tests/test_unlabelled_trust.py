"""A split with no labelled frame (every label masked, like Aff-Wild2's all ``-5`` rows or its
test set) is never scored: training refuses it before the first epoch, evaluation refuses it,
and the metrics of zero frames are NaN, never a number made of nothing. Predicting such a split
(``fusionkit predict``: predictions only) still works."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import Field

from fusionkit.core.errors import TrainingError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.evaluate import evaluate, evaluate_splits, predict
from fusionkit.engine.metrics import ccc, pcc, regression_metrics
from fusionkit.engine.predict import predict_run
from fusionkit.engine.runs import BEST_FILE, METRICS_FILE, STATE_FILE, RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.train import Trainer
from tests.conftest import TinyDataset, TinyParams, make_registry, tiny_recipe


class MaskedParams(TinyParams):
    unlabelled: list[str] = Field(default_factory=list)


class MaskedDataset(TinyDataset):
    """The tiny dataset, with every label of the splits in ``unlabelled`` masked."""

    def videos(self, split: str):
        out = super().videos(split)
        if split in self.params.unlabelled:
            for v in out:
                v.label_mask = torch.zeros_like(v.label_mask, dtype=torch.bool)
                v.labels = torch.full_like(v.labels, -5.0)
        return out


@pytest.fixture(scope="module")
def reg():
    r = make_registry()
    r.add("dataset", "tiny_masked", build=MaskedDataset, params=MaskedParams, summary="test")
    return r


def recipe(tmp_path, reg, unlabelled, **evaluation):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["data"]["name"] = "tiny_masked"
    raw["data"]["params"]["unlabelled"] = unlabelled
    raw["evaluation"].update(evaluation)
    return validate_recipe(raw, "tiny", reg)


def fit(rc, reg):
    epochs = []
    run = RunDir.create(rc, reg)
    try:
        trainer = Trainer(build_session(rc, reg), run, on_epoch_end=lambda e, r: epochs.append(e))
        return trainer.fit(), run.path, epochs
    except TrainingError as exc:
        return exc, run.path, epochs
    finally:
        run.unlock()


def assert_refused_before_training(out, run_dir, epochs):
    assert isinstance(out, TrainingError), out
    assert epochs == []  # not one epoch ran: no best epoch picked on NaN
    for name in (METRICS_FILE, STATE_FILE, BEST_FILE, "history.csv"):
        assert not (run_dir / name).exists(), name


def test_val_split_without_labels_stops_before_training(tmp_path, reg):
    out, run_dir, epochs = fit(recipe(tmp_path, reg, ["val"]), reg)
    assert_refused_before_training(out, run_dir, epochs)
    assert str(out).startswith("split 'val' has no labelled frames (every label is masked: "), out
    assert "model selection needs labels: choose another data.val_split" in str(out)


def test_train_split_without_labels_stops_before_training(tmp_path, reg):
    out, run_dir, epochs = fit(recipe(tmp_path, reg, ["train"]), reg)
    assert_refused_before_training(out, run_dir, epochs)
    assert "split 'train' has no labelled frames" in str(out)
    assert "choose another data.train_split" in str(out)


def test_evaluation_split_without_labels_is_refused_before_training(tmp_path, reg):
    out, run_dir, epochs = fit(recipe(tmp_path, reg, ["test"]), reg)  # splits: [val, test]
    assert_refused_before_training(out, run_dir, epochs)
    msg = str(out)
    assert "split 'test' has no labelled frames" in msg
    assert "remove it from evaluation.splits" in msg
    assert "fusionkit predict RUN --split test" in msg


def test_robustness_split_without_labels_is_refused_before_training(tmp_path, reg):
    sweep = {
        "perturbation": "shift",
        "params": {"modality": "audio"},
        "axis": "k",
        "values": [0, 2],
        "splits": ["test"],
    }
    rc = recipe(tmp_path, reg, ["test"], splits=["val"], robustness=[sweep])
    out, run_dir, epochs = fit(rc, reg)
    assert_refused_before_training(out, run_dir, epochs)
    assert "split 'test' has no labelled frames" in str(out)
    assert "evaluation.robustness.0.splits" in str(out)


def test_evaluate_refuses_a_split_without_labels_but_predict_serves_it(tmp_path, reg):
    session = build_session(recipe(tmp_path, reg, ["test"], splits=["val"]), reg)
    with pytest.raises(TrainingError, match=r"split 'test' has no labelled frames"):
        evaluate_splits(session, ["val", "test"])
    store = session.store("test")
    with pytest.raises(TrainingError, match=r"dataset 'tiny_masked' split 'test' has no label"):
        evaluate(session.model, store, session.targets, 8)  # as robustness sweeps call it
    preds = predict(session.model, store, 8)  # predictions only: no labels needed
    assert preds.pred.shape == (store.num_frames, 2) and bool(preds.pred.isfinite().all())
    ok, _, _ = evaluate_splits(session, ["val"])
    assert ok["val"]["n_frames"] > 0 and math.isfinite(ok["val"]["ccc_mean"])


def test_unlabelled_test_split_still_predicted_after_training(tmp_path, reg):
    """The Aff-Wild2 test path: evaluate on labelled splits, predict the unlabelled one."""
    rc = recipe(tmp_path, reg, ["test"], splits=["val"])
    result, run_dir, epochs = fit(rc, reg)
    assert epochs == [1] and set(result.metrics) == {"val"}
    got = predict_run(run_dir, "test", registry=reg, device="cpu")
    n = sum(v.num_frames for v in MaskedDataset(MaskedParams(unlabelled=["test"])).videos("test"))
    assert sum(pred.shape[0] for _, pred in got.per_video.values()) == n


def test_metrics_of_zero_frames_are_nan_not_numbers():
    empty = torch.zeros(0, dtype=torch.float64)
    assert math.isnan(float(ccc(empty, empty)))
    assert math.isnan(float(pcc(empty, empty)))  # was 0.0: a number made of nothing
    x = torch.arange(6, dtype=torch.float64)
    assert math.isnan(float(ccc(x, x, torch.zeros(6, dtype=torch.bool))))
    m = regression_metrics(torch.zeros(0, 2), torch.zeros(0, 2), ("valence", "arousal"))
    assert m.pop("n_frames") == 0
    assert all(math.isnan(v) for v in m.values()), m


def test_constant_input_follows_ccc():
    """A constant prediction has covariance 0: CCC is 0 and so is PCC (not NaN, not an error)."""
    c, x = torch.ones(5, dtype=torch.float64), torch.arange(5, dtype=torch.float64)
    assert float(ccc(c, x)) == 0.0 and float(pcc(c, x)) == 0.0
