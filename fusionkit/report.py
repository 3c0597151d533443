"""Aggregate finished runs into comparison tables (mean +- std over seeds).

Runs are found under the given directories (a grid directory, a run directory, or a parent of
several). Runs that differ only in ``training.seed`` form one row; the table reports, per
split, CCC per target and their mean as ``mean +- std`` (sample standard deviation, ddof=1)
over the seeds, with the number of seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fusionkit.errors import CheckpointError

__all__ = ["RunRecord", "collect_runs", "markdown_table", "summarize"]

SEED_AXIS = "training.seed"


@dataclass
class RunRecord:
    run_dir: Path
    name: str
    values: dict[str, Any]
    seed: int
    metrics: dict[str, Any]
    targets: list[str]

    @property
    def variant(self) -> str:
        extra = [f"{k.split('.')[-1]}={v}" for k, v in self.values.items() if k != SEED_AXIS]
        return self.name + (f" ({', '.join(extra)})" if extra else "")


def _grid_values(run_dir: Path) -> tuple[str | None, dict[str, Any]]:
    grid = run_dir.parent / "grid.json"
    if grid.is_file():
        rec = json.loads(grid.read_text())
        entry = rec.get("runs", {}).get(run_dir.name)
        if entry is not None:
            return rec.get("name"), entry["values"]
    return None, {}


def collect_runs(paths: list[Path]) -> list[RunRecord]:
    """Every finished run (a folder with ``metrics.json`` and ``recipe.yaml``) under ``paths``."""
    found: list[RunRecord] = []
    for root in paths:
        if not root.exists():
            raise CheckpointError(f"not found: {root}")
        for mfile in sorted(root.rglob("metrics.json")):
            run_dir = mfile.parent
            rfile = run_dir / "recipe.yaml"
            if not rfile.is_file():
                continue
            recipe = yaml.safe_load(rfile.read_text())
            grid_name, values = _grid_values(run_dir)
            found.append(
                RunRecord(
                    run_dir=run_dir,
                    name=grid_name or recipe.get("name") or run_dir.name,
                    values=values,
                    seed=int(recipe["training"]["seed"]),
                    metrics=json.loads(mfile.read_text()),
                    targets=list(recipe["model"]["targets"]),
                )
            )
    if not found:
        raise CheckpointError(f"no finished runs (metrics.json) under {', '.join(map(str, paths))}")
    return found


def _mean_std(xs: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(xs)
    std = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return mean, std


def summarize(runs: list[RunRecord], split: str) -> list[dict[str, Any]]:
    """One row per variant: ``{"variant", "seeds", "ccc_<t>": (mean, std), ..., "params"}``."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        if split in r.metrics.get("splits", {}):
            groups.setdefault(r.variant, []).append(r)
    rows = []
    for variant, members in groups.items():
        keys = [f"ccc_{t}" for t in members[0].targets]
        if len(members[0].targets) > 1:
            keys.append("ccc_mean")
        row: dict[str, Any] = {"variant": variant, "seeds": sorted(m.seed for m in members)}
        for k in keys:
            row[k] = _mean_std([m.metrics["splits"][split][k] for m in members])
        row["params"] = members[0].metrics.get("parameters")
        row["train_seconds"] = statistics.fmean(
            m.metrics.get("train_seconds", 0.0) for m in members
        )
        rows.append(row)
    return rows


def _fmt(ms: tuple[float, float]) -> str:
    mean, std = ms
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no runs)\n"
    metric_keys = [k for k in rows[0] if k.startswith("ccc_")]
    head = [
        "variant",
        *(k.replace("ccc_", "CCC ") for k in metric_keys),
        "seeds",
        "params",
        "train s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["variant"],
            *(_fmt(r[k]) for k in metric_keys),
            str(len(r["seeds"])),
            f"{r['params']:,}" if r["params"] else "",
            f"{r['train_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
