"""Rendering of a computed :class:`~fusionkit.studies.report.Report`: Markdown, a standalone
HTML page, a LaTeX table (booktabs) and CSV files; :func:`report_files` gives them all with
the plots (:mod:`fusionkit.studies.reportdir` writes them into a folder). Nothing here
computes a statistic: every number comes from the report."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import time
from typing import Any

import numpy as np

from fusionkit.studies.report import (
    ALPHA,
    Report,
    Sweep,
    fmt_params,
    metric_keys,
    significant,
)
from fusionkit.studies.stats import BootstrapResult

__all__ = [
    "delta_table",
    "latex_table",
    "markdown_table",
    "render_html",
    "render_markdown",
    "report_files",
    "results_table",
]


def _fmt(ms: tuple[float, float]) -> str:
    mean, std = ms
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The plain results table (CCC mean ± std, seeds, params, training time)."""
    if not rows:
        return "(no runs)\n"
    metric = [k for k in rows[0] if k.startswith("ccc_")]
    head = ["variant", *(k.replace("ccc_", "CCC ") for k in metric), "seeds", "params", "train s"]
    body = [
        [
            r["variant"],
            *(_fmt(r[k]) for k in metric),
            str(len(r["seeds"])),
            f"{r['params']:,}" if r["params"] else "",
            f"{r['train_seconds']:.0f}",
        ]
        for r in rows
    ]
    return _md(head, body)


