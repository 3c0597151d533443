"""CCC, PCC, RMSE against golden values and independent numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionkit.engine.metrics import ccc, ccc_loss, pcc, regression_metrics, rmse
from tests.conftest import np_ccc


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [([0, 1, 2], [0, 1, 1], 0.6667), ([3, -0.5, 2, 7], [2.5, 0, 2, 8], 0.97679)],
)
def test_golden_ccc_population_divisor(x, y, expected):
    got = float(ccc(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))
    assert got == pytest.approx(expected, abs=5e-5)


def test_ccc_matches_numpy_and_differs_from_unbiased_variant():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50) * 0.5 + 0.2
    got = float(ccc(torch.from_numpy(x), torch.from_numpy(y)))
    assert got == pytest.approx(np_ccc(x, y), abs=1e-12)
    unbiased = 2 * np.cov(x, y)[0, 1] / (x.var(ddof=1) + y.var(ddof=1) + (x.mean() - y.mean()) ** 2)
    assert abs(got - unbiased) > 1e-6  # the divisor matters and we use N


def test_pcc_rmse_against_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=40), rng.normal(size=40)
    assert float(pcc(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(
        np.corrcoef(x, y)[0, 1], abs=1e-12
    )
    assert float(rmse(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(
        np.sqrt(np.mean((x - y) ** 2)), abs=1e-12
    )


def test_masked_ccc_ignores_masked_frames():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=30), rng.normal(size=30)
    mask = np.ones(30, dtype=bool)
    mask[20:] = False
    xg = x.copy()
    xg[20:] = 1e6  # garbage in padding must not matter
    got = float(ccc(torch.from_numpy(xg), torch.from_numpy(y), torch.from_numpy(mask)))
    assert got == pytest.approx(np_ccc(x[:20], y[:20]), abs=1e-10)


def test_ccc_loss_is_per_window_mean_of_one_minus_ccc_on_valid_frames():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(3, 20, 2))
    tgt = rng.normal(size=(3, 20, 2))
    lengths = [20, 12, 7]
    mask = np.zeros((3, 20), dtype=bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    padded = pred.copy()
    padded[~mask] = 50.0
    expected = np.mean(
        [1 - np_ccc(pred[b, :n, k], tgt[b, :n, k]) for b, n in enumerate(lengths) for k in range(2)]
    )
    got = ccc_loss(torch.from_numpy(padded), torch.from_numpy(tgt), torch.from_numpy(mask))
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_regression_metrics_mean_is_average_of_targets():
    rng = np.random.default_rng(4)
    p, t = rng.normal(size=(100, 2)), rng.normal(size=(100, 2))
    m = regression_metrics(torch.from_numpy(p), torch.from_numpy(t), ("valence", "arousal"))
    assert m["ccc_valence"] == pytest.approx(np_ccc(p[:, 0], t[:, 0]), abs=1e-12)
    assert m["ccc_mean"] == pytest.approx((m["ccc_valence"] + m["ccc_arousal"]) / 2)
    assert m["n_frames"] == 100
