"""Comparison reports from finished runs: tables, significance, robustness curves, cost and
gate plots, written as Markdown, a standalone HTML page and CSV.

Runs are found under the given directories (a grid directory, a run directory, or a parent of
several). Runs that differ only in ``training.seed`` form one *variant* (one row). Per split:

* CCC per target and their mean as ``mean ± std`` (sample std, ddof = 1) over the seeds,
  read from each run's ``metrics.json``;
* ``Δ`` versus a baseline variant with a paired bootstrap over the split's videos
  (:mod:`fusionkit.studies.stats`), from ``predictions/<split>.safetensors``;
* cost: parameters (``metrics.json``), training time (mean over seeds of ``train_seconds``),
  inference throughput (:func:`fusionkit.studies.robustness.measure_throughput`, measured when the
  report is made and cached in each run's ``throughput.json``);
* robustness curves (``robustness/*.json``) with an area-under-curve score;
* for gated models, the gate's step weights over time next to the valence/arousal traces.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fusionkit.core.errors import CheckpointError, FusionkitError
from fusionkit.studies.stats import BootstrapResult, auc_normalised, paired_bootstrap, video_sums

__all__ = [
    "Report",
    "RunRecord",
    "build_report",
    "collect_runs",
    "markdown_table",
    "results_table",
    "summarize",
    "write_report",
]

SEED_AXIS = "training.seed"
VARIANT_AXIS = "variant"


@dataclass
class RunRecord:
    """One finished run as the report sees it."""

    run_dir: Path
    name: str
    values: dict[str, Any]
    seed: int
    metrics: dict[str, Any]
    targets: list[str]
    order: tuple[str, int] = ("", 0)
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """Row label: the variant name and the non-seed sweep values, or the grid/run name."""
        extra = [
            f"{k.split('.')[-1]}={v}"
            for k, v in self.values.items()
            if k not in (SEED_AXIS, VARIANT_AXIS)
        ]
        if VARIANT_AXIS in self.values:
            head = str(self.values[VARIANT_AXIS])
            return head + (f" ({', '.join(extra)})" if extra else "")
        return self.name + (f" ({', '.join(extra)})" if extra else "")


def _grid_entry(run_dir: Path) -> tuple[str | None, dict[str, Any], int]:
    grid = run_dir.parent / "grid.json"
    if grid.is_file():
        rec = json.loads(grid.read_text())
        runs = rec.get("runs", {})
        order = rec.get("order") or list(runs)  # grid.json keys are sorted; "order" is not
        if run_dir.name in runs:
            index = order.index(run_dir.name) if run_dir.name in order else len(order)
            return rec.get("name"), runs[run_dir.name]["values"], index
    return None, {}, 0


def collect_runs(paths: list[Path]) -> list[RunRecord]:
    """Every finished run (a folder with ``metrics.json`` and ``recipe.yaml``) under ``paths``,
    in grid order (the order of ``variants`` and sweep values), each run once."""
    found: dict[Path, RunRecord] = {}
    for root in paths:
        if not root.exists():
            raise CheckpointError(f"not found: {root}")
        for mfile in sorted(root.rglob("metrics.json")):
            run_dir = mfile.parent
            rfile = run_dir / "recipe.yaml"
            if not rfile.is_file() or run_dir.resolve() in found:
                continue
            recipe = yaml.safe_load(rfile.read_text())
            grid_name, values, index = _grid_entry(run_dir)
            found[run_dir.resolve()] = RunRecord(
                run_dir=run_dir,
                name=grid_name or recipe.get("name") or run_dir.name,
                values=values,
                seed=int(recipe["training"]["seed"]),
                metrics=json.loads(mfile.read_text()),
                targets=list(recipe["model"]["targets"]),
                order=(str(run_dir.parent.resolve()), index),
                recipe=recipe,
            )
    if not found:
        raise CheckpointError(f"no finished runs (metrics.json) under {', '.join(map(str, paths))}")
    return sorted(found.values(), key=lambda r: r.order)


def _mean_std(xs: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return mean, std


def metric_keys(targets: list[str]) -> list[str]:
    keys = [f"ccc_{t}" for t in targets]
    return [*keys, "ccc_mean"] if len(targets) > 1 else keys


def summarize(runs: list[RunRecord], split: str) -> list[dict[str, Any]]:
    """One row per variant, in grid order: ``{"variant", "seeds", "runs", "ccc_<t>": (mean,
    std), ..., "params", "train_seconds"}`` (``train_seconds`` is the mean over seeds).

    A label whose runs repeat a seed (the same variant name in two grids, or two runs of one
    recipe) is split into one row per grid (``<grid dir>/<variant>``) or run directory."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        if split in r.metrics.get("splits", {}):
            groups.setdefault(r.variant, []).append(r)
    for label, members in list(groups.items()):
        seeds = [m.seed for m in members]
        if len(set(seeds)) < len(seeds):  # e.g. the same variant name in two grids: split up
            del groups[label]
            for m in members:
                where = f"{m.run_dir.parent.name}/{label}" if m.values else m.run_dir.name
                groups.setdefault(where, []).append(m)
    rows = []
    for variant, members in sorted(groups.items(), key=lambda kv: min(m.order for m in kv[1])):
        members.sort(key=lambda m: m.seed)
        row: dict[str, Any] = {
            "variant": variant,
            "seeds": [m.seed for m in members],
            "runs": members,
        }
        for k in metric_keys(members[0].targets):
            row[k] = _mean_std([m.metrics["splits"][split][k] for m in members])
        row["params"] = members[0].metrics.get("parameters")
        row["train_seconds"] = statistics.fmean(
            m.metrics.get("train_seconds", 0.0) for m in members
        )
        row["epochs"] = statistics.fmean(m.metrics.get("epochs_run", 0) for m in members)
        rows.append(row)
    return rows