def _md(head: list[str], body: list[list[str]]) -> str:
    def esc(c: str) -> str:
        """Keep a cell one cell and its text as written: escape pipes (also in code spans,
        as GFM tables need), no line breaks, and outside code spans no HTML tags, emphasis
        stars or stray backticks."""
        c = c.replace("|", "\\|").replace("\n", " ")
        if c.startswith("`"):
            return c
        c = re.sub(r"([*`])", r"\\\1", c)
        return re.sub(r"<(?=[A-Za-z/!?])", r"\\<", c)

    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _md_code(text: str) -> str:
    """``text`` as a Markdown code span (nothing in it is read as markup)."""
    text = str(text).replace("\n", " ")
    ticks = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (ticks + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def flag_gate_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    """Header and body of the gate-weights-on-flagged-frames table."""
    head = ["variant", "stream", "flag", "flagged frames", "runs", "weights flagged",
            "weights elsewhere"]  # fmt: skip
    body = [
        [
            g.variant,
            g.stream,
            g.flag,
            f"{100 * g.frames_flagged:.0f} %",
            str(g.runs),
            ", ".join(f"{n} {x:.2f}" for n, x in zip(g.steps, g.inside, strict=True)),
            ", ".join(f"{n} {x:.2f}" for n, x in zip(g.steps, g.outside, strict=True)),
        ]
        for g in rep.flag_gates
    ]
    return head, body


FLAG_GATE_TEXT = (
    "Mean gate weight of each step on the frames the dataset flags and on the other frames "
    "(every frame of the split, mean over the seeds): a gate that reacts to the flagged "
    "condition moves weight between its steps there."
)


# ------------------------------------------------------------------------------- rendering


def results_table(rep: Report) -> str:
    """The main table (CCC, Δ of the mean with interval and p, cost) as Markdown."""
    return _md(*_main_table(rep))


def delta_table(rep: Report) -> str:
    """The per-target differences from the baseline as Markdown."""
    return _md(*_delta_table(rep))


DAGGER = "†"


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _short(key: str) -> str:
    return key.replace("ccc_", "CCC ")


def _delta_cells(row: dict[str, Any], col: int) -> tuple[str, str, str]:
    """``(Δ [interval], p, Holm p with † when significant)`` of one metric."""
    d = row["delta"]
    if d is None:
        return "(baseline)", "", ""
    if isinstance(d, str):
        return f"n/a: {d}", "n/a", "n/a"
    why = d.undefined(col)
    if why is not None:
        return f"n/a: {why}", "n/a", "n/a"
    interval = f"{_signed(d.delta[col])} [{_signed(d.ci_low[col])}, {_signed(d.ci_high[col])}]"
    adj = row["p_holm"][col]
    return interval, _p(d.p_value[col]), _p(adj) + (f" {DAGGER}" if adj < ALPHA else "")


def _seeds_cell(row: dict[str, Any]) -> str:
    n, missing = len(row["seeds"]), len(row.get("left_out", []))
    return f"{n} of {n + missing}" if missing else str(n)


def _main_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    keys = metric_keys(rep.targets)
    head = [
        "variant",
        "seeds",
        *(_short(k) for k in keys),
        f"Δ {_short(keys[-1])} vs {rep.baseline} [95% CI]",
        "p",
        "p Holm",
        "params",
        "train s",
        "frames/s",
    ]
    body = []
    for r in rep.rows:
        tp = r["throughput"]
        body.append(
            [
                r["variant"],
                _seeds_cell(r),
                *(_fmt(r[k]) + (f" {DAGGER}" if significant(r, j) else "")
                  for j, k in enumerate(keys)),
                *_delta_cells(r, len(keys) - 1),
                f"{r['params']:,}" if r["params"] else "",
                f"{r['train_seconds']:.0f}",
                f"{tp['frames_per_second']:,.0f}" if tp else "",
            ]
        )  # fmt: skip
    return head, body


def _delta_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    keys = metric_keys(rep.targets)
    head = ["variant"]
    for k in keys:
        head += [f"Δ {_short(k)} [95% CI]", "p", "p Holm"]
    body = []
    for r in rep.rows:
        if r["delta"] is None:
            continue
        cells = [r["variant"]]
        for j in range(len(keys)):
            cells += list(_delta_cells(r, j))
        body.append(cells)
    return head, body


def _components_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    kinds = list(dict.fromkeys(k for r in rep.rows for k in r["components"]))
    head = ["variant", *kinds]
    body = [[r["variant"], *(", ".join(r["components"].get(k, [])) for k in kinds)]
            for r in rep.rows]  # fmt: skip
    return head, body


def _excluded_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    head = ["run", "variant", "status", "reason"]
    return head, [[e.where, e.variant, e.status, e.detail] for e in rep.excluded]


def _md_excluded(rep: Report) -> str:
    """The left-out runs as Markdown (paths and messages as code: no markup)."""
    head, body = _excluded_table(rep)
    return _md(head, [[_md_code(w), v, s, _md_code(d)] for w, v, s, d in body])


def _sweep_table(sw: Sweep) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "runs", "AUC (mean ± std)", *(f"{sw.axis}={v}" for v in sw.values)]
    body = [
        [
            c.variant,
            str(c.runs),
            _fmt(c.auc),
            *(f"{m:.3f}" for m in c.mean["ccc_mean"]),
        ]
        for c in sw.curves
    ]
    return head, body


