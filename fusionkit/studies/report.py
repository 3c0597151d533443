"""Comparison reports from finished runs: tables, significance, learning curves, robustness
curves, cost and gate plots (:mod:`fusionkit.studies.render` writes them as Markdown, a
standalone HTML page, CSV and a LaTeX table).

Runs are found under the given directories (a grid directory, a run directory, or a parent of
several). Only *complete* runs (``run.json`` says so, :meth:`RunDir.is_complete`) enter the
numbers; every other run directory, and every grid point that failed or never ran, is listed
as left out with the reason. Runs that differ only in ``training.seed`` form one *variant*
(one row). Per split:

* CCC per target and their mean as ``mean ± std`` (sample std, ddof = 1) over the seeds,
  read from each run's ``metrics.json``;
* ``Δ`` versus a baseline variant, per target and for the mean, with a paired bootstrap over
  the split's videos (:mod:`fusionkit.studies.stats`) from ``predictions/<split>.safetensors``,
  and Holm-adjusted p-values over the variants compared with the baseline. The paired test is
  only made for runs evaluated on the *same data*: equal data fingerprints of the split in
  ``metrics.json`` and in the predictions file; otherwise the row says why there is none;
* learning curves (validation CCC mean and training loss per epoch, mean and min-max over
  seeds) from the runs' training history;
* the plugin distribution and version of every component (``run.json``);
* cost: parameters (``metrics.json``), training time (mean over seeds of ``train_seconds``),
  inference throughput (:func:`fusionkit.studies.robustness.measure_throughput`, measured when the
  report is made and cached in each run's ``throughput.json``);
* robustness curves (``robustness/*.json``) with an area-under-curve score;
* for gated models, the gate's step weights over time next to the valence/arousal traces.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusionkit.core.errors import FusionkitError
from fusionkit.core.params import first_few
from fusionkit.core.recipe import NOT_TRAINING
from fusionkit.engine.files import read_json
from fusionkit.engine.runs import PREDICTIONS_DIR, check_unchanged
from fusionkit.studies.scan import (
    VARIANT_AXIS,
    Excluded,
    RunRecord,
    axis_names,
    collect_runs,
    scan_runs,
    variant_label,
)
from fusionkit.studies.stats import (
    BootstrapResult,
    auc_normalised,
    holm,
    paired_bootstrap,
    video_sums,
)

__all__ = [
    "ALPHA",
    "DIFFERENT_DATA",
    "LearningCurve",
    "Report",
    "adjust_holm",
    "build_report",
    "data_mismatch",
    "flag_gate_weights",
    "fmt_params",
    "learning_curves",
    "metric_keys",
    "read_predictions",
    "significant",
    "summarize",
]

#: significance level of the marks (†) after the Holm correction
ALPHA = 0.05
#: why a paired test is refused when the compared runs saw different evaluation data
DIFFERENT_DATA = "evaluated on different data"


def _mean_std(xs: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return mean, std


def metric_keys(targets: list[str]) -> list[str]:
    keys = [f"ccc_{t}" for t in targets]
    return [*keys, "ccc_mean"] if len(targets) > 1 else keys


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, path + "."))
        else:
            out[path] = v
    return out


#: recipe keys that do not change what a run trains and how it is scored (as
#: :meth:`fusionkit.core.recipe.Recipe.training_view` leaves them out, and the seed)
_NOT_SETUP = ("training.seed", "evaluation.robustness", *NOT_TRAINING)


def run_setup(run: RunRecord) -> dict[str, str]:
    """What the seeds of one variant must share: the run's recipe (flattened to dotted keys)
    without the seed, the output location, robustness sweeps and descriptions, plus the device,
    precision and number of processes that ``metrics.json`` says the run used (``precision:
    auto`` is bf16 on CUDA, fp32 on a CPU; under torchrun one step reads ``world_size`` times
    the batch)."""
    setup = _recipe_setup(run.recipe)
    for k, name in (("device", "device"), ("precision", "precision"), ("world_size", "processes")):
        if k in run.metrics:
            setup[f"{name} used"] = json.dumps(run.metrics[k], default=str)
    return setup


def _recipe_setup(recipe: dict[str, Any]) -> dict[str, str]:
    """The recipe part of :func:`run_setup`."""
    return {
        k: json.dumps(v, sort_keys=True, default=str)
        for k, v in _flat(recipe).items()
        if not any(k == n or k.startswith(n + ".") for n in _NOT_SETUP)
    }


def _distinct_names(folders: list[Path]) -> dict[Path, str]:
    """Each folder's shortest trailing path that no other of ``folders`` shares
    (``a/fusion_gate`` and ``b/fusion_gate`` for two grids of one name)."""
    unique = set(folders)
    depth = 1  # ends: distinct folders differ in their full paths
    while len({f.parts[-depth:] for f in unique}) < len(unique):
        depth += 1
    return {f: "/".join(f.parts[-depth:]) for f in unique}


def _home(run: RunRecord) -> Path:
    """The folder a run is in: a grid point's grid folder, a single run's parent folder."""
    return run.run_dir.parent


def row_label(label: str, prefix: str, suffix: str) -> str:
    """A row's label from the variant label, the folder prefix that tells two homes of one
    label apart and the setup suffix that tells two setups of one label apart.

    >>> row_label("tagf", "a/fusion_gate", "")
    'a/fusion_gate/tagf'
    >>> row_label("tagf", "", "lr=0.1")
    'tagf [lr=0.1]'
    """
    head = f"{prefix}/{label}" if prefix else label
    return f"{head} [{suffix}]" if suffix else head


def _row_setup(run: RunRecord, split: str) -> dict[str, str]:
    """:func:`run_setup` plus the data the run was trained and evaluated on: the labels
    fingerprint and the features hash of ``split`` (keys ``<split> data``, ``<split>
    features``) and the hash of the training and validation data (``training data``), so
    that seeds of other data never share a row's mean ± std."""
    fp = run.fingerprint(split)
    feats = run.metrics.get("features_sha256")
    fh = feats.get(split) if isinstance(feats, dict) else None
    trained = run.metrics.get("trained_on")
    return {
        **run_setup(run),
        f"{split} data": fp[:12] if fp else "unrecorded",
        f"{split} features": fh[:12] if isinstance(fh, str) and fh else "unrecorded",
        "training data": (
            hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:12]
            if isinstance(trained, dict)
            else "unrecorded"
        ),
    }


