"""Grids of runs: a recipe's ``variants`` and ``sweep`` axes expanded into one run directory
per point.

``sweep: {training.seed: [0, 1, 2], data.params.lag_max: [0, 15]}`` gives six runs under
``<output.dir>/<name>/``, each named after its axis values (``seed-0_lag_max-15``).

``variants`` is one more axis whose values are *named sets of overrides*, for factors that
change together (a fusion and its gate)::

    variants:
      concat: {model.fusion: {name: concat}, model.gate.name: last}
      tagf:   {model.fusion.name: rjca, model.gate.name: tagf}
    sweep:
      training.seed: [0, 1, 2]

gives ``concat_seed-0`` ... ``tagf_seed-2`` (the variant name leads the run name). Setting a
component's ``name`` to a different component drops the old component's ``params`` (they
belong to it) unless the same point also sets them.

Finished runs are skipped and interrupted ones resumed, so re-running the same command
continues an interrupted grid; a failing run is recorded in ``grid.json`` and does not stop
the others. A run counts as finished when it has ``metrics.json`` and every robustness sweep
of its recipe is complete; a run that only misses robustness values evaluates them on its
checkpoint without retraining.
"""

from __future__ import annotations

import copy
import itertools
import multiprocessing as mp
import os
import re
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
VARIANT_AXIS = "variant"
_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


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
    """Directory name of a grid point: the variant name, then ``<last path part>-<value>`` per
    sweep axis, joined by ``_``.

    >>> point_tag({"training.seed": 0, "model.gate.name": "tagf"})
    'seed-0_name-tagf'
    >>> point_tag({"variant": "tagf", "training.seed": 1})
    'tagf_seed-1'
    """
    parts = [str(values[VARIANT_AXIS])] if VARIANT_AXIS in values else []
    parts += [f"{k.split('.')[-1]}-{_slug(v)}" for k, v in values.items() if k != VARIANT_AXIS]
    return "_".join(parts)


def _set(raw: dict[str, Any], path: str, value: Any, where: str) -> None:
    """Set a dotted path; setting ``<component>.name`` to another component drops the params
    of the old one (the caller re-applies params the same point sets)."""
    node = raw
    parts = path.split(".")
    for i, p in enumerate(parts[:-1]):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise RecipeError(
                [f"{where}: {'.'.join(parts[: i + 1])} is a {type(node).__name__}, not a mapping"]
            )
    last = parts[-1]
    if last == "name" and "params" in node and node.get("name") != value:
        node["params"] = {}
    node[last] = copy.deepcopy(value)


