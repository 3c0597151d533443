"""Grids of runs: a recipe's ``sweep`` axes expanded into one run directory per point.

``sweep: {training.seed: [0, 1, 2], data.params.lag_max: [0, 15]}`` gives six runs under
``<output.dir>/<name>/``, each named after its axis values (``seed-0_lag_max-15``). Finished
runs are skipped and interrupted ones resumed, so re-running the same command continues an
interrupted grid; a failing run is recorded in ``grid.json`` and does not stop the others.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing as mp
import os
import re
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from fusionkit.checkpoint import atomic_write_json
from fusionkit.errors import FusionkitError, RecipeError
from fusionkit.recipe import Recipe, validate_recipe
from fusionkit.registry import Registry, get_registry

__all__ = ["GridPoint", "expand_grid", "run_grid"]

GRID_FILE = "grid.json"


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid: its directory name, axis values and validated recipe."""

    tag: str
    values: dict[str, Any]
    recipe: Recipe


def _slug(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def point_tag(values: dict[str, Any]) -> str:
    """Directory name of a grid point: ``<last path part>-<value>`` joined by ``_``.

    >>> point_tag({"training.seed": 0, "model.gate.name": "tagf"})
    'seed-0_name-tagf'
    """
    return "_".join(f"{k.split('.')[-1]}-{_slug(v)}" for k, v in values.items())


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    node = raw
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError([f"sweep.{path}: {p} is not a mapping"])
    node[parts[-1]] = value


def expand_grid(
    recipe: Recipe, source: str = "<recipe>", registry: Registry | None = None
) -> list[GridPoint]:
    """Validate every point of the grid before any run starts."""
    registry = registry or get_registry()
    base = recipe.model_dump(mode="json")
    axes = base.pop("sweep")
    problems = [f"sweep.{k}: needs a non-empty list of values" for k, v in axes.items() if not v]
    if problems:
        raise RecipeError(problems, source)
    grid_dir = str(Path(recipe.output.dir) / recipe.run_name)
    points, tags = [], set()
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        raw = copy.deepcopy(base)
        for path, value in values.items():
            _set(raw, path, value)
        tag = point_tag(values)
        if tag in tags:
            raise RecipeError([f"sweep: two points share the run name {tag!r}"], source)
        tags.add(tag)
        raw["output"] = {"dir": grid_dir, "name": tag}
        rc = validate_recipe(raw, f"{source} [sweep point {tag}]", registry)
        points.append(GridPoint(tag, values, rc))
    return points


def _run_point(
    recipe_json: dict[str, Any], threads: int, registry: Registry | None = None
) -> dict[str, Any]:
    """Worker body (also used in-process): train one grid point quietly."""
    import torch

    from fusionkit.runs import prepare_run_dir
    from fusionkit.train import METRICS_FILE, Trainer

    if threads:
        torch.set_num_threads(threads)
    rc = validate_recipe(recipe_json, "<grid point>", registry)
    run_dir = Path(rc.output.dir) / rc.run_name
    resume = run_dir.exists()
    run_dir = prepare_run_dir(rc, resume=resume, registry=registry, run_dir=run_dir)
    result = Trainer(rc, run_dir, console=None, registry=registry).fit(resume=resume)
    assert (run_dir / METRICS_FILE).is_file()
    return {"splits": result.metrics, "best_epoch": result.best_epoch}


def run_grid(
    recipe: Recipe,
    source: str = "<recipe>",
    workers: int = 1,
    console: Console | None = None,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Run (or continue) every point of a recipe's grid; returns the grid record."""
    points = expand_grid(recipe, source, registry)
    grid_dir = Path(recipe.output.dir) / recipe.run_name
    grid_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "name": recipe.run_name,
        "axes": {k: list(v) for k, v in recipe.sweep.items()},
        "runs": {p.tag: {"values": p.values, "status": "pending"} for p in points},
    }
    todo = []
    for p in points:
        if (grid_dir / p.tag / "metrics.json").is_file():
            record["runs"][p.tag]["status"] = "done"
        else:
            todo.append(p)
    atomic_write_json(grid_dir / GRID_FILE, record)
    say = console.print if console else (lambda *a, **k: None)
    say(
        f"grid {recipe.run_name}: {len(points)} runs, {len(points) - len(todo)} already done, "
        f"{len(todo)} to run with {workers} worker(s) -> {grid_dir}"
    )

    def done(tag: str, outcome: dict[str, Any] | None, error: str | None) -> None:
        entry = record["runs"][tag]
        if error is None:
            entry["status"] = "done"
            entry.pop("error", None)
            m = (outcome or {}).get("splits", {})
            summary = "  ".join(f"{s} CCC {v['ccc_mean']:.4f}" for s, v in m.items())
            say(f"  [green]done[/] {tag}  {summary}")
        else:
            entry["status"] = "failed"
            entry["error"] = error
            say(f"  [red]failed[/] {tag}: {error.splitlines()[-1]}")
        atomic_write_json(grid_dir / GRID_FILE, record)

    if workers <= 1 or len(todo) <= 1:
        for p in todo:
            try:
                done(p.tag, _run_point(p.recipe.model_dump(mode="json"), 0, registry), None)
            except KeyboardInterrupt:
                raise
            except FusionkitError as exc:
                done(p.tag, None, str(exc))
            except Exception:
                done(p.tag, None, traceback.format_exc(limit=3))
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {
                pool.submit(_run_point, p.recipe.model_dump(mode="json"), threads): p.tag
                for p in todo
            }
            for fut in as_completed(futures):
                tag = futures[fut]
                try:
                    done(tag, fut.result(), None)
                except Exception as exc:
                    done(tag, None, f"{type(exc).__name__}: {exc}")
    return record