def _differing(setups: list[dict[str, str]]) -> list[str]:
    """The keys on which ``setups`` disagree, sorted."""
    keys = set().union(*setups)
    return sorted(k for k in keys if len({st.get(k) for st in setups}) > 1)


def _suffixes(setups: list[dict[str, str]]) -> list[str]:
    """One suffix per setup (``lr=0.1, precision used=bf16``), all distinct: the fewest of
    the differing keys that tell the setups apart, in key order, with short values where
    they stay distinct (``...`` marks keys that differ too but are not needed)."""
    differ = _differing(setups)
    if not differ:
        return [""] * len(setups)
    chosen: list[str] = []
    for k in differ:
        before = len({tuple(st.get(c) for c in chosen) for st in setups})
        if len({tuple(st.get(c) for c in (*chosen, k)) for st in setups}) > before:
            chosen.append(k)
    names = axis_names(chosen)
    more = ", ..." if len(chosen) < len(differ) else ""

    def show(st: dict[str, str], cut: bool) -> str:
        values = [(names[k], st.get(k, "unset").strip('"')) for k in chosen]
        return (
            ", ".join(f"{n}={v[:23] + '…' if cut and len(v) > 24 else v}" for n, v in values) + more
        )

    short = [show(st, True) for st in setups]
    return short if len(set(short)) == len(short) else [show(st, False) for st in setups]


def _dedupe_seeds(label: str, runs: list[RunRecord], excluded: list[Excluded]) -> list[RunRecord]:
    """``runs`` with each seed once (the first in report order); the repeats are left out."""
    kept: dict[int, RunRecord] = {}
    for m in sorted(runs, key=lambda r: r.order):
        if m.seed not in kept:
            kept[m.seed] = m
            continue
        excluded.append(
            Excluded(
                str(m.run_dir),
                label,
                "duplicate",
                f"repeats seed {m.seed} of {kept[m.seed].run_dir} with the same recipe; "
                "counted once",
            )
        )
    return list(kept.values())


def _split_label(
    label: str,
    members: list[RunRecord],
    setups: list[dict[str, str]],
    excluded: list[Excluded],
) -> list[dict[str, Any]]:
    """The rows of one label: one, unless its runs repeat a seed or differ in more than the
    seed (``setups``: each member's :func:`_row_setup`); then one per folder (:func:`_home`)
    and setup, the setups of one folder told apart by a suffix. A seed repeated with the
    same setup in one folder counts once (the repeat is left out). Each row has ``home``:
    its one folder, or None when its seeds come from several."""
    seeds = [m.seed for m in members]
    if len(set(seeds)) == len(seeds) and not _differing(setups):
        homes = {_home(m) for m in members}
        home = next(iter(homes)) if len(homes) == 1 else None
        return [{"label": label, "suffix": "", "home": home, "split_by_home": False,
                 "runs": members}]  # fmt: skip
    parts: dict[tuple[Path, str], list[RunRecord]] = {}
    kinds: dict[tuple[Path, str], dict[str, str]] = {}
    for m, st in zip(members, setups, strict=True):
        key = (_home(m), json.dumps(st, sort_keys=True))
        parts.setdefault(key, []).append(m)
        kinds[key] = st
    homes = {home for home, _ in parts}
    suffix: dict[tuple[Path, str], str] = {}
    for home in homes:
        keys = [k for k in parts if k[0] == home]
        suffix |= dict(zip(keys, _suffixes([kinds[k] for k in keys]), strict=True))
    return [
        {
            "label": label,
            "suffix": suffix[key],
            "home": key[0],
            "split_by_home": len(homes) > 1,
            "runs": _dedupe_seeds(label, runs, excluded),
        }
        for key, runs in parts.items()
    ]


def _name_rows(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``prefix`` and ``variant`` (its label in every table). When a label's
    rows had to be told apart by folder, every row that comes from one folder is prefixed
    with that folder's distinct name, so that rows of one grid folder keep one prefix (what
    a per-condition baseline looks up). Labels that still coincide get ``#2``, ``#3``."""
    if any(r["split_by_home"] for r in rows):
        homes = [r["home"] for r in rows if r["home"] is not None]
        names = _distinct_names(homes) if len(set(homes)) > 1 else {}
    else:
        names = {}
    seen: dict[str, int] = {}
    for r in rows:
        r["prefix"] = names.get(r["home"], "") if r["home"] is not None else ""
        variant = row_label(r["label"], r["prefix"], r["suffix"])
        seen[variant] = seen.get(variant, 0) + 1
        r["variant"] = variant if seen[variant] == 1 else f"{variant} #{seen[variant]}"


def summarize(
    runs: list[RunRecord],
    split: str,
    notes: list[str] | None = None,
    excluded: list[Excluded] | None = None,
) -> list[dict[str, Any]]:
    """One row per variant, in the order of the runs: ``{"variant", "seeds", "runs",
    "ccc_<t>": (mean, std), ..., "params", "train_seconds"}`` (``train_seconds`` is the mean
    over seeds).

    The runs of one label that differ in more than the seed (:func:`run_setup`: e.g. two
    grids with one variant name trained in other precisions, a grid folder holding runs of
    an edited recipe, or seeds evaluated on other data) are split into one row per setup
    (``<variant> [lr=0.1]``), said in ``notes``, so that a row's mean ± std never pools
    different experiments. Runs of one setup that repeat a seed (the same variant name in
    two grids, or one recipe run twice into two folders) get one row per folder
    (``<folder>/<variant>``); a seed repeated in one folder counts once. Runs without
    metrics for ``split``, and the repeats, are added to ``excluded``."""
    excluded = [] if excluded is None else excluded
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        if split in r.metrics.get("splits", {}):
            groups.setdefault(r.variant, []).append(r)
        else:
            have = ", ".join(sorted(r.metrics.get("splits", {}))) or "none"
            excluded.append(
                Excluded(
                    str(r.run_dir),
                    r.variant,
                    "no-split",
                    f"no metrics for split {split} (evaluated on: {have})",
                )
            )
    split_up: dict[tuple[str, ...], list[str]] = {}  # differing keys -> labels
    found: list[dict[str, Any]] = []
    for label, members in groups.items():
        setups = [_row_setup(m, split) for m in members]
        found += _split_label(label, members, setups, excluded)
        differ = _differing(setups)
        if differ:
            split_up.setdefault(tuple(differ), []).append(label)
    for differ, labels in split_up.items() if notes is not None else ():
        keys = first_few(list(differ))
        notes.append(
            f"{', '.join(labels)}: the runs of each differ in more than the seed ({keys}), "
            "so they are shown in separate rows, not pooled."
        )
    rows = sorted(found, key=lambda r: min(m.order for m in r["runs"]))
    _name_rows(rows)
    for row in rows:
        members = sorted(row["runs"], key=lambda m: m.seed)
        row.update(seeds=[m.seed for m in members], runs=members)
        for k in metric_keys(members[0].targets):
            row[k] = _mean_std([m.metrics["splits"][split][k] for m in members])
        row["params"] = members[0].metrics.get("parameters")
        row["train_seconds"] = statistics.fmean(
            m.metrics.get("train_seconds", 0.0) for m in members
        )
        row["epochs"] = statistics.fmean(m.metrics.get("epochs_run", 0) for m in members)
    return rows