def _apply(raw: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    """Apply dotted-path overrides, shallow paths first and a ``name`` before its siblings, so
    params set next to a component change are kept."""
    ordered = sorted(
        overrides.items(), key=lambda kv: (kv[0].count("."), kv[0].split(".")[-1] != "name")
    )
    for path, value in ordered:
        if not path or any(not p for p in path.split(".")):
            raise RecipeError([f"{where}: {path!r} is not a dotted recipe path"])
        _set(raw, path, value, f"{where}.{path}")


def _check_axes(recipe: Recipe, source: str) -> None:
    problems = [
        f"sweep.{k}: needs a non-empty list of values" for k, v in recipe.sweep.items() if not v
    ]
    if VARIANT_AXIS in recipe.sweep:
        problems.append(f"sweep.{VARIANT_AXIS}: reserved for `variants:`; declare variants there")
    for name, overrides in recipe.variants.items():
        if not _VARIANT_RE.match(name):
            problems.append(
                f"variants.{name}: variant names are letters, digits, '_', '.', '+' and '-' "
                "(they name run directories)"
            )
        if not overrides:
            problems.append(f"variants.{name}: needs at least one `dotted.path: value` override")
        for path in overrides:
            if path.split(".")[0] in {"sweep", "variants", "output"}:
                problems.append(
                    f"variants.{name}.{path}: a variant cannot set {path.split('.')[0]}"
                )
            if path in recipe.sweep:
                problems.append(
                    f"variants.{name}.{path}: is also a sweep axis; set it in one place only"
                )
    if problems:
        raise RecipeError(problems, source)


def expand_grid(
    recipe: Recipe, source: str = "<recipe>", registry: Registry | None = None
) -> list[GridPoint]:
    """Validate every point of the grid before any run starts."""
    registry = registry or get_registry()
    _check_axes(recipe, source)
    base = recipe.model_dump(mode="json")
    axes: dict[str, list[Any]] = {}
    variants = base.pop("variants")
    if variants:
        axes[VARIANT_AXIS] = list(variants)
    axes.update(base.pop("sweep"))
    grid_dir = str(Path(recipe.output.dir) / recipe.run_name)
    points, tags = [], set()
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        raw = copy.deepcopy(base)
        if VARIANT_AXIS in values:
            name = values[VARIANT_AXIS]
            _apply(raw, variants[name], f"variants.{name}")
        _apply(raw, {k: v for k, v in values.items() if k != VARIANT_AXIS}, "sweep")
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
    """Worker body (also used in-process): train one grid point quietly, or, if it is trained
    already, only evaluate the robustness values it still misses."""
    import torch

    from fusionkit.robustness import run_recipe_robustness
    from fusionkit.runs import prepare_run_dir, read_metrics
    from fusionkit.train import METRICS_FILE, Trainer

    if threads:
        torch.set_num_threads(threads)
    rc = validate_recipe(recipe_json, "<grid point>", registry)
    run_dir = Path(rc.output.dir) / rc.run_name
    if (run_dir / METRICS_FILE).is_file():
        # trained already: evaluate the robustness values it misses, on its checkpoint
        _check_same_training(run_dir, rc, registry)
        run_recipe_robustness(run_dir, rc.evaluation.robustness, registry)
        m = read_metrics(run_dir)
        return {"splits": m["splits"], "best_epoch": m["best_epoch"]}
    resume = run_dir.exists()
    run_dir = prepare_run_dir(rc, resume=resume, registry=registry, run_dir=run_dir)
    result = Trainer(rc, run_dir, console=None, registry=registry).fit(resume=resume)
    assert (run_dir / METRICS_FILE).is_file()
    return {"splits": result.metrics, "best_epoch": result.best_epoch}


def _paths_that_differ(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _paths_that_differ(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path]


def _check_same_training(run_dir: Path, recipe: Recipe, registry: Registry | None) -> None:
    """A finished point may gain robustness sweeps, but nothing else may have changed."""
    from fusionkit.runs import load_run_recipe

    def strip(rc: Recipe) -> dict[str, Any]:
        d = rc.model_dump(mode="json")
        d["evaluation"].pop("robustness")
        return d

    diffs = _paths_that_differ(strip(load_run_recipe(run_dir, registry)), strip(recipe))
    if diffs:
        raise RecipeError(
            [
                f"{run_dir} was trained with a different recipe ({', '.join(diffs[:5])} "
                "differ); only evaluation.robustness may change for a finished run: restore the "
                "recipe, or use another output.dir / name for the new grid"
            ]
        )


def run_grid(
    recipe: Recipe,
    source: str = "<recipe>",
    workers: int = 1,
    console: Console | None = None,
    registry: Registry | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) every point of a recipe's grid; returns the grid record.

    ``executor="local"`` runs points in this process (``workers=1``) or in a pool of
    ``workers`` spawned processes; ``executor="ray"`` submits every point as a Ray task to the
    cluster at ``ray_address`` (default: ``RAY_ADDRESS`` or a new local instance), each task
    asking for ``workers`` CPUs' worth of threads (default 1).
    """
    points = expand_grid(recipe, source, registry)
    grid_dir = Path(recipe.output.dir) / recipe.run_name
    grid_dir.mkdir(parents=True, exist_ok=True)
    from fusionkit.robustness import robustness_complete

    record: dict[str, Any] = {
        "name": recipe.run_name,
        "axes": {k: list(v) for k, v in recipe.sweep.items()},
        "variants": recipe.variants,
        "order": [p.tag for p in points],
        "runs": {p.tag: {"values": p.values, "status": "pending"} for p in points},
    }
    todo = []
    for p in points:
        run_dir = grid_dir / p.tag
        if (run_dir / "metrics.json").is_file() and robustness_complete(run_dir, p.recipe):
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

    if executor == "ray":
        _run_on_ray(todo, workers, done, ray_address)
    elif workers <= 1 or len(todo) <= 1:
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
        queue = list(todo)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            # At most `workers` points are handed to the pool at a time (the pool would
            # otherwise queue more), so after Ctrl-C no worker starts another point.
            running: dict[Future[dict[str, Any]], str] = {}

            def submit_next() -> None:
                p = queue.pop(0)
                job = pool.submit(_run_point, p.recipe.model_dump(mode="json"), threads)
                running[job] = p.tag

            try:
                for _ in range(min(workers, len(queue))):
                    submit_next()
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        tag = running.pop(fut)
                        try:
                            done(tag, fut.result(), None)
                        except Exception as exc:
                            done(tag, None, f"{type(exc).__name__}: {exc}")
                        if queue:
                            submit_next()
            except KeyboardInterrupt:
                # Ctrl-C: start nothing new; running points keep their last finished epoch
                # and resume on the next `fusionkit run` of the same recipe.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    return record


def _run_on_ray(todo: list[GridPoint], threads: int, done: Any, address: str | None) -> None:
    """Dispatch grid points to a Ray cluster (optional dependency ``fusionkit[ray]``).

    Every node needs fusionkit and the plugins the recipe uses installed, and ``output.dir``
    must be on a filesystem all nodes share (each task writes its own run directory).
    """
    try:
        import ray
    except ImportError:
        raise FusionkitError(
            "--executor ray needs Ray: pip install 'fusionkit[ray]' (or use the default local "
            "executor, -j N for parallel processes)"
        ) from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    threads = max(1, threads)
    task = ray.remote(num_cpus=threads, max_retries=0)(_run_point)
    refs = {task.remote(p.recipe.model_dump(mode="json"), threads): p.tag for p in todo}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    done(refs[ref], ray.get(ref), None)
                except Exception as exc:  # RayTaskError wraps the worker's exception
                    cause = getattr(exc, "cause", None) or exc
                    done(refs[ref], None, f"{type(cause).__name__}: {cause}")
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
