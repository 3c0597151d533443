"""Rules of a training run that its numbers depend on: which epoch is the best (a tie is no
gain), when early stopping fires, what ``training.seed`` seeds (initial weights and window
order), a training state of another recipe, and non-finite predictions at the final
evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fusionkit.core.errors import CheckpointError, TrainingError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.checkpoint import read_train_state
from fusionkit.engine.runs import BEST_FILE, METRICS_FILE, STATE_FILE, RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.train import Trainer, recover_best_weights
from tests.conftest import tiny_recipe


def start(tmp_path, registry, **training):
    """A new tiny run and its Trainer."""
    rc = validate_recipe(tiny_recipe(tmp_path, **training), "tiny", registry)
    run = RunDir.create(rc, registry)
    return rc, run, Trainer(build_session(rc, registry), run)


def scripted_validation(monkeypatch, scores):
    """Make every epoch's validation score the next of ``scores`` (training itself is real);
    returns the list of epochs validated."""
    epochs, it = [], iter(scores)

    def validate(self, val, epoch):
        epochs.append(epoch)
        s = next(it)
        return {"ccc_mean": s, **{f"ccc_{t}": s for t in self.targets}}

    monkeypatch.setattr(Trainer, "_validate", validate)
    return epochs


def test_a_tie_with_the_best_score_is_no_gain(tmp_path, registry, monkeypatch):
    """Equal validation scores keep the first best epoch and its weights, and count as epochs
    without gain (else a constant predictor, CCC 0 every epoch, never stops early)."""
    scripted_validation(monkeypatch, [0.5, 0.5, 0.5])
    _, run, trainer = start(tmp_path, registry, epochs=3, early_stopping=10)
    weights = {}
    trainer.on_epoch_end = lambda epoch, _: weights.__setitem__(
        epoch, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    )
    result = trainer.fit()
    run.unlock()
    assert result.best_epoch == 1
    assert trainer.state.best_epoch == 1 and trainer.state.bad_epochs == 2
    assert json.loads((run / METRICS_FILE).read_text())["best_epoch"] == 1
    best = load_file(str(run / BEST_FILE))
    assert any(not torch.equal(weights[1][k], weights[3][k]) for k in best)  # weights moved
    assert all(torch.equal(best[k], weights[1][k]) for k in weights[1])


@pytest.mark.parametrize(
    ("scores", "epochs_run", "best_epoch"),
    [
        ([0.5, 0.6, 0.6, 0.6, 0.6, 0.6], 4, 2),  # gain, then 2 epochs without: stop after 4
        ([0.5, 0.4, 0.6, 0.5, 0.5, 0.9, 0.9], 5, 3),  # a gain restarts the count
    ],
)
def test_early_stopping_fires_after_exactly_patience_epochs_without_gain(
    tmp_path, registry, monkeypatch, scores, epochs_run, best_epoch
):
    """docs/recipes.md: "early stopping after `early_stopping` epochs without gain"."""
    validated = scripted_validation(monkeypatch, scores)
    _, run, trainer = start(tmp_path, registry, epochs=len(scores), early_stopping=2)
    result = trainer.fit()
    run.unlock()
    assert validated == list(range(1, epochs_run + 1))
    assert [h["epoch"] for h in result.history] == validated
    assert result.best_epoch == best_epoch
    stored = json.loads((run / METRICS_FILE).read_text())
    assert stored["epochs_run"] == epochs_run and stored["stopped_early"] is True
    assert stored["best_epoch"] == best_epoch


def initial_weights(tmp_path, registry, seed):
    torch.manual_seed(1234 + seed)  # whatever the global RNG held before must not matter
    torch.rand(17)
    rc = validate_recipe(tiny_recipe(tmp_path, seed=seed), "tiny", registry)
    return build_session(rc, registry).model.state_dict()


def test_training_seed_sets_the_initial_weights(tmp_path, registry):
    one = initial_weights(tmp_path, registry, 1)
    again = initial_weights(tmp_path, registry, 1)
    two = initial_weights(tmp_path, registry, 2)
    assert one.keys() == again.keys() == two.keys()
    assert all(torch.equal(one[k], again[k]) for k in one)
    differ = [k for k in one if not torch.equal(one[k], two[k])]
    assert differ, "seeds 1 and 2 start from the same weights"


def first_epoch_windows(tmp_path, registry, monkeypatch, seed):
    """The training windows of epoch 1, in the order the steps took them."""
    seen: list[int] = []
    real = Trainer.backward_step

    def spy(self, fwd, store, windows):
        seen.extend(windows.tolist())
        return real(self, fwd, store, windows)

    monkeypatch.setattr(Trainer, "backward_step", spy)

    def stop(epoch, record):
        raise KeyboardInterrupt

    _, run, trainer = start(tmp_path, registry, epochs=2, seed=seed)
    trainer.on_epoch_end = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    run.unlock()
    monkeypatch.setattr(Trainer, "backward_step", real)
    return seen


def test_training_seed_sets_the_window_order(tmp_path, registry, monkeypatch):
    one = first_epoch_windows(tmp_path / "a", registry, monkeypatch, 1)
    again = first_epoch_windows(tmp_path / "b", registry, monkeypatch, 1)
    two = first_epoch_windows(tmp_path / "c", registry, monkeypatch, 2)
    assert sorted(one) == list(range(len(one))) and len(one) > 4  # each window once
    assert one == again
    assert sorted(two) == sorted(one)
    assert two != one, "seeds 1 and 2 train epoch 1 on the windows in the same order"


def interrupted(tmp_path, registry, **training):
    """A tiny run stopped after its first epoch (of 3), reopened and locked."""

    def stop(epoch, record):
        raise KeyboardInterrupt

    rc, run, trainer = start(tmp_path, registry, epochs=3, **training)
    trainer.on_epoch_end = stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    run.unlock()
    return rc, RunDir.open(run.path).lock()


def test_a_training_state_of_another_recipe_is_refused(tmp_path, registry):
    """State and best weights copied together from a run of another lr: the run's own files
    (run.json, recipe.yaml) and the best-weights hash all agree, so only the recipe hash in
    the training state can tell."""
    rc, run = interrupted(tmp_path / "a", registry)
    _, other = interrupted(tmp_path / "b", registry, lr=1e-2)
    other.unlock()
    for name in (STATE_FILE, BEST_FILE):
        shutil.copyfile(other / name, run / name)
    state_bytes = (run / STATE_FILE).read_bytes()
    run.check_same_training(rc, registry)  # run.json and recipe.yaml are the run's own
    recover_best_weights(run, read_train_state(run / STATE_FILE))  # and consistent weights
    with pytest.raises(CheckpointError, match="written by a different recipe") as err:
        Trainer(build_session(rc, registry), run).fit(resume=True)
    run.unlock()
    assert str(run / STATE_FILE) in str(err.value)
    assert (run / STATE_FILE).read_bytes() == state_bytes
    assert not (run / METRICS_FILE).exists()


def test_non_finite_test_predictions_fail_the_final_evaluation(tmp_path, registry, monkeypatch):
    """The model turns NaN on the test split only (training and validation are finite): the
    end of training refuses to score it and writes no metrics.json."""
    rc, run, trainer = start(tmp_path, registry, epochs=1)
    session = trainer.session
    last_split = [None]
    real_store = session.store

    def store(split, dataset=None):
        last_split[0] = split
        return real_store(split, dataset)

    monkeypatch.setattr(session, "store", store)

    def nan_on_test(module, args, out):
        if last_split[0] == "test":
            return dataclasses.replace(out, pred=torch.full_like(out.pred, math.nan))
        return None

    session.model.register_forward_hook(nan_on_test)
    assert rc.evaluation.splits == ["val", "test"]
    with pytest.raises(TrainingError, match="predicts non-finite values on split 'test'"):
        trainer.fit()
    run.unlock()
    assert trainer.state.epochs_done == 1  # it failed at the final evaluation
    assert not (run / METRICS_FILE).exists()
    assert not run.is_complete()