# ----------------------------------------------------------------------------- predictions


def _load_predictions(run_dir: Path, split: str) -> dict[str, Any] | None:
    from fusionkit.engine.files import load_tensors

    path = run_dir / PREDICTIONS_DIR / f"{split}.safetensors"
    if not path.is_file():
        return None
    tensors, meta = load_tensors(path)
    videos = json.loads(meta.get("videos", "[]"))
    out: dict[str, Any] = {
        "videos": videos,
        "targets": json.loads(meta.get("targets", "[]")),
        "fingerprint": meta.get("data_fingerprint"),
        "step_names": json.loads(meta.get("step_names", "null")),
    }
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
            "flags": {
                k.split("/")[1]: tensors[k].bool().numpy()
                for k in tensors
                if k.startswith("flag/") and k.endswith(f"/{name}") and k.count("/") == 2
            },
        }
    return out


def data_mismatch(runs: list[RunRecord], split: str) -> str | None:
    """Why ``runs`` cannot be compared video by video on ``split``, or None when they can:
    every run's ``metrics.json`` must record a fingerprint of the evaluated split's data
    (video names, lengths, labels, label mask), and all must be equal."""
    fps = [r.fingerprint(split) for r in runs]
    if any(f is None for f in fps):
        return f"no data fingerprint of {split} in metrics.json"
    return DIFFERENT_DATA if len(set(fps)) > 1 else None


def read_predictions(run: RunRecord, split: str) -> dict[str, Any] | str:
    """A run's predictions of ``split`` (:func:`_load_predictions`) when they can be trusted,
    else why not: missing, changed since the run finished (SHA-256 in ``run.json``), or made on
    other data than ``metrics.json``. Every number the report takes from a predictions file
    goes through here."""
    rel = f"{PREDICTIONS_DIR}/{split}.safetensors"
    try:
        check_unchanged(run.run_dir, run.files, rel)
        preds = _load_predictions(run.run_dir, split)
    except FusionkitError as exc:
        return f"{rel} of {run.run_dir.name} cannot be used: {exc}"
    if preds is None:
        return f"no {rel} in some runs"
    if preds["fingerprint"] != run.fingerprint(split):
        return f"{DIFFERENT_DATA} ({rel} of {run.run_dir.name} does not match its metrics)"
    return preds


def _read_sums(run: RunRecord, split: str) -> tuple[list[str], np.ndarray] | str:
    """Video names and per-video sufficient statistics of a run's predictions, or why they
    cannot be used (:func:`read_predictions`)."""
    preds = read_predictions(run, split)
    if isinstance(preds, str):
        return preds
    names = list(preds["videos"])
    sums = np.stack(
        [video_sums(preds[n]["pred"], preds[n]["target"], preds[n]["mask"]) for n in names]
    )
    return names, sums


def _run_sums(run: RunRecord, split: str, cache: dict) -> tuple[list[str], np.ndarray] | str:
    """:func:`_read_sums`, read once per run and split."""
    key = (run.run_dir, split)
    if key not in cache:
        cache[key] = _read_sums(run, split)
    return cache[key]


def compare(
    row: dict[str, Any], base: dict[str, Any], split: str, n_boot: int, seed: int, cache: dict
) -> BootstrapResult | str:
    """Paired bootstrap of ``row`` against ``base``, or the reason it cannot be done (first
    of all: the runs were not evaluated on the same data)."""
    reason = data_mismatch([*row["runs"], *base["runs"]], split)
    if reason is not None:
        return reason
    a = [_run_sums(r, split, cache) for r in row["runs"]]
    b = [_run_sums(r, split, cache) for r in base["runs"]]
    why = next((x for x in (*a, *b) if isinstance(x, str)), None)
    if why is not None:
        return why
    if len({tuple(x[0]) for x in (*a, *b)}) != 1:  # type: ignore[index]
        return DIFFERENT_DATA + " (different videos)"
    return paired_bootstrap(
        [x[1] for x in a],  # type: ignore[index]
        [x[1] for x in b],  # type: ignore[index]
        n_boot=n_boot,
        seed=seed,
    )