def _definitions(rep: Report) -> list[str]:
    return [
        "CCC: the ABAW metric, one CCC per target over all labelled frames of the split pooled "
        "(population moments), and their mean; `mean ± std` over the seeds of a variant "
        "(sample std, ddof = 1), read from each run's `metrics.json`. Only complete runs "
        "(`run.json` status complete) are used; `seeds` reads `2 of 3` when grid points of the "
        "variant are left out (listed under Runs left out).",
        f"Δ: difference of the seed-averaged CCC from the baseline `{rep.baseline}`, per target "
        f"and for the mean. Significance: paired bootstrap over the {rep.split} videos "
        f"({rep.n_boot} resamples, seed {rep.boot_seed}): each resample draws the split's "
        "videos with replacement and recomputes the pooled CCC of every run of both variants "
        "on the same videos; the interval is the 2.5-97.5 percentile interval of the resampled "
        "Δ and p the two-sided bootstrap p-value (2 × the smaller tail beyond 0, add-one "
        "corrected). It measures sensitivity to the choice of test videos, not to the training "
        "seed (see the ± std). The test is only made when every compared run was evaluated on "
        "the same data (equal data fingerprints of the split in `metrics.json` and the "
        "predictions file); otherwise the row reads `n/a` with the reason. A resample where a "
        "target's CCC is undefined (0/0: constant prediction and label) is left out of that "
        "target's test only.",
        "p Holm: the p-values adjusted with Holm's step-down procedure over the variants "
        "compared with the baseline, separately for each metric; "
        f"{DAGGER} marks Holm p < {ALPHA} (two-sided: better or worse than the baseline).",
        "params: trainable parameters; train s: training time (mean over seeds) as recorded in "
        f"`metrics.json`; {rep.throughput_note}.",
        "CCC plot: the y axis is zoomed on the values and does not start at 0. Δ plot: the "
        "point estimate and 95% interval per metric; filled markers are significant after the "
        "Holm correction.",
        "Learning curves: per epoch, the mean over a variant's seeds (line) and their min-max "
        "(band) of the validation CCC mean and the training loss, from each run's "
        "`metrics.json` history; with early stopping, later epochs average fewer runs.",
        "Components: each component of the variant's runs, with the plugin distribution and "
        "version that provided it (from `run.json`).",
        "Robustness AUC: area under the CCC-mean-versus-strength curve with the strength axis "
        "rescaled to [0, 1] (trapezoid rule), i.e. the curve's average CCC; computed per run, "
        "then mean ± std over seeds. Curves show the mean over seeds with a ± std band.",
        "Gate plots: the first seed's run of each gated variant (models whose gate weights "
        "change over frames); top rows: label (black) and prediction per target; lower rows: "
        "each stream's per-frame weights over the recursion steps (step 0 = the unfused input).",
    ]


def _title_names(rep: Report) -> str:
    return ", ".join(dict.fromkeys(r["runs"][0].name for r in rep.rows))


def render_markdown(rep: Report) -> str:
    """The whole report as Markdown (figures linked from ``plots/``)."""
    out = [f"# Comparison report: {_title_names(rep)}", ""]
    out.append(
        f"Split `{rep.split}`, {sum(len(r['runs']) for r in rep.rows)} runs from "
        f"{', '.join(_md_code(s) for s in rep.sources)}."
    )
    if rep.command:
        out += ["", f"Generated with {_md_code(rep.command)}."]
    out += ["", "## Results", "", results_table(rep)]
    out += [f"![{rep.plot_titles['ccc']}](plots/ccc.png)", ""]
    if rep.excluded:
        out += ["## Runs left out", "", "Not in any number of this report:", ""]
        out += [_md_excluded(rep)]
    if any(r["delta"] is not None for r in rep.rows):
        out += [f"## Differences from the baseline `{rep.baseline}`", "", delta_table(rep)]
        if "delta" in rep.plots:
            out += [f"![{rep.plot_titles['delta']}](plots/delta.png)", ""]
    if "curves" in rep.plots:
        out += ["## Learning curves", ""]
        out += [f"![{rep.plot_titles['curves']}](plots/curves.png)", ""]
    if any(r["components"] for r in rep.rows):
        out += ["## Components", "", _md(*_components_table(rep))]
    for sw in rep.sweeps:
        key = f"robustness_{sw.slug}"
        out += [f"## Robustness: {sw.key}", ""]
        fixed = ", ".join(f"`{fmt_params({k: v})}`" for k, v in sw.params.items()) or "none"
        out.append(
            f"Perturbation `{sw.perturbation}` (fixed params: {fixed}; seed {sw.seed}) swept "
            f"over `{sw.axis}` on `{sw.split}`; cells are CCC mean (mean over seeds)."
        )
        if sw.dropped:
            out.append(f"Values missing in some runs and left out: {sw.dropped}.")
        out.append("")
        h, b = _sweep_table(sw)
        out += [_md(h, b), f"![{rep.plot_titles[key]}](plots/{key}.png)", ""]
    if rep.gates:
        out += ["## Gate weights over time", ""]
        if rep.flag_gates:
            out += [FLAG_GATE_TEXT, "", _md(*flag_gate_table(rep)), ""]
        out += [f"![{rep.plot_titles[g]}](plots/{g}.png)\n" for g in rep.gates]
    out += ["## How to read this report", ""]
    out += [f"- {d}" for d in _definitions(rep)]
    if rep.notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1180px;padding:0 1rem;color:#1b1f24;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;