def _fmt(ms: tuple[float, float]) -> str:
    mean, std = ms
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
        return c.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- predictions


def _load_predictions(run_dir: Path, split: str) -> dict[str, Any] | None:
    from fusionkit.engine.files import load_tensors

    path = run_dir / "predictions" / f"{split}.safetensors"
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    videos = json.loads(meta.get("videos", "[]"))
    out: dict[str, Any] = {"videos": videos, "targets": json.loads(meta.get("targets", "[]"))}
    for name in videos:
        gates = {
            k.split("/")[1]: tensors[k].float().numpy()
            for k in tensors
            if k.startswith("gate/") and k.endswith(f"/{name}") and k.count("/") == 2
        }
        out[name] = {
            "pred": tensors[f"pred/{name}"].double().numpy(),
            "target": tensors[f"target/{name}"].double().numpy(),
            "mask": tensors[f"label_mask/{name}"].bool().numpy(),
            "gates": gates,
        }
    return out


def _run_sums(run: RunRecord, split: str, cache: dict) -> tuple[list[str], np.ndarray] | None:
    key = (run.run_dir, split)
    if key not in cache:
        preds = _load_predictions(run.run_dir, split)
        if preds is None:
            cache[key] = None
        else:
            names = list(preds["videos"])
            sums = np.stack(
                [video_sums(preds[n]["pred"], preds[n]["target"], preds[n]["mask"]) for n in names]
            )
            cache[key] = (names, sums)
    return cache[key]


def compare(
    row: dict[str, Any], base: dict[str, Any], split: str, n_boot: int, seed: int, cache: dict
) -> BootstrapResult | str:
    """Paired bootstrap of ``row`` against ``base``, or the reason it cannot be done."""
    a = [_run_sums(r, split, cache) for r in row["runs"]]
    b = [_run_sums(r, split, cache) for r in base["runs"]]
    if any(x is None for x in (*a, *b)):
        return f"no predictions/{split}.safetensors in some runs"
    names = {tuple(x[0]) for x in (*a, *b)}  # type: ignore[index]
    if len(names) != 1:
        return "the runs were evaluated on different videos"
    return paired_bootstrap(
        [x[1] for x in a],  # type: ignore[index]
        [x[1] for x in b],  # type: ignore[index]
        n_boot=n_boot,
        seed=seed,
    )


# ------------------------------------------------------------------------------ robustness


@dataclass
class Curve:
    """One variant's curve of a robustness sweep (mean and std over its runs)."""

    variant: str
    x: list[Any]
    mean: dict[str, list[float]]
    std: dict[str, list[float]]
    auc: tuple[float, float]
    runs: int


@dataclass
class Sweep:
    """One robustness sweep across variants."""

    label: str
    perturbation: str
    params: dict[str, Any]
    axis: str
    seed: int
    split: str
    values: list[Any]
    curves: list[Curve] = field(default_factory=list)
    dropped: list[Any] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.label)