def adjust_holm(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``p_holm``: per metric, Holm-adjusted p-values over the rows that have a
    paired test against the baseline (None for the others)."""
    tested = [r for r in rows if isinstance(r.get("delta"), BootstrapResult)]
    for r in rows:
        r["p_holm"] = None
    if not tested:
        return
    raw = np.stack([np.asarray(r["delta"].p_value, dtype=np.float64) for r in tested])
    adjusted = np.column_stack([holm(raw[:, j]) for j in range(raw.shape[1])])
    for r, adj in zip(tested, adjusted, strict=True):
        r["p_holm"] = adj


def significant(row: dict[str, Any], col: int) -> bool:
    """Whether the row differs from the baseline in metric ``col`` (Holm p < :data:`ALPHA`)."""
    adj = row.get("p_holm")
    return adj is not None and bool(adj[col] < ALPHA)


# ------------------------------------------------------------------------ learning curves


@dataclass
class LearningCurve:
    """One variant's per-epoch training history over its seeds.

    ``stats[key]`` holds ``mean``, ``min`` and ``max`` over the runs that reached each epoch
    (``runs``), for ``train_loss``, ``val_ccc_mean`` and ``val_ccc_<target>``."""

    variant: str
    epochs: list[int]
    runs: list[int]
    stats: dict[str, dict[str, list[float]]]


def _as_float(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x if math.isfinite(x) else math.nan


def run_history(run: RunRecord) -> list[dict[str, Any]]:
    """A run's per-epoch records (``history`` in its ``metrics.json``)."""
    hist = run.metrics.get("history")
    if isinstance(hist, list) and all(isinstance(h, dict) for h in hist):
        return hist
    return []


def learning_curves(rows: list[dict[str, Any]]) -> list[LearningCurve]:
    """Per variant, mean, min and max over seeds of every epoch's training loss and
    validation CCC (variants without any history are skipped)."""
    curves = []
    for row in rows:
        hists = [h for h in (run_history(r) for r in row["runs"]) if h]
        if not hists:
            continue
        keys = list(
            dict.fromkeys(
                k
                for h in hists
                for rec in h
                for k in rec
                if k == "train_loss" or str(k).startswith("val_ccc_")
            )
        )
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        for h in hists:
            for rec in h:
                by_epoch.setdefault(int(_as_float(rec.get("epoch"))), []).append(rec)
        epochs = sorted(by_epoch)
        stats: dict[str, dict[str, list[float]]] = {
            k: {"mean": [], "min": [], "max": []} for k in keys
        }
        for e in epochs:
            for k in keys:
                xs = [x for x in (_as_float(rec.get(k)) for rec in by_epoch[e]) if x == x]
                stats[k]["mean"].append(statistics.fmean(xs) if xs else math.nan)
                stats[k]["min"].append(min(xs) if xs else math.nan)
                stats[k]["max"].append(max(xs) if xs else math.nan)
        curves.append(
            LearningCurve(row["variant"], epochs, [len(by_epoch[e]) for e in epochs], stats)
        )
    return curves


# ----------------------------------------------------------------------------- components

#: order of the component kinds in the components table
KIND_ORDER = ("dataset", "encoder", "fusion", "gate", "head", "perturbation")


def component_label(c: dict[str, Any]) -> str:
    """``rjca (fusionkit 0.4.0)``: a component, the distribution and version behind it."""
    origin = f"{c.get('distribution') or '?'} {c.get('version') or ''}".strip()
    return f"{c.get('name', '?')} ({origin})"


def variant_components(row: dict[str, Any]) -> dict[str, list[str]]:
    """Per kind, the components of a variant's runs (each once, in kind order)."""
    out: dict[str, list[str]] = {}
    for run in row["runs"]:
        for c in run.components:
            labels = out.setdefault(str(c.get("kind", "?")), [])
            if component_label(c) not in labels:
                labels.append(component_label(c))
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


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
    """One robustness sweep across variants. ``key`` names it in file names and CSV columns:
    the label, with ``-2``, ``-3`` ... when sweeps of one label differ (another perturbation,
    params, seed or split)."""

    label: str
    perturbation: str
    params: dict[str, Any]
    axis: str
    seed: int
    split: str
    values: list[Any]
    curves: list[Curve] = field(default_factory=list)
    dropped: list[Any] = field(default_factory=list)
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.label

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.key)


def _by_number(results: dict[str, Any]) -> dict[Any, Any]:
    """A sweep's stored results keyed by :func:`value_key` of the value as a float, so that
    ``0`` and ``0.0`` (files written before values were stored as their params read them) are
    one value; a value that is not a number is keyed None."""
    from fusionkit.studies.robustness import value_key

    out: dict[Any, Any] = {}
    for point in results.values():
        v = point.get("value") if isinstance(point, dict) else None
        if isinstance(v, str):  # `1e-1` of an old --values list: the param read it as 0.1
            try:
                v = float(v)
            except ValueError:
                pass
            else:
                point = {**point, "value": v}
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        out[value_key(float(v)) if number else None] = point
    return out


def _robustness_problem(rec: Any) -> str | None:
    """What is wrong with a ``robustness/*.json`` record, or None when it has the shape
    :func:`fusionkit.studies.robustness.run_sweep` writes."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    for key, kind in (("name", str), ("perturbation", str), ("params", dict), ("axis", str)):
        if not isinstance(rec.get(key), kind):
            return f"{key!r} is missing or not a {kind.__name__}"
    if not isinstance(rec.get("seed"), int) or not isinstance(rec.get("results"), dict):
        return "'seed' or 'results' is missing or malformed"
    for split, by_value in rec["results"].items():
        if not isinstance(by_value, dict):
            return f"results.{split} is not a mapping"
        for k, v in by_value.items():
            ok = isinstance(v, dict) and "value" in v and isinstance(v.get("metrics"), dict)
            if not ok or not all(
                isinstance(x, (int, float)) for n, x in v["metrics"].items() if n.startswith("ccc_")
            ):
                return f"results.{split}.{k} lacks a value or numeric metrics"
            if "ccc_mean" not in v["metrics"]:
                return f"results.{split}.{k}.metrics lacks ccc_mean"
    return None


def _run_robustness(run: RunRecord, notes: list[str]) -> list[dict[str, Any]]:
    """A run's robustness records; a damaged file is left out with a note."""
    from fusionkit.studies.robustness import ROBUSTNESS_DIR

    folder = run.run_dir / ROBUSTNESS_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rec = read_json(path, "robustness results")
            problem = _robustness_problem(rec)
        except FusionkitError as exc:
            problem = str(exc)
        if problem is None:
            problem = _revision_problem(rec, run.run_dir) or _made_on_problem(rec, run)
        if problem is None:
            out.append(rec)
        else:
            notes.append(f"{path} is left out of the robustness curves: {problem}.")
    return out


def _made_on_problem(rec: dict[str, Any], run: RunRecord) -> str | None:
    """Why a robustness record was not made on this run's best weights or on the data its
    metrics were evaluated on (a file copied from another run, or left from an earlier
    training into the same folder), or None."""
    from fusionkit.engine.runs import BEST_FILE

    redo = f"recompute it with `fusionkit robustness {shlex.quote(str(run.run_dir))}`"
    weights = run.files.get(BEST_FILE)
    if weights and rec.get("checkpoint_sha256") != weights:
        return f"it was computed on other weights than the run's {BEST_FILE}; {redo}"
    for key, what in (("features_sha256", "features"), ("data_fingerprints", "labels")):
        made, evaluated = rec.get(key), run.metrics.get(key)
        if not (isinstance(made, dict) and isinstance(evaluated, dict)):
            continue
        other = sorted(
            str(sp)
            for sp in rec["results"]
            if isinstance(made.get(sp), str) and isinstance(evaluated.get(sp), str)
            and made[sp] != evaluated[sp]
        )  # fmt: skip
        if other:
            return (
                f"its {', '.join(other)} {what} are not those the run's metrics were "
                f"evaluated on; {redo}"
            )
    return None


