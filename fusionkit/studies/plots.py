"""Figures of comparison reports (matplotlib, Agg backend, PNG bytes).

Every function returns PNG bytes so the caller can both write a file and embed it (base64) in
a standalone HTML page.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["ccc_bars", "gate_traces", "robustness_curves"]

DPI = 90
_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def _figure(width: float, height: float) -> Figure:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def ccc_bars(
    variants: Sequence[str],
    metrics: Sequence[str],
    mean: np.ndarray,
    std: np.ndarray,
    title: str,
) -> bytes:
    """Grouped bars: one group per variant, one bar per metric, ``± std`` error bars.

    ``mean``, ``std``: ``(len(variants), len(metrics))``.
    """
    fig = _figure(max(6.0, 1.1 * len(variants) + 2.5), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    x = np.arange(len(variants))
    for j, m in enumerate(metrics):
        err = np.nan_to_num(std[:, j], nan=0.0)
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, mean[:, j], width, yerr=err,
               capsize=3, label=m, color=color(j), alpha=0.85)  # fmt: skip
    ax.set_xticks(x, list(variants), rotation=20 if len(variants) > 5 else 0, ha="right"
                  if len(variants) > 5 else "center")  # fmt: skip
    lo = float(np.nanmin(mean - np.nan_to_num(std, nan=0.0)))
    ax.set_ylim(min(0.0, lo - 0.05), min(1.0, float(np.nanmax(mean)) + 0.12))
    ax.set_ylabel("CCC")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=len(metrics), fontsize=8, loc="upper left")
    return _png(fig)


def robustness_curves(
    curves: Sequence[dict[str, Any]], axis_label: str, title: str, ylabel: str = "CCC mean"
) -> bytes:
    """CCC against perturbation strength, one line (± std band over seeds) per model.

    Each curve: ``{"label", "x", "mean", "std"}`` (sequences of equal length).
    """
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    for i, c in enumerate(curves):
        x = np.asarray(c["x"], dtype=float)
        y = np.asarray(c["mean"], dtype=float)
        s = np.nan_to_num(np.asarray(c["std"], dtype=float), nan=0.0)
        ax.plot(x, y, marker="o", ms=4, lw=1.6, color=color(i), label=c["label"])
        if np.any(s > 0):
            ax.fill_between(x, y - s, y + s, color=color(i), alpha=0.15, lw=0)
    ax.set_xlabel(axis_label)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def gate_traces(videos: Sequence[dict[str, Any]], targets: Sequence[str], title: str) -> bytes:
    """Per video (columns): valence/arousal prediction vs label, then each stream's gate
    weights over the recursion steps, stacked (they sum to 1 per frame for softmax gates).

    Each video: ``{"name", "pred" (N, n_targets), "target" (N, n_targets), "mask" (N,),
    "gates": {stream: (N, S)}}``.
    """
    streams = sorted({s for v in videos for s in v["gates"]})
    rows = len(targets) + len(streams)
    cols = len(videos)
    fig = _figure(4.2 * cols + 0.6, 1.55 * rows + 0.7)
    axes = np.atleast_2d(fig.subplots(rows, cols, sharex="col", squeeze=False))
    for c, v in enumerate(videos):
        n = v["pred"].shape[0]
        t = np.arange(n)
        for r, name in enumerate(targets):
            ax = axes[r, c]
            label = np.where(v["mask"], v["target"][:, r], np.nan)
            ax.plot(t, label, color="black", lw=1.2, label="label")
            ax.plot(t, v["pred"][:, r], color=color(r), lw=1.2, label="prediction")
            ax.set_ylim(-1.05, 1.05)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel(name)
            if r == 0:
                ax.set_title(v["name"], fontsize=9)
            if r == 0 and c == cols - 1:
                ax.legend(fontsize=7, loc="lower right")
        for k, s in enumerate(streams):
            ax = axes[len(targets) + k, c]
            w = v["gates"].get(s)
            if w is None:
                ax.set_axis_off()
                continue
            steps = w.shape[1]
            ax.stackplot(t, w.T, colors=[color(6 + j) for j in range(steps)],
                         labels=[f"step {j}" for j in range(steps)], alpha=0.85)  # fmt: skip
            top = float(np.max(w.sum(1))) if w.size else 1.0
            ax.set_ylim(0, max(1.0, math.ceil(top * 10) / 10))
            if c == 0:
                ax.set_ylabel(f"gate\n{s}")
            if k == 0 and c == cols - 1:
                ax.legend(fontsize=7, loc="lower right", ncols=steps)
        axes[-1, c].set_xlabel("frame")
    fig.suptitle(title, fontsize=10)
    return _png(fig)