def _sort_values(values: list[Any]) -> list[Any]:
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return sorted(values)
    return values


def robustness_sweeps(rows: list[dict[str, Any]], split: str) -> list[Sweep]:
    """Group every run's ``robustness/*.json`` by sweep and variant (values present in all
    runs of the sweep; curves are mean ± std over a variant's runs)."""
    from fusionkit.studies.robustness import read_robustness, value_key

    found: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        for run in row["runs"]:
            for rec in read_robustness(run.run_dir):
                results = rec.get("results", {})
                use = split if split in results else next(iter(sorted(results)), None)
                if use is None:
                    continue
                key = (
                    rec["name"],
                    rec["perturbation"],
                    json.dumps(rec["params"], sort_keys=True),
                    rec["axis"],
                    rec["seed"],
                    use,
                )
                entry = found.setdefault(key, {"header": rec, "split": use, "by": {}})
                entry["by"].setdefault(row["variant"], []).append(results[use])
    declared: list[str] = []  # sweeps in the order the recipes declare them, then the rest
    for row in rows:
        for run in row["runs"]:
            for spec in run.recipe.get("evaluation", {}).get("robustness", []) or []:
                name = spec.get("name") or f"{spec['perturbation']}_{spec['axis']}"
                if name not in declared:
                    declared.append(name)
    sweeps = []
    for (label, pert, _p, axis, seed, use), entry in sorted(
        found.items(),
        key=lambda kv: (declared.index(kv[0][0]) if kv[0][0] in declared else len(declared),
                        kv[0][0]),
    ):  # fmt: skip
        per_run = [r for runs in entry["by"].values() for r in runs]
        keys = set.intersection(*(set(r) for r in per_run))
        every = {k for r in per_run for k in r}
        values = _sort_values([per_run[0][k]["value"] for k in keys])
        dropped = _sort_values([json.loads(k) for k in every - keys])
        sweep = Sweep(label, pert, entry["header"]["params"], axis, seed, use, values, [], dropped)
        for variant, runs in entry["by"].items():
            targets = [k for k in runs[0][value_key(values[0])]["metrics"] if k.startswith("ccc_")]
            mean: dict[str, list[float]] = {k: [] for k in targets}
            std: dict[str, list[float]] = {k: [] for k in targets}
            for v in values:
                for k in targets:
                    m, s = _mean_std([r[value_key(v)]["metrics"][k] for r in runs])
                    mean[k].append(m)
                    std[k].append(s)
            aucs = [
                auc_normalised(values, [r[value_key(v)]["metrics"]["ccc_mean"] for v in values])
                for r in runs
            ]
            sweep.curves.append(Curve(variant, values, mean, std, _mean_std(aucs), len(runs)))
        sweeps.append(sweep)
    return sweeps


# ---------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything a report shows; :func:`write_report` renders it."""

    split: str
    baseline: str | None
    rows: list[dict[str, Any]]
    targets: list[str]
    sweeps: list[Sweep]
    plots: dict[str, bytes]
    plot_titles: dict[str, str]
    gates: list[str]
    n_boot: int
    boot_seed: int
    throughput_note: str
    sources: list[str]
    command: str = ""
    notes: list[str] = field(default_factory=list)


def _is_gated(preds: dict[str, Any]) -> bool:
    """Whether some stream's step weights have several steps and vary across frames."""
    for name in preds["videos"]:
        for w in preds[name]["gates"].values():
            if w.shape[1] > 1 and w.shape[0] > 1 and float(w.std(axis=0).max()) > 1e-4:
                return True
    return False


def _pick_videos(preds: dict[str, Any], k: int) -> list[str]:
    """The ``k`` longest videos (ties by name): more time for the gate to move."""
    names = sorted(preds["videos"], key=lambda n: (-preds[n]["pred"].shape[0], n))
    return sorted(names[:k])


