"""The learning-rate schedule, the best epoch and early stopping count a gain alike.

docs/recipes.md: "Adam; `ReduceLROnPlateau` on the validation mean CCC; early stopping after
`early_stopping` epochs without gain"; the schema says `training.plateau.patience` is the
number of "epochs without val CCC gain before LR decay", and docs/reliability.md states the
rule of a gain: a score strictly above the best so far (a tie is no gain). PyTorch's default
relative threshold (a gain must exceed the best by 1e-4 of its value) would disagree with it
on small gains and on negative scores.
"""

from __future__ import annotations

import csv

import pytest

from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.runs import HISTORY_FILE, RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.train import Trainer
from tests.conftest import tiny_recipe

LR, FACTOR = 3e-3, 0.5


def scripted_scores(monkeypatch, scores):
    """Every epoch's validation score is the next of ``scores`` (training itself is real)."""
    it = iter(scores)

    def validate(self, val, epoch):
        s = next(it)
        return {"ccc_mean": s, **{f"ccc_{t}": s for t in self.targets}}

    monkeypatch.setattr(Trainer, "_validate", validate)


def documented_lrs(scores, patience):
    """The learning rate of each epoch by the documented rule: a gain is a score strictly above
    the best so far; after more than ``patience`` epochs without gain the rate is multiplied by
    the factor (and the count restarts)."""
    lr, best, bad, out = LR, None, 0, []
    for s in scores:
        out.append(lr)
        if best is None or s > best:
            best, bad = s, 0
        else:
            bad += 1
            if bad > patience:
                lr, bad = lr * FACTOR, 0
    return out


@pytest.mark.parametrize(
    "scores",
    [
        [0.5, 0.50001, 0.50002, 0.50003, 0.50004],  # a gain every epoch: the rate stays
        [-0.5, -0.50002, -0.50004, -0.50006, -0.50008],  # no gain after epoch 1: it decays
    ],
    ids=["small-gains", "negative-declines"],
)
def test_the_plateau_schedule_counts_gains_as_best_epoch_and_early_stopping_do(
    tmp_path, registry, monkeypatch, scores
):
    scripted_scores(monkeypatch, scores)
    rc = validate_recipe(
        tiny_recipe(
            tmp_path,
            epochs=len(scores),
            lr=LR,
            early_stopping=100,
            plateau={"patience": 1, "factor": FACTOR},
        ),
        "tiny",
        registry,
    )
    run = RunDir.create(rc, registry)
    try:
        Trainer(build_session(rc, registry), run).fit()
    finally:
        run.unlock()
    with open(run / HISTORY_FILE, newline="") as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f)]
    assert lrs == pytest.approx(documented_lrs(scores, patience=1), rel=1e-12)


def test_stopped_early_is_false_when_the_count_is_reached_on_the_last_epoch(
    tmp_path, registry, monkeypatch
):
    """Reaching the early-stopping count on the last allowed epoch stops nothing: the run ran
    all its epochs, and metrics.json says so."""
    import json

    scripted_scores(monkeypatch, [0.5, 0.4, 0.3])
    rc = validate_recipe(tiny_recipe(tmp_path, epochs=3, early_stopping=2), "tiny", registry)
    run = RunDir.create(rc, registry)
    try:
        Trainer(build_session(rc, registry), run).fit()
    finally:
        run.unlock()
    stored = json.loads((run / "metrics.json").read_text())
    assert stored["epochs_run"] == 3 and stored["stopped_early"] is False
