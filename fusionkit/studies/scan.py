"""Finding runs for a report: every run directory and grid point under some folders, the
complete runs read and checked (:class:`RunRecord`), and everything left out with the reason
(:class:`Excluded`).

A run enters a report only when ``run.json`` says it is complete, every file it lists is
there, its recipe is the one it was created with and its ``metrics.json`` has not changed since
(:func:`read_run`). Grid points are read in the grid's declared order; a run in a grid folder
that is no point of the grid as last run is *stale*.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionkit.core.errors import CheckpointError, FusionkitError, one_line
from fusionkit.core.params import first_few
from fusionkit.core.yamlio import read_yaml
from fusionkit.engine.runs import (
    GRID_FILE,
    MARKER_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    RunDir,
    check_unchanged,
    is_run_dir,
    read_grid_record,
    read_metrics,
)

__all__ = [
    "SEED_AXIS",
    "VARIANT_AXIS",
    "Excluded",
    "RunRecord",
    "RunScan",
    "axis_names",
    "collect_runs",
    "folders_under",
    "read_run",
    "scan_runs",
    "variant_label",
]

SEED_AXIS = "training.seed"
VARIANT_AXIS = "variant"


def axis_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest trailing part that no other key ends with."""
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            tail = ".".join(parts[-n:])
            if not any(o != k and (o == tail or o.endswith("." + tail)) for o in keys):
                break
        out[k] = tail
    return out