def _revision_problem(rec: dict[str, Any], run_dir: Path) -> str | None:
    """Why a robustness record computed with another revision of its perturbation than the
    installed one is not comparable (None when it is, or the perturbation is not installed)."""
    from fusionkit.engine.perturb import perturbation_revision

    try:
        installed = perturbation_revision(rec["perturbation"])
    except FusionkitError:
        return None
    stored = rec.get("revision", 1)
    if stored == installed:
        return None
    return (
        f"it was computed with revision {stored} of perturbation {rec['perturbation']!r}, "
        f"which gives other numbers than the installed revision {installed}; recompute it "
        f"with `fusionkit robustness {shlex.quote(str(run_dir))}`"
    )


def _note_undone_values(rows: list[dict[str, Any]], split: str, notes: list[str]) -> None:
    """One note per sweep whose values some runs' recipes declare but their files lack (a
    sweep interrupted in every run would otherwise show a curve and an AUC over the values
    computed, with nothing saying the declared axis is longer)."""
    from fusionkit.core.errors import FusionkitError
    from fusionkit.engine.runs import RunDir
    from fusionkit.studies.robustness import missing_by_sweep

    undone: dict[str, list[tuple[Path, list[Any], int]]] = {}
    for row in rows:
        for run in row["runs"]:
            try:
                specs = RunDir(run.run_dir).recipe().evaluation.robustness
            except FusionkitError:  # reported elsewhere (the run's recipe is unreadable)
                continue
            missing = missing_by_sweep(run.run_dir, specs)
            for spec, miss in zip(specs, missing, strict=True):
                use = split if split in spec.splits else spec.splits[0]
                lacking = [v for s, v in miss if s == use]
                if lacking:
                    undone.setdefault(spec.label, []).append(
                        (run.run_dir, lacking, len(spec.values))
                    )
    for label, runs in sorted(undone.items()):
        where = first_few([str(r) for r, _, _ in runs], 3)
        _, lacking, total = runs[0]
        values = first_few([str(v) for v in lacking], 3)
        notes.append(
            f"robustness sweep {label}: {len(runs)} run(s) lack values their recipe declares "
            f"({where}; e.g. {len(lacking)} of {total}: {values}), as an interrupted sweep "
            "leaves them, so its curves and AUC cover the values computed only; complete it "
            "with `fusionkit robustness RUN` (or the grid's `fusionkit run` again)."
        )


def robustness_sweeps(
    rows: list[dict[str, Any]], split: str, notes: list[str] | None = None
) -> list[Sweep]:
    """Group every run's ``robustness/*.json`` by sweep and variant (values present in all
    runs of the sweep; curves are mean ± std over a variant's runs). Damaged files, and sweeps
    whose runs share no value, are left out with a note in ``notes``."""
    from fusionkit.studies.robustness import value_key

    notes = [] if notes is None else notes
    _note_undone_values(rows, split, notes)
    found: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        for run in row["runs"]:
            for rec in _run_robustness(run, notes):
                results = rec["results"]
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
                entry["by"].setdefault(row["variant"], []).append(_by_number(results[use]))
    declared: list[str] = []  # sweeps in the order the recipes declare them, then the rest
    for row in rows:
        for run in row["runs"]:
            for spec in run.recipe.get("evaluation", {}).get("robustness", []) or []:
                name = spec.get("name") or f"{spec['perturbation']}_{spec['axis']}"
                if name not in declared:
                    declared.append(name)
    sweeps: list[Sweep] = []
    for (label, pert, _p, axis, seed, use), entry in sorted(
        found.items(),
        key=lambda kv: (declared.index(kv[0][0]) if kv[0][0] in declared else len(declared),
                        kv[0][0]),
    ):  # fmt: skip
        per_run = [r for runs in entry["by"].values() for r in runs]
        if any(None in r for r in per_run):
            notes.append(
                f"robustness sweep {label} ({pert} over {axis} on {use}): its values are not "
                "all numbers, so it has no curve or AUC; sweep a numeric param instead."
            )
            continue
        keys = [k for k in per_run[0] if all(k in r for r in per_run[1:])]  # stored order
        every = {k: r[k]["value"] for r in per_run for k in r}
        if not keys:
            notes.append(
                f"robustness sweep {label} ({pert} over {axis} on {use}): its runs share no "
                "value, so it has no curves."
            )
            continue
        values = sorted((per_run[0][k]["value"] for k in keys), key=float)  # as first stored
        dropped = sorted((v for k, v in every.items() if k not in keys), key=float)
        sweep = Sweep(label, pert, entry["header"]["params"], axis, seed, use, values, [], dropped)
        taken = {sw.slug for sw in sweeps}
        n = 1
        while sweep.slug in taken:  # two sweeps of one label, or labels of one slug
            n += 1
            sweep.key = f"{label}-{n}"
        for variant, runs in entry["by"].items():
            at = {v: value_key(float(v)) for v in values}
            targets = [k for k in runs[0][at[values[0]]]["metrics"] if k.startswith("ccc_")]
            mean: dict[str, list[float]] = {k: [] for k in targets}
            std: dict[str, list[float]] = {k: [] for k in targets}
            for v in values:
                for k in targets:
                    m, s = _mean_std([r[at[v]]["metrics"][k] for r in runs])
                    mean[k].append(m)
                    std[k].append(s)
            aucs = [
                auc_normalised(values, [r[at[v]]["metrics"]["ccc_mean"] for v in values])
                for r in runs
            ]
            sweep.curves.append(Curve(variant, values, mean, std, _mean_std(aucs), len(runs)))
        short = [
            f"{row['variant']}: {len(entry['by'].get(row['variant'], []))} of {len(row['runs'])}"
            for row in rows
            if len(entry["by"].get(row["variant"], [])) < len(row["runs"])
        ]
        if short:  # e.g. `fusionkit robustness` given a grid before all its runs were done
            notes.append(
                f"robustness sweep {label} ({pert} over {axis} on {use}) was computed for part "
                f"of the runs only ({first_few(short, 4, sep='; ')} runs): its curves and AUCs "
                "are over the runs that have it, and a variant with none has no curve; compute "
                "it for the others with `fusionkit robustness` on their folders (the same "
                "--perturb, --param, --axis and --values)."
            )
        sweeps.append(sweep)
    return sweeps


