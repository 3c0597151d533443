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

__all__ = [
    "ccc_bars_figure",
    "delta_figure",
    "gate_traces",
    "learning_curves",
    "plain",
    "png",
    "robustness_curves",
    "step_labels",
    "zoomed_limits",
]

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


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (no timestamp metadata: the same figure gives the same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def plain(text: Any) -> str:
    """``text`` shown literally: matplotlib reads ``$...$`` as math, so dollars are escaped
    (names and paths come from users)."""
    return str(text).replace("$", r"\$")


def color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _variant_ticks(ax: Any, x: np.ndarray, variants: Sequence[str]) -> None:
    """Variant names under the groups, slanted when there are many."""
    many = len(variants) > 5
    ax.set_xticks(
        x,
        [plain(v) for v in variants],
        rotation=20 if many else 0,
        ha="right" if many else "center",
    )


def zoomed_limits(low: np.ndarray, high: np.ndarray, pad: float = 0.15) -> tuple[float, float]:
    """Y limits that frame every value in ``[low, high]`` with a margin of ``pad`` times their
    range (at least 0.01), *not* forced to include 0: small differences between variants stay
    visible. NaNs are ignored."""
    lo = float(np.nanmin(low))
    hi = float(np.nanmax(high))
    margin = max(pad * (hi - lo), 0.01)
    return lo - margin, hi + margin


#: up to this many lines share one axes legend; more go into a legend below the figure
INLINE_LEGEND = 8


def line_style(i: int) -> str:
    """Line style of line ``i``: solid for the first 10 colours, then dashed, dotted, ..."""
    return ("-", "--", ":", "-.")[(i // 10) % 4]


def _legend_height(n: int) -> float:
    """Extra figure height (inches) for a legend of ``n`` lines below the axes."""
    return 0.0 if n <= INLINE_LEGEND else 0.2 * math.ceil(n / 2) + 0.2


def _legend(fig: Figure, ax: Any, n: int) -> None:
    if n <= INLINE_LEGEND:
        ax.legend(fontsize=8, loc="best")
    else:
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncols=2)


def ccc_bars_figure(
    variants: Sequence[str],
    metrics: Sequence[str],
    mean: np.ndarray,
    std: np.ndarray,
    title: str,
) -> Figure:
    """Grouped bars: one group per variant, one bar per metric, ``± std`` error bars.

    The y axis is zoomed on the values (:func:`zoomed_limits`; it does not start at 0), so
    the bars show the differences between variants; the title says so.
    ``mean``, ``std``: ``(len(variants), len(metrics))``.
    """
    fig = _figure(max(6.0, 1.1 * len(variants) + 2.5), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    x = np.arange(len(variants))
    err = np.nan_to_num(std, nan=0.0)
    lo, hi = zoomed_limits(mean - err, mean + err)
    for j, m in enumerate(metrics):
        ax.bar(x + (j - (len(metrics) - 1) / 2) * width, mean[:, j] - lo, width, bottom=lo,
               yerr=err[:, j], capsize=3, label=plain(m), color=color(j), alpha=0.85)  # fmt: skip
    _variant_ticks(ax, x, variants)
    ax.set_ylim(lo, hi + 0.12 * (hi - lo))  # room for the legend
    ax.set_ylabel("CCC (axis does not start at 0)")
    ax.set_title(plain(title), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=len(metrics), fontsize=8, loc="upper left")
    return fig


def delta_figure(
    variants: Sequence[str],
    metrics: Sequence[str],
    delta: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    significant: np.ndarray,
    title: str,
) -> Figure:
    """Differences from the baseline: per variant and metric, the point estimate with its
    confidence interval, around a line at 0. Filled markers are significant, hollow ones not.

    ``delta``, ``low``, ``high``: ``(len(variants), len(metrics))``; NaN rows (no test) are
    left empty. ``significant``: bool, same shape.
    """
    fig = _figure(max(6.0, 1.1 * len(variants) + 2.5), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(metrics)
    x = np.arange(len(variants))
    ax.axhline(0.0, color="black", lw=0.9)
    for j, m in enumerate(metrics):
        xs = x + (j - (len(metrics) - 1) / 2) * width
        d, lo, hi = delta[:, j], low[:, j], high[:, j]
        ax.errorbar(xs, d, yerr=np.vstack([d - lo, hi - d]), fmt="none", ecolor=color(j),
                    capsize=3, lw=1.2)  # fmt: skip
        sig = significant[:, j].astype(bool)
        ax.plot(xs[sig], d[sig], "o", color=color(j), label=plain(m) if sig.any() else None)
        ax.plot(xs[~sig], d[~sig], "o", mfc="white", color=color(j),
                label=None if sig.any() else plain(m))  # fmt: skip
    _variant_ticks(ax, x, variants)
    ax.set_ylabel("Δ CCC vs baseline")
    ax.set_title(plain(title), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncols=len(metrics), fontsize=8, loc="best")
    return fig


def learning_curves(curves: Sequence[dict[str, Any]], panels: Sequence[str], title: str) -> bytes:
    """Per-epoch curves, one panel per quantity (e.g. validation CCC mean, train loss), one
    line per variant (mean over seeds) with a shaded min-max band over seeds.

    Each curve: ``{"label", "epoch", panel: (mean, low, high)}`` for every panel in ``panels``.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(5.2 * len(panels) + 0.6, 3.8 + _legend_height(len(curves)))
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, panel in zip(axes, panels, strict=True):
        for i, c in enumerate(curves):
            x = np.asarray(c["epoch"], dtype=float)
            mean, low, high = (np.asarray(v, dtype=float) for v in c[panel])
            ax.plot(x, mean, marker="o", ms=3, lw=1.5, color=color(i), ls=line_style(i),
                    label=plain(c["label"]))  # fmt: skip
            if np.any(high > low):
                ax.fill_between(x, low, high, color=color(i), alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(plain(panel))
        ax.grid(alpha=0.3)
    _legend(fig, axes[0], len(curves))
    fig.suptitle(plain(title), fontsize=10)
    return png(fig)


def robustness_curves(curves: Sequence[dict[str, Any]], axis_label: str, title: str) -> bytes:
    """CCC against perturbation strength, one line (± std band over seeds) per model.

    Each curve: ``{"label", "x", "mean", "std"}`` (sequences of equal length).
    """
    fig = _figure(7.5, 4.2 + _legend_height(len(curves)))
    ax = fig.subplots()
    for i, c in enumerate(curves):
        x = np.asarray(c["x"], dtype=float)
        y = np.asarray(c["mean"], dtype=float)
        s = np.nan_to_num(np.asarray(c["std"], dtype=float), nan=0.0)
        ax.plot(x, y, marker="o", ms=4, lw=1.6, color=color(i), ls=line_style(i),
                label=plain(c["label"]))  # fmt: skip
        if np.any(s > 0):
            ax.fill_between(x, y - s, y + s, color=color(i), alpha=0.15, lw=0)
    ax.set_xlabel(plain(axis_label))
    ax.set_ylabel("CCC mean")
    ax.set_title(plain(title), fontsize=10)
    ax.grid(alpha=0.3)
    _legend(fig, ax, len(curves))
    return png(fig)


def step_labels(step_names: Sequence[str] | None, steps: int) -> list[str]:
    """Labels of a gate's ``steps`` steps: the fusion's step names when it names exactly that
    many (:class:`~fusionkit.core.interfaces.NamedSteps`), else ``step 0``, ``step 1``, ..."""
    if step_names is not None and len(step_names) == steps:
        return [str(n) for n in step_names]
    return [f"step {j}" for j in range(steps)]


def gate_traces(
    videos: Sequence[dict[str, Any]],
    targets: Sequence[str],
    title: str,
    step_names: Sequence[str] | None = None,
) -> bytes:
    """Per video (columns): valence/arousal prediction vs label, then each stream's gate
    weights over the recursion steps, stacked (they sum to 1 per frame for softmax gates).
    Frames the dataset flagged (e.g. ``audio unreliable``) are shaded in every panel.

    Each video: ``{"name", "pred" (N, n_targets), "target" (N, n_targets), "mask" (N,),
    "gates": {stream: (N, S)}, "flags": {name: (N,) bool}}`` (``flags`` optional).
    ``step_names``: labels of the ``S`` steps (``step j`` when None or of another length).
    """
    streams = sorted({s for v in videos for s in v["gates"]})
    flag_names = sorted({f for v in videos for f in v.get("flags", {})})
    shade = {f: color(2 + 2 * i) for i, f in enumerate(flag_names)}
    rows = len(targets) + len(streams)
    cols = len(videos)
    fig = _figure(4.2 * cols + 0.6, 1.55 * rows + 0.7)
    axes = np.atleast_2d(fig.subplots(rows, cols, sharex="col", squeeze=False))

    def flagged(ax: Any, v: dict[str, Any], t: np.ndarray) -> None:
        for f, on in v.get("flags", {}).items():
            ax.fill_between(t, 0, 1, where=on, step="mid", color=shade[f], alpha=0.18, lw=0,
                            transform=ax.get_xaxis_transform(), label=plain(f))  # fmt: skip

    for c, v in enumerate(videos):
        n = v["pred"].shape[0]
        t = np.arange(n)
        for r, name in enumerate(targets):
            ax = axes[r, c]
            flagged(ax, v, t)
            label = np.where(v["mask"], v["target"][:, r], np.nan)
            ax.plot(t, label, color="black", lw=1.2, label="label")
            ax.plot(t, v["pred"][:, r], color=color(r), lw=1.2, label="prediction")
            ax.set_ylim(-1.05, 1.05)
            ax.grid(alpha=0.3)
            if c == 0:
                ax.set_ylabel(plain(name))
            if r == 0:
                ax.set_title(plain(v["name"]), fontsize=9)
        for k, s in enumerate(streams):
            ax = axes[len(targets) + k, c]
            w = v["gates"].get(s)
            if w is None:
                ax.set_axis_off()
                continue
            steps = w.shape[1]
            names = [plain(x) for x in step_labels(step_names, steps)]
            ax.stackplot(t, w.T, colors=[color(6 + j) for j in range(steps)], labels=names,
                         alpha=0.85)  # fmt: skip
            flagged(ax, v, t)
            top = float(np.max(w.sum(1))) if w.size else 1.0
            ax.set_ylim(0, max(1.0, math.ceil(top * 10) / 10))
            if c == 0:
                ax.set_ylabel(plain(f"gate\n{s}"))
        axes[-1, c].set_xlabel("frame")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(lab, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend.keys()), fontsize=7,
                   loc="outside lower center", ncols=min(len(legend), 6))  # fmt: skip
    fig.suptitle(plain(title), fontsize=10)
    return png(fig)