def build_report(
    paths: list[Path],
    split: str = "test",
    baseline: str | None = None,
    n_boot: int = 2000,
    boot_seed: int = 0,
    gate_videos: int = 3,
    throughput: bool = True,
    registry: Any = None,
    remeasure: bool = False,
) -> Report:
    """Collect runs and compute every table and figure of a report."""
    from fusionkit.studies import plots
    from fusionkit.studies.robustness import THROUGHPUT_FILE, measure_throughput

    runs = collect_runs(paths)
    rows = summarize(runs, split)
    if not rows:
        have = sorted({s for r in runs for s in r.metrics.get("splits", {})})
        raise FusionkitError(
            f"no run has metrics for split {split!r}; the runs have: {', '.join(have)} "
            "(choose one with --split)"
        )
    labels = [r["variant"] for r in rows]
    if baseline is None:
        baseline = labels[0]
    elif baseline not in labels:
        raise FusionkitError(
            f"--baseline {baseline!r} is not a variant of these runs; variants: {', '.join(labels)}"
        )
    targets = rows[0]["runs"][0].targets
    cache: dict = {}
    base = rows[labels.index(baseline)]
    notes: list[str] = []
    for row in rows:
        row["delta"] = None if row is base else compare(row, base, split, n_boot, boot_seed, cache)
        if isinstance(row["delta"], str):
            notes.append(f"{row['variant']}: no significance test ({row['delta']}).")
        first = row["runs"][0].run_dir
        row["throughput"] = None
        try:
            if throughput:
                row["throughput"] = measure_throughput(
                    first, split, registry=registry, refresh=remeasure
                )
            elif (first / THROUGHPUT_FILE).is_file():
                row["throughput"] = json.loads((first / THROUGHPUT_FILE).read_text())
        except (FusionkitError, OSError) as exc:
            notes.append(f"{row['variant']}: throughput not measured ({exc}).")
    tp = [r["throughput"] for r in rows if r["throughput"]]
    throughput_note = (
        "frames/s: inference over the whole split as evaluation runs it (the recipe's "
        "windows, hop and batch size, overlapping windows averaged), the fastest of at least 5 "
        "passes, measured when the report was first made, for the first seed's run of each "
        f"variant, on {tp[0]['device']} with {tp[0]['threads']} thread(s) (cached in the run's "
        "`throughput.json`)"
        if tp
        else "frames/s: not measured"
    )

    figures: dict[str, bytes] = {}
    titles: dict[str, str] = {}
    keys = metric_keys(targets)
    mean = np.array([[r[k][0] for k in keys] for r in rows])
    std = np.array([[r[k][1] for k in keys] for r in rows])
    figures["ccc"] = plots.ccc_bars(
        labels,
        [k.replace("ccc_", "") for k in keys],
        mean,
        std,
        f"CCC on {split} (mean ± std over seeds)",
    )
    titles["ccc"] = f"CCC per variant on {split}"

    sweeps = robustness_sweeps(rows, split)
    for sw in sweeps:
        curves = [
            {
                "label": f"{c.variant} (AUC {c.auc[0]:.3f})",
                "x": c.x,
                "mean": c.mean["ccc_mean"],
                "std": c.std["ccc_mean"],
            }
            for c in sw.curves
        ]
        title = (
            f"{sw.label}: CCC mean vs {sw.axis} on {sw.split}\n"
            f"{sw.perturbation}({fmt_params(sw.params)}), seed {sw.seed}"
        )
        figures[f"robustness_{sw.slug}"] = plots.robustness_curves(curves, sw.axis, title)
        titles[f"robustness_{sw.slug}"] = title.replace("\n", "; ")

    gated = []
    for row in rows:
        first = row["runs"][0]
        preds = _load_predictions(first.run_dir, split)
        if preds is None or not _is_gated(preds):
            continue
        chosen = _pick_videos(preds, gate_videos)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", row["variant"])
        title = f"{row['variant']} (seed {first.seed}): gate step weights and V/A traces on {split}"
        figures[f"gates_{slug}"] = plots.gate_traces(
            [{"name": n, **preds[n]} for n in chosen], list(preds["targets"]), title
        )
        titles[f"gates_{slug}"] = title
        gated.append(f"gates_{slug}")
    return Report(
        split=split,
        baseline=baseline,
        rows=rows,
        targets=targets,
        sweeps=sweeps,
        plots=figures,
        plot_titles=titles,
        gates=gated,
        n_boot=n_boot,
        boot_seed=boot_seed,
        throughput_note=throughput_note,
        sources=[str(p) for p in paths],
        notes=notes,
    )


# ------------------------------------------------------------------------------- rendering