# ---------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything a report shows; :func:`write_report` renders it.

    Each row (:func:`summarize`) gains ``delta`` (a :class:`BootstrapResult`, the reason there
    is no paired test, or None for the baseline), ``p_holm``, ``same_data`` (evaluated on the
    baseline's data), ``components``, ``left_out`` and ``throughput``."""

    split: str
    baseline: str | None
    rows: list[dict[str, Any]]
    targets: list[str]
    baseline_of: dict[str, str] = field(default_factory=dict)
    sweeps: list[Sweep] = field(default_factory=list)
    plots: dict[str, bytes] = field(default_factory=dict)
    plot_titles: dict[str, str] = field(default_factory=dict)
    gates: list[str] = field(default_factory=list)
    n_boot: int = 2000
    boot_seed: int = 0
    throughput_note: str = "frames/s: not measured"
    sources: list[str] = field(default_factory=list)
    command: str = ""
    notes: list[str] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)
    curves: list[LearningCurve] = field(default_factory=list)
    flag_gates: list[FlagGate] = field(default_factory=list)


def _is_gated(preds: dict[str, Any]) -> bool:
    """Whether some stream's step weights have several steps and vary across frames."""
    for name in preds["videos"]:
        for w in preds[name]["gates"].values():
            if w.shape[1] > 1 and w.shape[0] > 1 and float(w.std(axis=0).max()) > 1e-4:
                return True
    return False


def _pick_videos(preds: dict[str, Any], k: int) -> list[str]:
    """The ``k`` longest videos (ties by name), those with flagged frames first: more time
    for the gate to move, and conditions to see it move under."""
    names = sorted(
        preds["videos"],
        key=lambda n: (not preds[n]["flags"], -preds[n]["pred"].shape[0], n),
    )
    return sorted(names[:k])


def _choose_baseline(
    rows: list[dict[str, Any]], baseline: str | None, excluded: list[Excluded]
) -> tuple[str, dict[str, str]]:
    """The baseline's display label and each row's baseline row label.

    ``baseline`` may be a row label (one baseline for every row, the first row if None) or,
    in a grid with sweep axes besides the seed, a variant name: then each row is compared with
    that variant's row at the same sweep values (its own condition), from the same folder and
    setup when rows were split (:func:`summarize`). A name that reads both ways is refused."""
    labels = [r["variant"] for r in rows]
    if baseline is None:
        baseline = labels[0]
    per_condition = {}
    for row in rows:
        run = row["runs"][0]
        if VARIANT_AXIS in run.values:
            base = variant_label(run.name, {**run.values, VARIANT_AXIS: baseline})
            per_condition[row["variant"]] = row_label(base, row["prefix"], row["suffix"])
    conditional = any(b in labels and b != baseline for b in per_condition.values())
    if baseline in labels:
        if conditional:
            raise FusionkitError(
                f"--baseline {baseline!r} is both a row of its own and a variant compared per "
                f"condition (e.g. {next(b for b in per_condition.values() if b != baseline)!r}); "
                "report the grid folder without that run, or pass the full label of the one "
                f"row to compare every row with (rows: {first_few(labels, 6)})"
            )
        return baseline, {label: baseline for label in labels}
    if per_condition and any(b in labels for b in per_condition.values()):
        missing = sorted({b for b in per_condition.values() if b not in labels})
        if missing:
            raise FusionkitError(
                f"--baseline {baseline!r}: no complete runs for {', '.join(missing)} (failed, "
                "pending or incomplete), so the rows of that condition have no baseline; finish "
                "those runs or name one row label as the baseline"
            )
        if len(per_condition) < len(labels):
            raise FusionkitError(
                f"--baseline {baseline!r} is a variant name, but some rows do not come from a "
                "grid with named variants; name one row label as the baseline instead"
            )
        return f"{baseline} (same sweep values)", per_condition
    named = [r["variant"] for r in rows if r["label"] == baseline]
    if len(named) == 1:  # a label that the report showed with a folder prefix or a suffix
        return named[0], {label: named[0] for label in labels}
    if named:
        raise FusionkitError(
            f"--baseline {baseline!r} is shown in {len(named)} rows ({first_few(named, 6)}); "
            "pass one of these labels"
        )
    if any(e.variant == baseline for e in excluded):
        raise FusionkitError(
            f"--baseline {baseline!r} has no complete run (all its runs are left out: failed, "
            f"pending or incomplete); variants with results: {', '.join(labels)}"
        )
    raise FusionkitError(
        f"--baseline {baseline!r} is not a variant of these runs; variants: {', '.join(labels)}"
    )


def _add_comparisons(rep: Report, cache: dict) -> None:
    """Each row's paired test against the baseline (refused across different data), the Holm
    adjustment, and notes on every refusal."""
    by_label = {r["variant"]: r for r in rep.rows}
    for row in rep.rows:
        base = by_label[rep.baseline_of[row["variant"]]]
        row["same_data"] = data_mismatch([*row["runs"], *base["runs"]], rep.split) is None
        if row is base:
            row["delta"] = None
            continue
        row["delta"] = compare(row, base, rep.split, rep.n_boot, rep.boot_seed, cache)
        if isinstance(row["delta"], str):
            why = row["delta"]
            if not row["same_data"]:
                why += (
                    f"; the {rep.split} data fingerprints in metrics.json differ from those of "
                    f"the baseline {base['variant']}, so the CCCs are not directly comparable "
                    "either"
                )
            rep.notes.append(f"{row['variant']}: no paired test against {base['variant']} ({why}).")
    adjust_holm(rep.rows)


def _add_seed_caveats(rep: Report) -> None:
    """A note for each significant Δ CCC mean (the only CCC with one target) smaller than the
    std over seeds of either row: the paired test resamples test videos, not training runs,
    so such a Δ may not survive other seeds. Sets each row's ``within_seed_spread`` (None
    without a paired test or with a single seed)."""
    key = metric_keys(rep.targets)[-1]  # the mean of the targets, or the only one
    name = "CCC mean" if key == "ccc_mean" else f"CCC {key.removeprefix('ccc_')}"
    by_label = {r["variant"]: r for r in rep.rows}
    for row in rep.rows:
        base = by_label[rep.baseline_of[row["variant"]]]
        row["within_seed_spread"] = None  # no paired test, or a single seed: not judged
        if row is base or not isinstance(row.get("delta"), BootstrapResult):
            continue
        if min(len(row["seeds"]), len(base["seeds"])) < 2:
            continue
        delta = float(row["delta"].delta[-1])
        spread = max(row[key][1], base[key][1])
        row["within_seed_spread"] = abs(delta) < spread
        if significant(row, -1) and abs(delta) < spread:
            rep.notes.append(
                f"{row['variant']}: Δ {name} {delta:+.3f} against {base['variant']} is "
                f"significant over the test videos but smaller than the spread between seeds "
                f"(std up to {spread:.3f}); the test does not cover training randomness, so "
                "more seeds are needed before calling it a difference."
            )