def variant_label(name: str, values: dict[str, Any]) -> str:
    """Row label of a run: the variant name and the non-seed sweep values, or ``name`` (the
    grid or run name) with them. An axis is named by the last part of its path, or by as many
    parts as it takes to tell it from the other axes (``params.seed`` next to
    ``training.seed``).

    >>> variant_label("g", {"variant": "tagf", "data.params.lag_max": 30, "training.seed": 0})
    'tagf (lag_max=30)'
    >>> variant_label("g", {"variant": "tagf", "data.params.seed": 1, "training.seed": 0})
    'tagf (params.seed=1)'
    """
    names = axis_names(list(values))
    extra = [f"{names[k]}={v}" for k, v in values.items() if k not in (SEED_AXIS, VARIANT_AXIS)]
    head = str(values[VARIANT_AXIS]) if VARIANT_AXIS in values else name
    return head + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class RunRecord:
    """One complete run as the report sees it."""

    run_dir: Path
    name: str
    values: dict[str, Any]
    seed: int
    metrics: dict[str, Any]
    targets: list[str]
    #: sort key: the index of the report path it was found under, grid runs before single
    #: runs, its folder, grid order
    order: tuple[int, bool, str, int] = (0, False, "", 0)
    recipe: dict[str, Any] = field(default_factory=dict)
    components: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """Row label: the variant name and the non-seed sweep values, or the grid/run name."""
        return variant_label(self.name, self.values)

    def fingerprint(self, split: str) -> str | None:
        """The data fingerprint of ``split`` recorded in ``metrics.json`` (None if absent)."""
        fps = self.metrics.get("data_fingerprints")
        value = fps.get(split) if isinstance(fps, dict) else None
        return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Excluded:
    """A grid point or run directory whose numbers are not in the report, and why.

    ``status``: ``failed`` (grid.json records an error), ``pending`` (never started),
    ``incomplete`` (the run directory did not finish), ``missing`` (recorded as done, but the
    run directory is gone), ``unreadable`` (complete, but its files cannot be used),
    ``stale`` (in a grid folder, but no point of the grid as last run), ``no-split`` (not
    evaluated on the report's split) or ``duplicate`` (repeats a seed of the same setup).
    """

    where: str
    variant: str
    status: str
    detail: str
    #: the run's saved recipe when it could be read (tells which setup's row it belongs to)
    recipe: dict[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass
class RunScan:
    """What :func:`scan_runs` found: the usable runs, the left-out ones, and remarks."""

    runs: list[RunRecord]
    excluded: list[Excluded]
    notes: list[str] = field(default_factory=list)


def _last_line(text: Any) -> str:
    return one_line(text, pick="final", limit=None) or "no error message recorded"


def _read_grid(grid_dir: Path, cache: dict[Path, dict[str, Any] | None]) -> dict[str, Any] | None:
    """:func:`read_grid_record` of ``grid_dir``, read once per report."""
    key = grid_dir.resolve()
    if key not in cache:
        cache[key] = read_grid_record(grid_dir)
    return cache[key]


def _grid_order(rec: dict[str, Any]) -> list[str]:
    order = rec.get("order")  # grid.json keys are sorted; "order" is the declared order
    return [str(t) for t in order] if isinstance(order, list) else list(rec["runs"])


def _stale_reason(run_dir: Path, cache: dict) -> str | None:
    """Why a run inside a grid folder is not one of the grid's points (None when it is, or
    when its folder holds no readable grid record): its variant or sweep value was removed
    from the grid's recipe after it ran."""
    rec = _read_grid(run_dir.parent, cache)
    if rec is None or run_dir.name in rec["runs"]:
        return None
    return (
        f"not a point of grid {rec.get('name') or run_dir.parent.name} as last run "
        f"({run_dir.parent / GRID_FILE}): its variant or sweep value was removed from the recipe"
    )


def _grid_entry(run_dir: Path, cache: dict) -> tuple[str | None, dict[str, Any], int]:
    """``(grid name, axis values, index in the grid's order)`` of a run inside a grid."""
    rec = _read_grid(run_dir.parent, cache)
    if rec is not None and run_dir.name in rec["runs"]:
        order = _grid_order(rec)
        index = order.index(run_dir.name) if run_dir.name in order else len(order)
        values = rec["runs"][run_dir.name].get("values") or {}
        return rec.get("name"), dict(values), index
    return None, {}, 0


def _incomplete_reason(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a complete run (None when it is)."""
    if not is_run_dir(run_dir):
        return f"no {MARKER_FILE}: not a complete fusionkit run directory"
    try:
        marker = RunDir(run_dir).marker()
    except CheckpointError as exc:
        return str(exc)
    if marker.status != "complete":
        return f"status {marker.status!r} in {MARKER_FILE}: the run did not finish"
    gone = RunDir(run_dir).missing_files()
    return f"files listed in {MARKER_FILE} are missing: {first_few(gone)}" if gone else None


def read_run(run_dir: Path, grid_cache: dict | None = None, root: int = 0) -> RunRecord:
    """A complete run's record: recipe, metrics (checked against ``run.json``), components.

    Raises :class:`FusionkitError` when a file is missing, damaged or was changed."""
    rd = RunDir(run_dir)
    marker = rd.marker()
    recipe = read_yaml(run_dir / RECIPE_FILE, "run recipe")
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{run_dir / RECIPE_FILE} is not a mapping; the file was edited")
    rd.check_recipe_file(recipe)  # its seed, targets and setup are what the run was made with
    try:
        targets = [str(t) for t in recipe["model"]["targets"]]
        seed = int(recipe["training"]["seed"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"{run_dir / RECIPE_FILE} lacks model.targets or training.seed; the file was edited"
        ) from None
    check_unchanged(run_dir, marker.files, METRICS_FILE)
    metrics = read_metrics(run_dir, targets)
    grid_name, values, index = _grid_entry(run_dir, {} if grid_cache is None else grid_cache)
    components = (marker.model_extra or {}).get("components") or []
    return RunRecord(
        run_dir=run_dir,
        name=grid_name or str(recipe.get("name") or run_dir.name),
        values=values,
        seed=seed,
        metrics=metrics,
        targets=targets,
        order=(root, grid_name is None, str(run_dir.parent.resolve()), index),
        recipe=recipe,
        components=[c for c in components if isinstance(c, dict)],
        files=dict(marker.files),
    )


def _saved_recipe(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``recipe.yaml`` as a mapping, or None when it cannot be read."""
    try:
        recipe = read_yaml(run_dir / RECIPE_FILE, "run recipe")
    except FusionkitError:
        return None
    return recipe if isinstance(recipe, dict) else None


def _recipe_name(run_dir: Path) -> str:
    """A single run's row label as :func:`read_run` gives it: its recipe's name, or the
    folder name when the recipe has none or cannot be read (a run left out still counts
    against its row: ``3 of 4`` seeds)."""
    recipe = _saved_recipe(run_dir)
    name = recipe.get("name") if recipe is not None else None
    return str(name) if name else run_dir.name


def _find(paths: list[Path]) -> tuple[dict[Path, tuple[Path, int]], dict[Path, Path]]:
    """Run directories (a ``run.json`` or a ``metrics.json``) with the index of the first of
    ``paths`` they are under, and grid directories, keyed by resolved path."""
    run_dirs: dict[Path, tuple[Path, int]] = {}
    grid_dirs: dict[Path, Path] = {}
    for i, root in enumerate(paths):
        if not root.exists():
            raise CheckpointError(f"not found: {root}")
        for folder, files in folders_under(root):
            if MARKER_FILE in files or METRICS_FILE in files:
                run_dirs.setdefault(folder.resolve(), (folder, i))
            if GRID_FILE in files:
                grid_dirs.setdefault(folder.resolve(), folder)
    return run_dirs, grid_dirs


def folders_under(root: Path) -> list[tuple[Path, set[str]]]:
    """Every folder under ``root`` (itself included) with the names of its files, sorted.

    Links to folders are followed (runs gathered with ``ln -s``) after everything reached
    without one, and a folder reached through a link is listed under its real path: a grid
    point linked elsewhere stays a point of its grid, and a folder also reached directly is
    listed once. A link to a folder that holds the link (``..``, ``/``) is not followed, and
    a folder that cannot be read is passed over."""
    out: dict[str, tuple[Path, set[str]]] = {}
    links: list[Path] = []
    tops = [root]
    while tops:
        for top, dirs, files in os.walk(tops.pop(0)):
            real = os.path.realpath(top)
            if real in out:
                dirs[:] = []
                continue
            out[real] = (Path(top), set(files))
            links += sorted(Path(top, d) for d in dirs if os.path.islink(os.path.join(top, d)))
        while links and not tops:
            link = links.pop(0)
            target = os.path.realpath(link)
            holder = os.path.realpath(link.parent)
            if target not in out and not _is_within(holder, target):
                tops.append(Path(target))
    return sorted(out.values(), key=lambda item: item[0])


def _is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (both real paths)."""
    return os.path.commonpath([path, folder]) == folder


def _grid_point_issue(
    where: str, label: str, entry: dict[str, Any], left_out: Excluded | None, complete: bool
) -> tuple[Excluded | None, str | None]:
    """The left-out entry of one grid point and a note, from its ``grid.json`` status and its
    run directory (complete, left out, or absent)."""
    status = str(entry.get("status", "pending"))
    if complete:
        if status == "failed":
            note = (
                f"{where}: grid.json records a failure ({_last_line(entry.get('error'))}), but "
                "its run directory is complete; its numbers are used."
            )
            return None, note
        return None, None
    if status == "failed":
        detail = _last_line(entry.get("error"))
        return Excluded(where, label, "failed", detail), None
    if left_out is not None:
        return Excluded(where, label, left_out.status, left_out.detail), None
    if status == "done":
        return Excluded(where, label, "missing", "recorded as done, but the run is gone"), None
    return Excluded(where, label, "pending", "not started"), None


def scan_runs(paths: list[Path]) -> RunScan:
    """Every run directory and grid point under ``paths``: the complete runs, in grid order
    (the order of ``variants`` and sweep values), each once; and everything left out."""
    run_dirs, grid_dirs = _find(paths)
    cache: dict[Path, dict[str, Any] | None] = {}
    runs: dict[Path, RunRecord] = {}
    left_out: dict[Path, Excluded] = {}
    for key, (run_dir, root) in run_dirs.items():
        stale = _stale_reason(run_dir, cache)
        if stale is not None:
            left_out[key] = Excluded(str(run_dir), run_dir.name, "stale", stale)
            continue
        status, reason = "incomplete", _incomplete_reason(run_dir)
        if reason is None:
            try:
                runs[key] = read_run(run_dir, cache, root)
                continue
            except FusionkitError as exc:
                status, reason = "unreadable", str(exc)
        grid_name, values, _ = _grid_entry(run_dir, cache)  # the row it would have been in
        label = variant_label(grid_name or _recipe_name(run_dir), values)
        left_out[key] = Excluded(str(run_dir), label, status, reason, _saved_recipe(run_dir))
    excluded: list[Excluded] = []
    notes: list[str] = []
    for gkey, gdir in grid_dirs.items():
        rec = _read_grid(gdir, cache)
        if rec is None:
            notes.append(f"{gdir / GRID_FILE} cannot be read; its failed points are not listed.")
            continue
        for tag in _grid_order(rec):
            entry = rec["runs"].get(tag) or {}
            key = gkey / tag
            label = variant_label(str(rec.get("name") or gdir.name), entry.get("values") or {})
            item, note = _grid_point_issue(
                str(gdir / tag), label, entry, left_out.pop(key, None), key in runs
            )
            excluded += [item] if item else []
            notes += [note] if note else []
    excluded += list(left_out.values())
    return RunScan(sorted(runs.values(), key=lambda r: r.order), excluded, notes)


def collect_runs(paths: list[Path], scan: RunScan | None = None) -> list[RunRecord]:
    """Every complete run under ``paths`` (``scan``: their :func:`scan_runs`, when made
    already), in grid order, each run once; an error naming what was left out when there is
    none."""
    scan = scan_runs(paths) if scan is None else scan
    if not scan.runs:
        where = ", ".join(map(str, paths))
        shown = first_few([f"{e.where} ({e.status}: {e.detail})" for e in scan.excluded], sep="; ")
        raise CheckpointError(
            f"no complete runs under {where}" + (f"; left out: {shown}" if shown else "")
        )
    return scan.runs