def fmt_params(params: dict[str, Any]) -> str:
    """``{"modalities": ["audio"], "span": 30}`` -> ``modalities=[audio], span=30``."""

    def one(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ", ".join(one(x) for x in v) + "]"
        return "null" if v is None else str(v)

    return ", ".join(f"{k}={one(v)}" for k, v in params.items())


def results_table(rep: Report) -> str:
    """The main table (CCC, Δ with interval and p, cost) as Markdown."""
    return _md(*_main_table(rep))


def _signed(x: float) -> str:
    return f"{x:+.3f}".replace("-", "−")


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _delta_cells(row: dict[str, Any], col: int) -> tuple[str, str]:
    d = row["delta"]
    if d is None:
        return "(baseline)", ""
    if isinstance(d, str):
        return "n/a", ""
    return f"{_signed(d.delta[col])} [{_signed(d.ci_low[col])}, {_signed(d.ci_high[col])}]", _p(
        d.p_value[col]
    )


def _main_table(rep: Report) -> tuple[list[str], list[list[str]]]:
    keys = metric_keys(rep.targets)
    short = {k: k.replace("ccc_", "CCC ") for k in keys}
    head = [
        "variant",
        "seeds",
        *(short[k] for k in keys),
        f"Δ CCC mean vs {rep.baseline} [95% CI]",
        "p",
        "params",
        "train s",
        "frames/s",
    ]
    body = []
    for r in rep.rows:
        delta, p = _delta_cells(r, len(keys) - 1)
        tp = r["throughput"]
        body.append(
            [
                r["variant"],
                str(len(r["seeds"])),
                *(_fmt(r[k]) for k in keys),
                delta,
                p,
                f"{r['params']:,}" if r["params"] else "",
                f"{r['train_seconds']:.0f}",
                f"{tp['frames_per_second']:,.0f}" if tp else "",
            ]
        )
    return head, body


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
        "(sample std, ddof = 1), read from each run's `metrics.json`.",
        f"Δ: difference of the seed-averaged CCC mean from the baseline `{rep.baseline}`. "
        f"Significance: paired bootstrap over the {rep.split} videos ({rep.n_boot} resamples, "
        f"seed {rep.boot_seed}): each resample draws the split's videos with replacement and "
        "recomputes the pooled CCC of every run of both variants on the same videos; the "
        "interval is the 2.5-97.5 percentile interval of the resampled Δ and p the two-sided "
        "bootstrap p-value (2 × the smaller tail beyond 0, add-one corrected). It measures "
        "sensitivity to the choice of test videos, not to the training seed (see the ± std).",
        "params: trainable parameters; train s: training time (mean over seeds) as recorded in "
        f"`metrics.json`; {rep.throughput_note}.",
        "Robustness AUC: area under the CCC-mean-versus-strength curve with the strength axis "
        "rescaled to [0, 1] (trapezoid rule), i.e. the curve's average CCC; computed per run, "
        "then mean ± std over seeds. Curves show the mean over seeds with a ± std band.",
        "Gate plots: the first seed's run of each gated variant (models whose gate weights "
        "change over frames); top rows: label (black) and prediction per target; lower rows: "
        "each stream's per-frame weights over the recursion steps (step 0 = the unfused input).",
    ]


def render_markdown(rep: Report, plot_dir: str = "plots") -> str:
    names = ", ".join(dict.fromkeys(r["runs"][0].name for r in rep.rows))
    out = [f"# Comparison report: {names}", ""]
    out.append(
        f"Split `{rep.split}`, {sum(len(r['runs']) for r in rep.rows)} runs from "
        f"{', '.join(f'`{s}`' for s in rep.sources)}."
    )
    if rep.command:
        out += ["", f"Generated with `{rep.command}`."]
    out += ["", "## Results", ""]
    head, body = _main_table(rep)
    out.append(_md(head, body))
    out += [f"![{rep.plot_titles['ccc']}]({plot_dir}/ccc.png)", ""]
    for sw in rep.sweeps:
        key = f"robustness_{sw.slug}"
        out += [f"## Robustness: {sw.label}", ""]
        fixed = ", ".join(f"`{fmt_params({k: v})}`" for k, v in sw.params.items()) or "none"
        out.append(
            f"Perturbation `{sw.perturbation}` (fixed params: {fixed}; seed {sw.seed}) swept "
            f"over `{sw.axis}` on `{sw.split}`; cells are CCC mean (mean over seeds)."
        )
        if sw.dropped:
            out.append(f"Values missing in some runs and left out: {sw.dropped}.")
        out.append("")
        h, b = _sweep_table(sw)
        out += [_md(h, b), f"![{rep.plot_titles[key]}]({plot_dir}/{key}.png)", ""]
    if rep.gates:
        out += ["## Gate weights over time", ""]
        out += [f"![{rep.plot_titles[g]}]({plot_dir}/{g}.png)\n" for g in rep.gates]
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


