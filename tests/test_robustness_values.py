"""Robustness perturbations and sweep values checked against numpy: frames that move keep
their presence, a sweep's values are numbers as the perturbation reads them, and reports match
values across runs by number."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fusionkit.core.interfaces import Video
from fusionkit.core.recipe import PerturbationSpec, RobustnessSpec, validate_recipe
from fusionkit.engine.data import Normalizer
from fusionkit.engine.perturb import build_perturbation
from fusionkit.engine.runs import RunDir
from fusionkit.studies.grid import train_and_evaluate
from fusionkit.studies.robustness import run_recipe_robustness
from tests.conftest import tiny_recipe

N = 40
MEAN, STD = 5.0, 0.5


def _video_with_missing_span(name: str) -> Video:
    """Audio around 5.0 (never an all-zero row), with no audio on frames 10..14: zero rows
    marked absent, as datasets deliver a missing face or audio row."""
    x = MEAN + 0.01 * torch.arange(N, dtype=torch.float32)[:, None].repeat(1, 3)
    present = torch.ones(N, dtype=torch.bool)
    present[10:15] = False
    x[~present] = 0.0
    return Video(
        name,
        {"audio": x, "video": x.clone()},
        torch.zeros(N, 2),
        torch.ones(N, dtype=torch.bool),
        present={"audio": present},
    )


@pytest.mark.parametrize(
    ("name", "params", "video"),
    [
        ("shift", {"modality": "audio", "k": 3}, "v"),
        ("jitter", {"modality": "audio", "max_k": 4}, "c"),  # video "c" draws k = -4
        ("frame_drop", {"modalities": ["audio"], "p": 0.5}, "w"),  # frames 15, 16 repeat 14
    ],
)
def test_a_moved_absent_row_stays_absent(registry, name, params, video):
    """A zero-filled absent row moved by shift, jitter or frame_drop stays absent where it
    lands (z-scored to 0, not -mean/std), and the three are at revision 2 for it."""
    from fusionkit.engine.perturb import perturbation_revision

    assert perturbation_revision(name, registry) == 2
    pert = build_perturbation(
        PerturbationSpec.model_validate(
            {"name": name, "params": params, "seed": 0}, context={"registry": registry}
        ),
        registry,
    )
    v = _video_with_missing_span(video)
    out = pert(v)
    x = out.features["audio"]
    zero_rows = (x == 0).all(dim=1)  # copies of the absent rows (real rows are ~5)
    assert bool(zero_rows.any()) and not torch.equal(zero_rows, ~v.present["audio"])
    norm = Normalizer({"audio": torch.full((3,), MEAN)}, {"audio": torch.full((3,), STD)})
    z = norm.apply("audio", x, out.present["audio"]).numpy()
    # the documented rule (docs/ablations.md, with_features): an absent row filled with 0
    # stays at 0 after z-scoring; nowhere the value -mean/std = -10
    np.testing.assert_array_equal(z[zero_rows.numpy()], 0.0)


def _train(tmp_path, registry, name: str, lr: float):
    raw = tiny_recipe(tmp_path, epochs=1, lr=lr)
    raw["output"]["name"] = name
    rc = validate_recipe(raw, "r", registry)
    with RunDir.create(rc, registry) as run:
        train_and_evaluate(rc, run, resume=False, registry=registry)
    return run.path


def _sweep(run_dir, registry, values, label="span_dropout_rate"):
    spec = RobustnessSpec.model_validate(
        {"perturbation": "span_dropout", "axis": "rate", "values": values, "name": label},
        context={"registry": registry},
    )
    with RunDir.open(run_dir) as run:
        run_recipe_robustness(run, [spec], registry=registry, keep_others=True)


def _np_auc(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    order = np.argsort(x)
    x, y = x[order], y[order]
    u = (x - x[0]) / (x[-1] - x[0])
    return float(np.sum(np.diff(u) * (y[1:] + y[:-1]) / 2))


def test_values_written_as_int_or_float_are_one_value_in_the_report(tmp_path, registry, cli):
    """`--values=0,0.5,1` and a recipe's `[0.0, 0.5, 1.0]` of a float axis are one set of
    values: stored as the param reads them (0.0), matched across runs, and the AUC is over all
    three (it covered 0.5 alone when 0 and 0.0 were told apart). A file written before, with
    the integers, is matched by number too."""
    a = _train(tmp_path, registry, "a", 3e-3)
    b = _train(tmp_path, registry, "b", 1e-2)
    _sweep(a, registry, [0, 0.5, 1])  # as `--values=0,0.5,1` gives them
    _sweep(b, registry, [0.0, 0.5, 1.0])  # as a recipe's `values: [0.0, 0.5, 1.0]`
    path_a = a / "robustness" / "span_dropout_rate.json"
    rec = json.loads(path_a.read_text())
    assert [p["value"] for p in rec["results"]["test"].values()] == [0.0, 0.5, 1.0]
    # as an older version wrote it: the values as given, keyed by their text
    rec["results"]["test"] = {
        json.dumps(v): {**p, "value": v}
        for v, p in zip([0, 0.5, 1], rec["results"]["test"].values(), strict=True)
    }
    path_a.write_text(json.dumps(rec))
    code, _, err = cli("report", a, b, "--out", tmp_path / "rep", "--no-throughput",
                       "--bootstrap", "100")  # fmt: skip
    assert code == 0, err
    assert "missing in some runs" not in (tmp_path / "rep" / "report.md").read_text()
    rows = list(csv.DictReader((tmp_path / "rep" / "summary.csv").open()))
    got = sorted(float(r["auc_span_dropout_rate_mean"]) for r in rows)
    want = []
    for run in (a, b):
        rec = json.loads((run / "robustness" / "span_dropout_rate.json").read_text())
        pts = rec["results"]["test"].values()
        want.append(_np_auc([p["value"] for p in pts], [p["metrics"]["ccc_mean"] for p in pts]))
    np.testing.assert_allclose(got, sorted(want), rtol=1e-9)


def test_duplicate_values_as_the_param_reads_them_are_refused(registry):
    """0 and 0.0 of a float axis are one value: declaring both is a duplicate."""
    from pydantic import ValidationError

    spec = {"perturbation": "span_dropout", "axis": "rate", "values": [0, 0.5, 0.0]}
    with pytest.raises(ValidationError, match=r"contains duplicates .*0\.0 appears more"):
        RobustnessSpec.model_validate(spec, context={"registry": registry})


def test_a_sweep_over_a_categorical_param_is_refused_and_an_old_one_is_noted(
    tmp_path, registry, cli
):
    """A sweep whose values are not numbers (modality_dropout over modalities) has no curve
    or AUC: it is refused when declared, naming the value and how to compare such settings;
    a results file of one made before is left out of reports with a note, not a traceback."""
    run = _train(tmp_path, registry, "a", 3e-3)
    code, _, err = cli("robustness", run, "--perturb", "modality_dropout", "--axis",
                       "modalities", "--values=[audio],[video]")  # fmt: skip
    assert code == 2
    assert "['audio'] is not a number" in " ".join(err.split())
    assert not (run / "robustness" / "modality_dropout_modalities.json").exists()
    _sweep(run, registry, [0.0, 1.0], label="old")
    old = run / "robustness" / "old.json"
    rec = json.loads(old.read_text())
    rec["results"]["test"] = {
        json.dumps(v): {**p, "value": v}
        for v, p in zip([["audio"], ["video"]], rec["results"]["test"].values(), strict=True)
    }
    old.write_text(json.dumps(rec))
    code, _, err = cli("report", run, "--out", tmp_path / "rep", "--no-throughput",
                       "--bootstrap", "100")  # fmt: skip
    assert code == 0, err
    text = " ".join((tmp_path / "rep" / "report.md").read_text().split())
    assert "robustness sweep old (span_dropout over rate on test): its values are not all " in text


def test_a_list_param_given_one_item_says_how_to_write_a_list(tmp_path, registry, cli):
    """`--param modalities=audio` is refused with the spelling that works."""
    run = _train(tmp_path, registry, "a", 3e-3)
    code, _, err = cli("robustness", run, "--perturb", "noise", "--axis", "snr_db",
                       "--values=0,10", "--param", "modalities=audio")  # fmt: skip
    assert code == 2
    assert "(write a list as --param 'modalities=[audio]')" in " ".join(err.split())