def _add_components(rep: Report) -> None:
    """Each row's components (kind -> labels) and a note when its runs disagree."""
    for row in rep.rows:
        row["components"] = variant_components(row)
        kinds = {(c.get("kind"), c.get("name")) for run in row["runs"] for c in run.components}
        if len(kinds) < sum(len(v) for v in row["components"].values()):
            rep.notes.append(
                f"{row['variant']}: its runs were made with different plugin versions "
                "(see the components table)."
            )


def _add_left_out(rep: Report) -> None:
    """Each row's left-out runs and grid points: those of its label, and when the label's rows
    were split by folder (:func:`summarize`), those in the row's folders; when they were split
    by setup, a run whose saved recipe matches one row's setup counts against that row only
    (one whose recipe cannot be read, or matches several, against each)."""
    setups = {id(r): _recipe_setup(r["runs"][0].recipe) for r in rep.rows}  # each once
    saved = {id(e): _recipe_setup(e.recipe) for e in rep.excluded if e.recipe is not None}
    for row in rep.rows:
        homes = {str(_home(r)) for r in row["runs"]}
        siblings = [
            r for r in rep.rows if (r["label"], r["prefix"]) == (row["label"], row["prefix"])
        ]
        row["left_out"] = [
            e
            for e in rep.excluded
            if e.variant == row["label"]
            and e.status != "duplicate"
            and (not row["prefix"] or str(Path(e.where).parent) in homes)
            and _may_belong(saved.get(id(e)), row, siblings, setups)
        ]


def _may_belong(
    own: dict[str, str] | None,
    row: dict[str, Any],
    siblings: list[dict[str, Any]],
    setups: dict[int, dict[str, str]],
) -> bool:
    """Whether a left-out run of recipe setup ``own`` (None: unknown) could be a run of
    ``row``'s setup among the rows of one label (``setups``: each row's, by ``id``)."""
    if len(siblings) < 2 or own is None:
        return True
    differ = _differing([setups[id(r)] for r in siblings])
    matches = [r for r in siblings if all(own.get(k) == setups[id(r)].get(k) for k in differ)]
    return len(matches) != 1 or matches[0] is row


def _add_throughput(rep: Report, measure: bool, remeasure: bool, registry: Any) -> None:
    """Inference frames/s of each row's first run (measured now or read from its cache)."""
    from fusionkit.studies.robustness import THROUGHPUT_FILE, measure_throughput, read_throughput

    for row in rep.rows:
        first = row["runs"][0].run_dir
        row["throughput"] = None
        try:
            if measure:
                row["throughput"] = measure_throughput(
                    first, rep.split, registry=registry, refresh=remeasure
                )
            elif (first / THROUGHPUT_FILE).is_file():  # --no-throughput: caches of this split
                row["throughput"], why = read_throughput(first / THROUGHPUT_FILE, rep.split)
                if row["throughput"] is None:
                    rep.notes.append(
                        f"{row['variant']}: no frames/s: {why}; make the report without "
                        "--no-throughput to measure it."
                    )
        except (FusionkitError, OSError) as exc:
            rep.notes.append(f"{row['variant']}: throughput not measured ({exc}).")
    used = [r for r in rep.rows if r["throughput"]]
    setups = {(r["throughput"]["device"], r["throughput"]["threads"]) for r in used}
    if len(setups) > 1:  # cached on different machines or settings: not one comparison
        held = "; ".join(
            f"{r['variant']}: {r['throughput']['device']}, {r['throughput']['threads']} thread(s)"
            for r in used
        )
        rep.notes.append(
            f"frames/s left out: the cached measurements were made on different devices or "
            f"thread counts ({held}); make the report without --no-throughput to measure every "
            "variant under the same conditions."
        )
        for r in used:
            r["throughput"] = None
        used = []
    if used:
        tp = used[0]["throughput"]
        rep.throughput_note = (
            "frames/s: inference over the whole split as evaluation runs it (the recipe's "
            "windows, hop and batch size, overlapping windows averaged), the fastest of at least "
            "5 passes, for the first seed's run of each variant, on "
            f"{tp['device']} with {tp['threads']} thread(s) (cached in the run's "
            "`throughput.json`, measured again for another split, device or thread count)"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")


def _unused_key(key: str, taken: dict[str, Any]) -> str:
    """``key``, or ``key-2``, ``key-3`` ...: the first that names no plot yet (two labels
    can share a file-name slug: ``tg+1`` and ``tg-1``)."""
    n, out = 1, key
    while out in taken:
        n += 1
        out = f"{key}-{n}"
    return out


def _score_figures(rep: Report) -> None:
    """The CCC bars (zoomed axis) and the Δ-with-interval plot."""
    from fusionkit.studies import plots

    keys = metric_keys(rep.targets)
    names = [k.replace("ccc_", "") for k in keys]
    labels = [r["variant"] for r in rep.rows]
    mean = np.array([[r[k][0] for k in keys] for r in rep.rows])
    std = np.array([[r[k][1] for k in keys] for r in rep.rows])
    title = f"CCC on {rep.split} (mean ± std over seeds)"
    rep.plots["ccc"] = plots.png(plots.ccc_bars_figure(labels, names, mean, std, title))
    rep.plot_titles["ccc"] = f"CCC per variant on {rep.split} (y axis does not start at 0)"
    tested = [r for r in rep.rows if isinstance(r["delta"], BootstrapResult)]
    if not tested:
        return
    delta = np.array([r["delta"].delta for r in tested])
    low = np.array([r["delta"].ci_low for r in tested])
    high = np.array([r["delta"].ci_high for r in tested])
    sig = np.array([[significant(r, j) for j in range(len(keys))] for r in tested])
    title = (
        f"Δ CCC vs {rep.baseline} on {rep.split}\n"
        f"95% paired-bootstrap interval; filled: Holm p < {ALPHA}"
    )
    rep.plots["delta"] = plots.png(
        plots.delta_figure([r["variant"] for r in tested], names, delta, low, high, sig, title)
    )
    rep.plot_titles["delta"] = f"Differences from {rep.baseline} on {rep.split}"


def _curve_figure(rep: Report) -> None:
    """Learning curves: validation CCC mean and training loss per epoch."""
    from fusionkit.studies import plots

    panels = [p for p in ("val_ccc_mean", "train_loss") if any(p in c.stats for c in rep.curves)]
    if not panels:
        return
    curves = [
        {
            "label": c.variant,
            "epoch": c.epochs,
            **{
                p: (c.stats[p]["mean"], c.stats[p]["min"], c.stats[p]["max"])
                for p in panels
                if p in c.stats
            },
        }
        for c in rep.curves
        if all(p in c.stats for p in panels)
    ]
    title = "Learning curves: mean over seeds, band = min-max over seeds"
    rep.plots["curves"] = plots.learning_curves(curves, panels, title)
    rep.plot_titles["curves"] = "Validation CCC mean and training loss per epoch"


def _robustness_figures(rep: Report) -> None:
    from fusionkit.studies import plots

    for sw in rep.sweeps:
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
        rep.plots[f"robustness_{sw.slug}"] = plots.robustness_curves(curves, sw.axis, title)
        rep.plot_titles[f"robustness_{sw.slug}"] = title.replace("\n", "; ")


@dataclass(frozen=True)
class FlagGate:
    """A gated variant's mean step weights of one stream on the frames a dataset flag marks
    (``inside``) and on the other frames (``outside``), pooled over every frame of the split
    and averaged over the seeds (``runs``)."""

    variant: str
    stream: str
    flag: str
    steps: tuple[str, ...]
    inside: tuple[float, ...]
    outside: tuple[float, ...]
    frames_flagged: float
    runs: int


def flag_gate_weights(rep: Report) -> list[FlagGate]:
    """:class:`FlagGate` rows of every gated variant whose predictions carry flags."""
    from fusionkit.studies import plots

    out = []
    for row in rep.rows:
        per: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray, float]]] = {}
        steps: dict[str, tuple[str, ...]] = {}
        for run in row["runs"]:
            preds = read_predictions(run, rep.split)
            if isinstance(preds, str) or not _is_gated(preds):
                continue
            names = preds["videos"]
            flags = sorted({f for n in names for f in preds[n]["flags"]})
            for s in sorted({s for n in names for s in preds[n]["gates"]}):
                w = np.concatenate([preds[n]["gates"][s] for n in names])
                steps[s] = tuple(plots.step_labels(preds["step_names"], w.shape[1]))
                for f in flags:
                    on = np.concatenate(
                        [
                            preds[n]["flags"].get(f, np.zeros(len(preds[n]["pred"]), bool))
                            for n in names
                        ]
                    )
                    if on.any() and (~on).any():
                        per.setdefault((s, f), []).append(
                            (w[on].mean(0), w[~on].mean(0), float(on.mean()))
                        )
        for (s, f), vals in sorted(per.items()):
            inside = np.mean([v[0] for v in vals], axis=0)
            outside = np.mean([v[1] for v in vals], axis=0)
            out.append(
                FlagGate(
                    row["variant"],
                    s,
                    f,
                    steps[s],
                    tuple(map(float, inside)),
                    tuple(map(float, outside)),
                    float(np.mean([v[2] for v in vals])),
                    len(vals),
                )
            )
    return out