def render_html(rep: Report) -> str:
    names = ", ".join(dict.fromkeys(r["runs"][0].name for r in rep.rows))
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
    ]
    for sw in rep.sweeps:
        fixed = fmt_params(sw.params) or "none"
        parts += [
            f"<h2>Robustness: {html.escape(sw.label)}</h2>",
            f'<p class="meta">Perturbation <code>{html.escape(sw.perturbation)}</code> '
            f"(fixed params: {html.escape(fixed)}; seed {sw.seed}) swept over "
            f"<code>{html.escape(sw.axis)}</code> on <code>{html.escape(sw.split)}</code>; "
            "cells are CCC mean (mean over seeds).</p>",
            _html_table(*_sweep_table(sw)),
            _img(rep, f"robustness_{sw.slug}"),
        ]
    if rep.gates:
        parts.append("<h2>Gate weights over time</h2>")
        parts += [_img(rep, g) for g in rep.gates]
    parts.append("<h2>How to read this report</h2><ul class='defs'>")
    parts += [f"<li>{_code(d)}</li>" for d in _definitions(rep)]
    parts.append("</ul>")
    if rep.notes:
        parts.append("<p>Notes:</p><ul>" + "".join(f"<li>{_code(n)}</li>" for n in rep.notes))
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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
        return x.item()
    return x


def summary_records(rep: Report) -> list[dict[str, Any]]:
    """The rows of ``summary.csv``: one per variant, full precision."""
    keys = metric_keys(rep.targets)
    out = []
    for r in rep.rows:
        rec: dict[str, Any] = {"variant": r["variant"], "n_seeds": len(r["seeds"])}
        rec["seeds"] = " ".join(map(str, r["seeds"]))
        for k in keys:
            rec[f"{k}_mean"], rec[f"{k}_std"] = map(_num, r[k])
        d = r["delta"]
        for j, k in enumerate(keys):
            ok = isinstance(d, BootstrapResult)
            rec[f"delta_{k}"] = _num(d.delta[j]) if ok else ""
            rec[f"delta_{k}_ci_low"] = _num(d.ci_low[j]) if ok else ""
            rec[f"delta_{k}_ci_high"] = _num(d.ci_high[j]) if ok else ""
            rec[f"delta_{k}_p"] = _num(d.p_value[j]) if ok else ""
        rec["baseline"] = rep.baseline
        rec["params"] = r["params"]
        rec["train_seconds_mean"] = r["train_seconds"]
        rec["epochs_mean"] = r["epochs"]
        tp = r["throughput"]
        rec["frames_per_second"] = tp["frames_per_second"] if tp else ""
        for sw in rep.sweeps:
            c = next((c for c in sw.curves if c.variant == r["variant"]), None)
            rec[f"auc_{sw.label}_mean"] = _num(c.auc[0]) if c else ""
            rec[f"auc_{sw.label}_std"] = _num(c.auc[1]) if c else ""
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
                }
            )
            out.append(rec)
    return out


def robustness_records(rep: Report) -> list[dict[str, Any]]:
    """The rows of ``robustness.csv``: one per sweep, variant and value."""
    out = []
    for sw in rep.sweeps:
        for c in sw.curves:
            for i, v in enumerate(c.x):
                rec: dict[str, Any] = {
                    "sweep": sw.label,
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


def write_report(rep: Report, out_dir: Path, html_page: bool = True) -> list[Path]:
    """Write ``report.md``, ``report.html``, ``summary.csv``, ``runs.csv``,
    ``robustness.csv`` and ``plots/*.png`` into ``out_dir``; returns the paths written."""
    from fusionkit.engine.files import atomic_write_bytes, atomic_write_text

    out_dir = Path(out_dir)
    written = []
    for key, png in rep.plots.items():
        p = out_dir / "plots" / f"{key}.png"
        atomic_write_bytes(p, png)
        written.append(p)
    files = {
        "report.md": render_markdown(rep),
        "summary.csv": _csv(summary_records(rep)),
        "runs.csv": _csv(run_records(rep)),
    }
    if rep.sweeps:
        files["robustness.csv"] = _csv(robustness_records(rep))
    if html_page:
        files["report.html"] = render_html(rep)
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
        written.append(out_dir / name)
    return written