border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:right;white-space:nowrap}
th{background:#f3f5f7}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
img{max-width:100%;height:auto;display:block;margin:.6rem 0;border:1px solid #eaeef2}
.meta{color:#57606a;font-size:.9rem}code{background:#f3f5f7;padding:0 .25rem;border-radius:3px}
ul.defs li{margin:.3rem 0;font-size:.9rem}
"""


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{rows}</tbody></table>"


def _img(rep: Report, key: str) -> str:
    data = base64.b64encode(rep.plots[key]).decode("ascii")
    alt = html.escape(rep.plot_titles.get(key, key))
    return f'<img alt="{alt}" src="data:image/png;base64,{data}">'


def _code(text: str) -> str:
    """Escape text and turn `backticks` into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_sections(rep: Report) -> list[str]:
    """The HTML of the sections after the results table (same order as the Markdown)."""
    parts: list[str] = []
    if rep.excluded:
        parts += ["<h2>Runs left out</h2><p>Not in any number of this report:</p>"]
        parts.append(_html_table(*_excluded_table(rep)))
    if any(r["delta"] is not None for r in rep.rows):
        parts.append(f"<h2>Differences from the baseline {html.escape(str(rep.baseline))}</h2>")
        parts.append(_html_table(*_delta_table(rep)))
        parts += [_img(rep, "delta")] if "delta" in rep.plots else []
    if "curves" in rep.plots:
        parts += ["<h2>Learning curves</h2>", _img(rep, "curves")]
    if any(r["components"] for r in rep.rows):
        parts += ["<h2>Components</h2>", _html_table(*_components_table(rep))]
    for sw in rep.sweeps:
        fixed = fmt_params(sw.params) or "none"
        parts += [
            f"<h2>Robustness: {html.escape(sw.key)}</h2>",
            f'<p class="meta">Perturbation <code>{html.escape(sw.perturbation)}</code> '
            f"(fixed params: {html.escape(fixed)}; seed {sw.seed}) swept over "
            f"<code>{html.escape(sw.axis)}</code> on <code>{html.escape(sw.split)}</code>; "
            "cells are CCC mean (mean over seeds).</p>",
            _html_table(*_sweep_table(sw)),
            _img(rep, f"robustness_{sw.slug}"),
        ]
    if rep.gates:
        parts.append("<h2>Gate weights over time</h2>")
        if rep.flag_gates:
            parts += [f"<p>{html.escape(FLAG_GATE_TEXT)}</p>", _html_table(*flag_gate_table(rep))]
        parts += [_img(rep, g) for g in rep.gates]
    return parts


def render_html(rep: Report) -> str:
    """The whole report as one standalone HTML page (inline CSS, figures embedded)."""
    names = _title_names(rep)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fusionkit report: {html.escape(names)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Comparison report: {html.escape(names)}</h1>",
        f'<p class="meta">Split <code>{html.escape(rep.split)}</code>, '
        f"{sum(len(r['runs']) for r in rep.rows)} runs from "
        + ", ".join(f"<code>{html.escape(s)}</code>" for s in rep.sources)
        + (f". Generated with <code>{html.escape(rep.command)}</code>" if rep.command else "")
        + f" on {time.strftime('%Y-%m-%d')}.</p>",
        "<h2>Results</h2>",
        _html_table(*_main_table(rep)),
        _img(rep, "ccc"),
        *_html_sections(rep),
        "<h2>How to read this report</h2><ul class='defs'>",
        *(f"<li>{_code(d)}</li>" for d in _definitions(rep)),
        "</ul>",
    ]
    if rep.notes:
        parts.append("<p>Notes:</p><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in rep.notes))
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------- LaTeX

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    # with LaTeX's default font encoding these print as other glyphs (an em dash, ¡ and ¿)
    "|": r"\textbar{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
}


def latex_escape(text: str) -> str:
    """``text`` as literal LaTeX text (the ten special characters escaped)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_comment(text: str) -> str:
    return "% " + " ".join(str(text).split())


def _latex_params(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "--"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else str(int(n))


def _latex_signed(x: float) -> str:
    return f"${x:+.3f}$"


def best_rows(rep: Report) -> dict[str, set[str]]:
    """Per CCC column, the variants shown in bold: the highest mean at the table's precision
    (3 decimals; ties are all bold), among the rows evaluated on the baseline's data (none
    when fewer than two rows are)."""
    out: dict[str, set[str]] = {k: set() for k in metric_keys(rep.targets)}
    eligible = [r for r in rep.rows if r.get("same_data", True)]
    if len(eligible) < 2:
        return out
    for k in metric_keys(rep.targets):
        shown = {r["variant"]: round(r[k][0], 3) for r in eligible if math.isfinite(r[k][0])}
        top = max(shown.values(), default=None)
        out[k] = {v for v, x in shown.items() if x == top}
    return out


def _latex_num(x: float) -> str:
    """``-0.050`` -> ``$-$0.050`` (a minus sign, not a hyphen)."""
    return f"{x:.3f}".replace("-", "$-$")


def _latex_ccc(ms: tuple[float, float], bold: bool, mark: bool) -> str:
    mean, std = ms
    if not math.isfinite(mean):
        return "n/a"
    cell = rf"\textbf{{{_latex_num(mean)}}}" if bold else _latex_num(mean)
    if math.isfinite(std):
        cell += rf" $\pm$ {std:.3f}"
    return cell + (r"$^{\dagger}$" if mark else "")


def _latex_delta(row: dict[str, Any], col: int) -> str:
    d = row["delta"]
    if d is None:
        return "--"
    if isinstance(d, str) or not math.isfinite(d.delta[col]):
        return "n/a"
    return _latex_signed(float(d.delta[col])) + (r"$^{\dagger}$" if significant(row, col) else "")


def latex_table(rep: Report) -> str:
    """A booktabs ``tabular`` (for ``\\input``): CCC per target and mean (mean ± std over
    seeds, best per column in bold, † where the Holm-adjusted paired-bootstrap p against the
    baseline is below :data:`ALPHA`), Δ of the last metric and parameters."""
    keys = metric_keys(rep.targets)
    best = best_rows(rep)
    names = {k: latex_escape(k.replace("ccc_", "").capitalize()) for k in keys}
    lines = [
        _latex_comment(f"fusionkit report: CCC on {rep.split}; needs \\usepackage{{booktabs}}"),
        _latex_comment(f"command: {rep.command}") if rep.command else "",
        "\\begin{tabular}{l" + "c" * (len(keys) + 1) + "r}",
        "\\toprule",
        " & ".join(["Variant", *names.values(), f"$\\Delta$ {names[keys[-1]]}", "Params"]) + r" \\",
        "\\midrule",
    ]
    for r in rep.rows:
        other_data = r["delta"] is not None and not r.get("same_data", True)
        cells = [latex_escape(r["variant"]) + (r"$^{\ddagger}$" if other_data else "")]
        cells += [
            _latex_ccc(r[k], r["variant"] in best[k], significant(r, j)) for j, k in enumerate(keys)
        ]
        cells += [_latex_delta(r, len(keys) - 1), _latex_params(r["params"])]
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [_latex_comment(line) for line in _latex_caption(rep)]
    return "\n".join(x for x in lines if x) + "\n"


def _latex_caption(rep: Report) -> list[str]:
    """Suggested caption text (written as comments below the table)."""
    refused = [r["variant"] for r in rep.rows if isinstance(r["delta"], str)]
    out = [
        f"Caption: CCC on the {rep.split} split, mean $\\pm$ std over seeds; bold: best per "
        f"column; $\\Delta$: difference from {latex_escape(str(rep.baseline))}; "
        f"$^\\dagger$: p < {ALPHA} in a two-sided paired bootstrap over test videos "
        f"({rep.n_boot} resamples), Holm-corrected over the variants compared with the baseline.",
    ]
    if any(not r.get("same_data", True) for r in rep.rows):
        out.append(
            "$^\\ddagger$: evaluated on different data than the baseline (the data "
            "fingerprints differ): not comparable, no test."
        )
    if refused:
        out.append(
            "n/a: no paired test ("
            + ", ".join(latex_escape(v) for v in refused)
            + "): "
            + "; ".join(str(r["delta"]) for r in rep.rows if isinstance(r["delta"], str))
        )
    return out


# ------------------------------------------------------------------------------------ CSV


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def _num(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return ""
    if isinstance(x, (np.floating, np.integer)):
        return _num(x.item())
    return x


def _delta_record(r: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """The Δ columns of one ``summary.csv`` row (empty without a paired test)."""
    d = r["delta"]
    ok = isinstance(d, BootstrapResult)
    rec: dict[str, Any] = {}
    for j, k in enumerate(keys):
        rec[f"delta_{k}"] = _num(d.delta[j]) if ok else ""
        rec[f"delta_{k}_ci_low"] = _num(d.ci_low[j]) if ok else ""
        rec[f"delta_{k}_ci_high"] = _num(d.ci_high[j]) if ok else ""
        rec[f"delta_{k}_p"] = _num(d.p_value[j]) if ok else ""
        rec[f"delta_{k}_p_holm"] = _num(r["p_holm"][j]) if ok else ""
        rec[f"delta_{k}_significant"] = significant(r, j) if ok else ""
        rec[f"delta_{k}_resamples"] = int(d.n_used[j]) if ok else ""
    within = r.get("within_seed_spread")
    rec[f"delta_{keys[-1]}_within_seed_spread"] = "" if within is None else within
    undefined = [f"{k}: {why}" for j, k in enumerate(keys) if ok and (why := d.undefined(j))]
    rec["paired_test"] = (
        ("ok" if not undefined else "n/a for " + "; ".join(undefined))
        if ok
        else ("baseline" if d is None else f"n/a: {d}")
    )
    return rec


def summary_records(rep: Report) -> list[dict[str, Any]]:
    """The rows of ``summary.csv``: one per variant, full precision."""
    keys = metric_keys(rep.targets)
    out = []
    for r in rep.rows:
        rec: dict[str, Any] = {"variant": r["variant"], "n_seeds": len(r["seeds"])}
        rec["seeds"] = " ".join(map(str, r["seeds"]))
        rec["runs_left_out"] = len(r.get("left_out", []))
        for k in keys:
            rec[f"{k}_mean"], rec[f"{k}_std"] = map(_num, r[k])
        rec.update(_delta_record(r, keys))
        rec["baseline"] = rep.baseline_of.get(r["variant"], rep.baseline)
        rec["same_data_as_baseline"] = r.get("same_data", "")
        rec["params"] = r["params"]
        rec["train_seconds_mean"] = r["train_seconds"]
        rec["epochs_mean"] = r["epochs"]
        tp = r["throughput"]
        rec["frames_per_second"] = tp["frames_per_second"] if tp else ""
        for sw in rep.sweeps:
            c = next((c for c in sw.curves if c.variant == r["variant"]), None)
            rec[f"auc_{sw.key}_mean"] = _num(c.auc[0]) if c else ""
            rec[f"auc_{sw.key}_std"] = _num(c.auc[1]) if c else ""
        rec["components"] = "; ".join(
            f"{kind}: {', '.join(labels)}" for kind, labels in r.get("components", {}).items()
        )
        out.append(rec)
    return out


def run_records(rep: Report) -> list[dict[str, Any]]:
    """The rows of ``runs.csv``: one per run, the values of its ``metrics.json``."""
    out = []
    for r in rep.rows:
        for run in r["runs"]:
            m = run.metrics
            rec = {"variant": r["variant"], "seed": run.seed, "run_dir": str(run.run_dir)}
            rec.update({k: v for k, v in m["splits"][rep.split].items()})
            rec.update(
                {
                    "parameters": m.get("parameters"),
                    "train_seconds": m.get("train_seconds"),
                    "epochs_run": m.get("epochs_run"),
                    "best_epoch": m.get("best_epoch"),
                    "data_fingerprint": run.fingerprint(rep.split) or "",
                }
            )
            out.append(rec)
    return out


def curve_records(rep: Report) -> list[dict[str, Any]]:
    """The rows of ``curves.csv``: one per variant and epoch, mean/min/max over seeds."""
    out = []
    for c in rep.curves:
        for i, epoch in enumerate(c.epochs):
            rec: dict[str, Any] = {"variant": c.variant, "epoch": epoch, "runs": c.runs[i]}
            for k, s in c.stats.items():
                for stat in ("mean", "min", "max"):
                    rec[f"{k}_{stat}"] = _num(s[stat][i])
            out.append(rec)
    return out


def robustness_records(rep: Report) -> list[dict[str, Any]]:
    """The rows of ``robustness.csv``: one per sweep, variant and value."""
    out = []
    for sw in rep.sweeps:
        for c in sw.curves:
            for i, v in enumerate(c.x):
                rec: dict[str, Any] = {
                    "sweep": sw.key,
                    "perturbation": sw.perturbation,
                    "params": json.dumps(sw.params, sort_keys=True),
                    "seed": sw.seed,
                    "split": sw.split,
                    "axis": sw.axis,
                    "value": v,
                    "variant": c.variant,
                    "runs": c.runs,
                }
                for k in c.mean:
                    rec[f"{k}_mean"] = _num(c.mean[k][i])
                    rec[f"{k}_std"] = _num(c.std[k][i])
                out.append(rec)
    return out


def report_files(rep: Report, html_page: bool = True) -> dict[str, bytes]:
    """Every file of the report by its path in the report folder: ``report.md``,
    ``report.html``, ``table.tex``, ``summary.csv``, ``runs.csv``, ``curves.csv``,
    ``robustness.csv``, ``gate_flags.csv`` (those with content) and ``plots/*.png``."""
    contents = {f"plots/{key}.png": png for key, png in rep.plots.items()}
    files = {
        "report.md": render_markdown(rep),
        "table.tex": latex_table(rep),
        "summary.csv": _csv(summary_records(rep)),
        "runs.csv": _csv(run_records(rep)),
    }
    if rep.curves:
        files["curves.csv"] = _csv(curve_records(rep))
    if rep.sweeps:
        files["robustness.csv"] = _csv(robustness_records(rep))
    if rep.flag_gates:
        files["gate_flags.csv"] = _csv(
            [
                {
                    "variant": g.variant,
                    "stream": g.stream,
                    "flag": g.flag,
                    "step": n,
                    "weight_flagged": a,
                    "weight_elsewhere": b,
                    "frames_flagged": g.frames_flagged,
                    "runs": g.runs,
                }
                for g in rep.flag_gates
                for n, a, b in zip(g.steps, g.inside, g.outside, strict=True)
            ]
        )
    if html_page:
        files["report.html"] = render_html(rep)
    contents.update({name: text.encode("utf-8") for name, text in files.items()})
    return contents
