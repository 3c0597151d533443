"""Statistics for comparison reports: pooled CCC from per-video sufficient statistics, and a
paired bootstrap over videos.

The ABAW metric pools all labelled frames of a split and computes one CCC per target. Pooled
CCC is a function of six sums over the frames (``n, Σp, Σt, Σp², Σt², Σpt``), and the sums of a
set of videos are the sums of the videos' sums. So a bootstrap resample of videos (drawn with
replacement) needs no frame-level work: its sums are ``counts @ per_video_sums``.

**Paired bootstrap over videos** (:func:`paired_bootstrap`): the compared statistic is the
metric as the report's table shows it, the CCC of each run averaged over the runs (seeds) of a
variant, and the effect is ``delta = stat(A) - stat(B)``. Each resample draws ``V`` of the
split's ``V`` videos with replacement and recomputes both statistics on the *same* videos (for
every run of both variants), so the test is paired by video and asks whether the difference
would hold on another draw of test videos. It does not model the randomness of training:
that is what the ``± std`` over seeds shows. The two-sided p-value is
``min(1, 2 * min(P*(delta* <= 0), P*(delta* >= 0)))`` with the add-one correction
``(count + 1) / (B + 1)``; the interval is the percentile interval of ``delta*``.

A resample can leave a target's CCC undefined (0 / 0: it drew only videos on which the
prediction and the label are both constant, or only videos without labelled frames). Such a
resample is left out *for that target only* (and for the mean over targets, which needs all of
them); the other targets keep it. So ``B`` is counted per target (:attr:`BootstrapResult.n_used`),
and a target left with no resample has no interval and no p-value (NaN, with the reason from
:meth:`BootstrapResult.undefined`).

**Holm correction** (:func:`holm`): when several variants are each tested against one
baseline, the family-wise error rate is held with Holm's step-down procedure: sort the ``m``
p-values ascending, multiply the ``i``-th smallest (1-based) by ``m - i + 1``, cap at 1 and
make the sequence non-decreasing (each adjusted value is the running maximum). A hypothesis is
rejected at level ``alpha`` when its adjusted p-value is below ``alpha``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BootstrapResult",
    "auc_normalised",
    "bootstrap_deltas",
    "ccc_from_sums",
    "holm",
    "paired_bootstrap",
    "resample_counts",
    "video_sums",
]

#: order of the sufficient statistics on the last axis
SUMS = ("n", "p", "t", "pp", "tt", "pt")


def video_sums(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sufficient statistics of one video: ``(n_targets, 6)`` over its labelled frames.

    Args:
        pred, target: ``(N, n_targets)``.
        mask: ``(N,)`` bool, True on labelled frames.
    """
    m = np.asarray(mask, dtype=bool)
    p = np.asarray(pred, dtype=np.float64)[m]
    t = np.asarray(target, dtype=np.float64)[m]
    n = np.full(p.shape[1], float(m.sum()))
    return np.stack(
        [n, p.sum(0), t.sum(0), (p * p).sum(0), (t * t).sum(0), (p * t).sum(0)], axis=-1
    )


def ccc_from_sums(sums: np.ndarray) -> np.ndarray:
    """Pooled CCC (population moments) from sufficient statistics ``(..., 6)``."""
    n, sp, st, spp, stt, spt = np.moveaxis(np.asarray(sums, dtype=np.float64), -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mp, mt = sp / n, st / n
        vp = spp / n - mp * mp
        vt = stt / n - mt * mt
        cov = spt / n - mp * mt
        return 2.0 * cov / (vp + vt + (mp - mt) ** 2)


def resample_counts(n_videos: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_videos)`` how often each video is drawn in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_videos, np.full(n_videos, 1.0 / n_videos), size=n_boot).astype(
        np.float64
    )