def _gate_figures(rep: Report, gate_videos: int) -> None:
    from fusionkit.studies import plots

    for row in rep.rows:
        first = row["runs"][0]
        preds = read_predictions(first, rep.split)
        if isinstance(preds, str) or not _is_gated(preds):
            continue
        chosen = _pick_videos(preds, gate_videos)
        key = _unused_key(f"gates_{_slug(row['variant'])}", rep.plots)
        title = (
            f"{row['variant']} (seed {first.seed}): gate step weights and V/A traces on {rep.split}"
        )
        rep.plots[key] = plots.gate_traces(
            [{"name": n, **preds[n]} for n in chosen],
            list(preds["targets"]),
            title,
            step_names=preds["step_names"],
        )
        rep.plot_titles[key] = title
        rep.gates.append(key)


def _check_targets(rows: list[dict[str, Any]]) -> None:
    """Refuse rows that predict different targets: their CCC columns do not line up."""
    by_targets: dict[tuple[str, ...], Path] = {}
    for row in rows:
        by_targets.setdefault(tuple(row["runs"][0].targets), row["runs"][0].run_dir)
    if len(by_targets) > 1:
        shown = "; ".join(f"{d} predicts [{', '.join(t)}]" for t, d in by_targets.items())
        raise FusionkitError(
            f"the runs predict different targets ({shown}); report runs with the same "
            "model.targets together"
        )


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
    scan = scan_runs(paths)
    if not scan.runs:
        collect_runs(paths)  # raises, naming what was left out
    notes = list(scan.notes)
    rows = summarize(scan.runs, split, notes, scan.excluded)
    _check_targets(rows)
    if not rows:
        have = sorted({s for r in scan.runs for s in r.metrics.get("splits", {})})
        raise FusionkitError(
            f"no run has metrics for split {split!r}; the runs have: {', '.join(have)} "
            "(choose one with --split)"
        )
    shown, baseline_of = _choose_baseline(rows, baseline, scan.excluded)
    rep = Report(
        split=split,
        baseline=shown,
        baseline_of=baseline_of,
        rows=rows,
        targets=rows[0]["runs"][0].targets,
        n_boot=n_boot,
        boot_seed=boot_seed,
        sources=[str(p) for p in paths],
        notes=notes,
        excluded=scan.excluded,
    )
    _add_left_out(rep)
    _add_comparisons(rep, {})
    _add_seed_caveats(rep)
    _add_components(rep)
    _add_throughput(rep, throughput, remeasure, registry)
    rep.curves = learning_curves(rows)
    rep.sweeps = robustness_sweeps(rows, split, rep.notes)
    _score_figures(rep)
    _curve_figure(rep)
    _robustness_figures(rep)
    _gate_figures(rep, gate_videos)
    rep.flag_gates = flag_gate_weights(rep)
    return rep


def fmt_params(params: dict[str, Any]) -> str:
    """``{"modalities": ["audio"], "span": 30}`` -> ``modalities=[audio], span=30``."""

    def one(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ", ".join(one(x) for x in v) + "]"
        return "null" if v is None else str(v)

    return ", ".join(f"{k}={one(v)}" for k, v in params.items())