def _statistic(runs: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Per resample, CCC per target then mean over targets, averaged over runs:
    ``(B, n_targets + 1)`` (the last column is the mean over targets)."""
    per_run = []
    for sums in runs:  # (V, n_targets, 6)
        c = ccc_from_sums(np.einsum("bv,vks->bks", weights, sums))
        per_run.append(np.concatenate([c, c.mean(-1, keepdims=True)], axis=-1))
    return np.mean(per_run, axis=0)


def bootstrap_deltas(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], counts: np.ndarray
) -> np.ndarray:
    """``stat(A) - stat(B)`` for each resample (row of ``counts``): ``(B, n_targets + 1)``."""
    return _statistic(a, counts) - _statistic(b, counts)


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of ``stat(A) - stat(B)``; arrays are per target plus the mean.

    Attributes:
        delta: the observed difference on the actual videos.
        ci_low, ci_high: percentile interval of the resampled differences.
        p_value: two-sided bootstrap p-value (see the module docstring).
        n_boot, n_videos, confidence: resamples drawn, videos, interval level.
        n_used: per target plus the mean, the resamples where that CCC is defined and which
            the interval and p-value come from (all ``n_boot`` when not given).
    """

    delta: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    n_boot: int
    n_videos: int
    confidence: float
    n_used: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.n_used is None:
            object.__setattr__(self, "n_used", np.full(np.shape(self.delta), self.n_boot))

    def undefined(self, col: int) -> str | None:
        """Why column ``col`` has no difference or no test, or None when it has both."""
        if not np.isfinite(self.delta[col]):
            return "CCC undefined on these videos (0/0: constant prediction and label)"
        if self.n_used[col] == 0 or not np.isfinite(self.p_value[col]):  # type: ignore[index]
            return f"CCC undefined in every one of {self.n_boot} resamples"
        return None


def paired_bootstrap(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    counts: np.ndarray | None = None,
) -> BootstrapResult:
    """Paired bootstrap over videos of the difference of the run-averaged pooled CCC.

    Args:
        a, b: per run of each variant, the per-video sums ``(V, n_targets, 6)`` on the same
            videos in the same order (from :func:`video_sums`).
        n_boot: resamples. seed: of the resampling.
        counts: explicit ``(n_boot, V)`` resample counts (overrides ``n_boot`` and ``seed``).
    """
    if not a or not b:
        raise ValueError("paired_bootstrap needs at least one run on each side")
    shapes = {x.shape for x in (*a, *b)}
    if len(shapes) != 1:
        raise ValueError(f"runs disagree on (videos, targets, 6): {sorted(shapes)}")
    n_videos = a[0].shape[0]
    if counts is None:
        counts = resample_counts(n_videos, n_boot, seed)
    delta = bootstrap_deltas(a, b, np.ones((1, n_videos)))[0]
    boot = bootstrap_deltas(a, b, counts)
    lo = np.full(boot.shape[1], np.nan)
    hi, p = lo.copy(), lo.copy()
    n_used = np.isfinite(boot).sum(axis=0)
    for j in np.flatnonzero(n_used):  # per column, only the resamples where it is defined
        col = boot[np.isfinite(boot[:, j]), j]
        lo[j], hi[j] = np.quantile(col, [(1 - confidence) / 2, (1 + confidence) / 2])
        le = ((col <= 0).sum() + 1) / (col.size + 1)
        ge = ((col >= 0).sum() + 1) / (col.size + 1)
        p[j] = min(1.0, 2 * min(le, ge))
    return BootstrapResult(delta, lo, hi, p, counts.shape[0], n_videos, confidence, n_used)


def auc_normalised(x: Sequence[float], y: Sequence[float]) -> float:
    """Area under ``y(x)`` with ``x`` rescaled to [0, 1] (trapezoid rule).

    The result is the curve's mean value with trapezoid weights, on the scale of ``y``, so a
    CCC-versus-strength curve gives a CCC-like score. One point gives its own ``y``.

    >>> auc_normalised([-30, 0, 30], [0.5, 0.7, 0.5])
    0.6
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    if xs.size == 1 or xs[-1] == xs[0]:
        return float(ys.mean())
    u = (xs - xs[0]) / (xs[-1] - xs[0])
    return float(np.sum((u[1:] - u[:-1]) * (ys[1:] + ys[:-1]) / 2))


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the order given.

    NaN entries are not tests: they stay NaN and do not count in ``m``.

    >>> holm([0.01, 0.04, 0.03, 0.005]).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"holm expects a 1-D sequence of p-values, got shape {p.shape}")
    tested = np.flatnonzero(~np.isnan(p))
    if np.any((p[tested] < 0) | (p[tested] > 1)):
        raise ValueError(f"p-values must lie in [0, 1]: {p.tolist()}")
    out = np.full(p.shape, np.nan)
    m = tested.size
    running = 0.0
    for rank, i in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, float((m - rank) * p[i])))
        out[i] = running
    return out
