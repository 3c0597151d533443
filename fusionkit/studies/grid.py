"""Running recipes: one run (:func:`train_and_evaluate`), or a grid of runs expanded from a
recipe's ``variants`` and ``sweep`` axes, one run directory per point.

``sweep: {training.seed: [0, 1, 2], data.params.lag_max: [0, 15]}`` gives six runs under
``<output.dir>/<name>/``, each named after its axis values (``seed-0_lag_max-15``).

``variants`` is one more axis whose values are *named sets of overrides*, for factors that
change together (a fusion and its gate)::

    variants:
      concat: {model.fusion: {name: concat}, model.gate.name: last}
      tagf:   {model.fusion.name: rjca, model.gate.name: tagf}
    sweep:
      training.seed: [0, 1, 2]

gives ``concat_seed-0`` ... ``tagf_seed-2`` (the variant name leads the run name). Axis values
and variant overrides are applied to the recipe as it was written, with the same rule as
command-line overrides (:mod:`fusionkit.core.overrides`), and each point is validated once.

Finished points are skipped and interrupted ones resumed, so re-running the same command
continues an interrupted grid. A failing point, or a worker process that dies (out of memory,
a crash in a plugin), is recorded as failed in ``grid.json`` and does not stop the others. A
point counts as finished when its run is complete and every robustness sweep of its recipe
is; a run that only misses robustness values evaluates them without retraining.

Re-running a grid whose recipe changed in anything but its robustness sweeps is refused before
anything is written, naming the points and fields that changed. Run folders of points that are
no longer in the grid (a variant or sweep value removed) are kept and listed in ``grid.json``
under ``stale``. Two points that train the same recipe (``training.seed: [1, 1.0]``) are refused
when the grid is expanded.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import re
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from fusionkit.core.errors import CheckpointError, FusionkitError, RecipeError, one_line
from fusionkit.core.overrides import apply_overrides
from fusionkit.core.params import first_few, short_repr
from fusionkit.core.recipe import Recipe, validate_recipe
from fusionkit.core.registry import Registry, get_registry
from fusionkit.engine.distributed import Dist
from fusionkit.engine.files import atomic_write_json
from fusionkit.engine.progress import duration, train_progress, warnings_to
from fusionkit.engine.runs import (
    GRID_FILE,
    LOCK_FILE,
    STATE_FILE,
    RecipeChanged,
    RunDir,
    check_output_dir,
    is_run_dir,
    read_grid_record,
    read_metrics,
)
from fusionkit.engine.session import (
    Session,
    available_cores,
    bf16_pays,
    build_session,
    check_recipe,
    resolve_device,
    set_threads,
)
from fusionkit.engine.train import (
    RunResult,
    Trainer,
    restore_threads,
    resumed_device,
    resumed_threads,
)
from fusionkit.engine.workers import Terminated, die_with_parent, sigterm_as_interrupt
from fusionkit.studies.robustness import robustness_complete, run_recipe_robustness

__all__ = ["GridPoint", "expand_grid", "point_tag", "run_grid", "train_and_evaluate"]

VARIANT_AXIS = "variant"
MAX_POINTS = 10_000
_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$")


# ----------------------------------------------------------------------------- one run


def train_and_evaluate(
    recipe: Recipe,
    run: RunDir,
    *,
    resume: bool,
    registry: Registry | None = None,
    console: Console | None = None,
    dist: Dist | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train ``recipe`` into ``run`` (continuing its last finished epoch when ``resume``), then
    run the recipe's robustness sweeps on the best weights.

    With a ``console``, what is about to run (model, device, threads, data per split) is
    printed first, then progress per epoch."""
    dist = dist or Dist()
    spec = resumed_device(run, recipe.training.device) if resume else recipe.training.device
    device = dist.device(resolve_device(spec, source=recipe.source))
    session = build_session(recipe, registry, device=device)
    if resume and device.type == "cpu" and recipe.training.num_threads is None:
        restore_threads(run)  # before saying how many threads train
    if console is not None:
        _describe(session, console, dist)
    if resume and dist.is_main:
        run.mark_running()
        run.clean_temp_files()
        changed = run.changed_versions(session.registry) if (run / STATE_FILE).is_file() else []
        if changed:  # the finished epochs were computed by the other code
            warnings.warn(
                f"{run.path} was started with other plugin versions: {'; '.join(changed)}; its "
                "remaining epochs train with the installed ones, so its numbers may differ "
                "from an uninterrupted run's (install the versions it was started with to "
                "resume it exactly)",
                stacklevel=2,
            )
    progress = train_progress(console, recipe.run_name)
    trainer = Trainer(session, run, progress, dist, on_epoch_end)
    result = trainer.fit(resume=resume)
    if recipe.evaluation.robustness and dist.is_main:
        run_recipe_robustness(run, session=session)
    return result


def _describe(session: Session, console: Console, dist: Dist) -> None:
    import torch

    rc = session.recipe
    params = sum(p.numel() for p in session.model.parameters())
    threads = f", {torch.get_num_threads()} CPU thread(s)" if session.device.type == "cpu" else ""
    console.print(
        f"model: {params:,} parameters on {session.device} "
        f"({'bf16' if session.bf16 else 'fp32'}){threads}"
    )
    if session.bf16 and not bf16_pays(session.device):
        console.print(
            "note: this CPU has no AMX, and without it bf16 matrix products run slower than "
            "fp32 ones, so bf16 autocast likely trains slower here; set training.precision=fp32"
        )
    if dist.enabled:
        console.print(
            f"data parallel: {dist.world_size} processes, "
            f"{dist.world_size * rc.training.batch_size} windows per optimizer step"
        )
    parts, longest = [], 0
    for split in dict.fromkeys([rc.data.train_split, rc.data.val_split, *rc.evaluation.splits]):
        videos = session.dataset.videos(split)
        frames = sum(v.num_frames for v in videos)
        longest = max([longest, *(v.num_frames for v in videos)])
        parts.append(f"{split} {len(videos)} videos / {frames:,} frames")
    console.print(f"data: {escape(rc.data.name)}: " + ", ".join(parts))
    if rc.data.window > 2 * longest:
        console.print(
            f"note: data.window {rc.data.window:,} is more than twice the longest video "
            f"({longest:,} frames); every window is padded to {rc.data.window:,} frames, "
            f"which costs time and memory for nothing: data.window={longest} covers every video"
        )


# ----------------------------------------------------------------------------- expansion


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
    return "_".join(parts)[:100].rstrip("._-+") or "point"


def _check_axes(recipe: Recipe) -> None:
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
    for path in recipe.sweep:
        if path.split(".")[0] in {"sweep", "variants", "output"}:
            problems.append(f"sweep.{path}: a sweep cannot set {path.split('.')[0]}")
    n = 1
    for values in [*recipe.sweep.values(), *([list(recipe.variants)] if recipe.variants else [])]:
        n *= max(1, len(values))
    if n > MAX_POINTS:
        problems.append(f"sweep: {n:,} points; a grid has at most {MAX_POINTS:,}")
    if problems:
        raise RecipeError(problems, recipe.source)


def grid_dir(recipe: Recipe) -> Path:
    """``<output.dir>/<run name>``: a grid's folder, or for a grid point its run directory."""
    return Path(recipe.output.dir) / recipe.run_name


def expand_grid(recipe: Recipe, registry: Registry | None = None) -> list[GridPoint]:
    """Every point of the grid, each validated once, before any run starts."""
    registry = registry or get_registry()
    _check_axes(recipe)
    base = {k: v for k, v in recipe.raw.items() if k not in ("sweep", "variants")}
    axes: dict[str, list[Any]] = {}
    if recipe.variants:
        axes[VARIANT_AXIS] = list(recipe.variants)
    axes.update(recipe.sweep)
    out_dir = str(grid_dir(recipe))
    points, tags = [], set()
    trained: dict[str, str] = {}  # training_sha256 -> run name
    for combo in itertools.product(*axes.values()):
        values = dict(zip(axes, combo, strict=True))
        overrides = dict(recipe.variants.get(values.get(VARIANT_AXIS), {}))
        overrides.update({k: v for k, v in values.items() if k != VARIANT_AXIS})
        tag = point_tag(values)
        where = f"{'variants.' + str(values[VARIANT_AXIS]) if VARIANT_AXIS in values else 'sweep'}"
        raw = apply_overrides(base, overrides, where, recipe.source)
        if tag in tags:
            raise RecipeError([f"sweep: two points share the run name {tag!r}"], recipe.source)
        tags.add(tag)
        raw["output"] = {"dir": out_dir, "name": tag}
        rc = validate_recipe(raw, f"{recipe.source} [sweep point {tag}]", registry)
        same = trained.setdefault(rc.training_sha256(), tag)
        if same != tag:
            raise RecipeError(
                [
                    f"sweep: points {same} and {tag} train the same recipe (values repeat?); "
                    "remove the repeated value"
                ],
                recipe.source,
            )
        points.append(GridPoint(tag, values, rc))
    return points


# ----------------------------------------------------------------------------- one point


def _open_or_create(recipe: Recipe, registry: Registry | None) -> tuple[RunDir, bool]:
    """The point's run directory, locked, and whether it holds an earlier attempt."""
    path = grid_dir(recipe)
    if is_run_dir(path):
        run = RunDir.open(path).lock()
        run.check_same_training(recipe, registry)
        return run, True
    if path.exists():
        raise CheckpointError(
            f"{path} exists but fusionkit did not create it (no run.json); move it away or use "
            "another output.dir"
        )
    return RunDir.create(recipe, registry, exact=True, in_grid=True), False


def _run_point(
    recipe: Recipe, threads: int | None, registry: Registry | None = None
) -> dict[str, Any]:
    """Train one grid point quietly (or, if it is trained already, only evaluate the robustness
    values it still misses); returns its metrics."""
    set_threads(recipe.training.num_threads or threads)
    run, earlier = _open_or_create(recipe, registry)
    try:
        if earlier and run.is_complete():
            run_recipe_robustness(run, recipe.evaluation.robustness, registry=registry)
            metrics = read_metrics(run.path)
            return {"splits": metrics["splits"], "best_epoch": metrics.get("best_epoch")}
        try:
            result = train_and_evaluate(recipe, run, resume=earlier, registry=registry)
        except BaseException:
            if not earlier:
                run.remove_if_unstarted()
            raise
        return {"splits": result.metrics, "best_epoch": result.best_epoch}
    finally:
        run.unlock()


def _serve(conn: Any, threads: int) -> None:
    """Body of a worker process: run the points it is sent, one at a time, until told to stop
    (``None``); each outcome goes back through ``conn``."""
    die_with_parent()
    # A worker of a grid started as a background job of a script inherits SIGINT ignored; the
    # grid passes SIGTERM on as SIGINT, so the worker must hear it to stop at an epoch end.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # as the command prints them: one line each on standard error, no source excerpt
    warnings.showwarning = warnings_to(Console(stderr=True, soft_wrap=True, highlight=False))
    try:
        _serve_points(conn, threads)
    finally:
        # Its work is over (reported, or told to stop): a Ctrl-C that reaches it now, while the
        # interpreter shuts down, would only print "Exception ignored in atexit callback".
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _serve_points(conn: Any, threads: int) -> None:
    while True:
        try:
            recipe = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if recipe is None:
            return
        try:
            outcome: tuple[str, Any] = ("done", _run_point(recipe, threads))
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: report all the same
            conn.send(("interrupted", "interrupted"))
            return
        except FusionkitError as exc:
            outcome = ("failed", str(exc))
        except BaseException:
            outcome = ("failed", traceback.format_exc(limit=4))
        conn.send(outcome)


def _signal_name(code: int | None) -> str:
    if code is None or code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (out of memory?)" if name == "SIGKILL" else ""
    return f"{name}{hint}"


# ----------------------------------------------------------------------------- the grid


def _grid_record(recipe: Recipe, points: list[GridPoint], stale: list[str]) -> dict[str, Any]:
    return {
        "created_by": "fusionkit",
        "name": recipe.run_name,
        "axes": {k: list(v) for k, v in recipe.sweep.items()},
        "variants": recipe.variants,
        "order": [p.tag for p in points],
        "runs": {p.tag: {"values": p.values, "status": "pending"} for p in points},
        "stale": stale,
    }


def _check_unchanged(points: list[GridPoint], gdir: Path, registry: Registry | None) -> None:
    """Refuse the grid, before anything is written, when an existing run directory of one of
    its points was created by another training recipe (the grid's recipe was edited since)."""
    changed = []
    for p in points:
        run = RunDir(gdir / p.tag)
        try:
            run.marker()
        except CheckpointError:
            continue  # no run yet, or a damaged run.json: that point fails on its own
        try:
            run.check_same_training(p.recipe, registry)
        except RecipeChanged as exc:
            fields = [f"{path} {short_repr(a)} -> {short_repr(b)}" for path, a, b in exc.changes]
            changed.append(f"{p.tag} ({first_few(fields, 3) if fields else exc})")
        except CheckpointError as exc:
            changed.append(f"{p.tag} ({exc})")
    if changed:
        raise CheckpointError(
            f"{gdir} holds {len(changed)} run(s) of this grid trained with another recipe (run "
            f"-> now): {first_few(changed, 3, '; ')}. Nothing was run or written. Restore the "
            "recipe to continue this grid, or run the changed grid into a new folder (another "
            "output.name or output.dir)"
        )


def _point_threads(p: GridPoint, gdir: Path, share: int) -> int:
    """The CPU threads point ``p`` trains with: ``training.num_threads``, else those its
    finished epochs used (a resumed point), else the worker's ``share`` of the cores."""
    asked = p.recipe.training.num_threads
    resumed = None if asked else resumed_threads(gdir / p.tag)
    return min(asked or resumed or share, available_cores())


def _stale_runs(points: list[GridPoint], gdir: Path) -> list[str]:
    """Run directories in the grid folder that are not points of the grid (any more)."""
    tags = {p.tag for p in points}
    return sorted(d.name for d in gdir.iterdir() if d.name not in tags and is_run_dir(d))


def _prepare_grid_dir(recipe: Recipe) -> Path:
    gdir = grid_dir(recipe)
    check_output_dir(gdir.parent, "grid")
    record = gdir / GRID_FILE
    # the grid's lock file alone is what a grid stopped before its first grid.json leaves
    if gdir.exists() and not record.is_file() and any(p.name != LOCK_FILE for p in gdir.iterdir()):
        raise CheckpointError(
            f"{gdir} exists and was not made by a fusionkit grid (no {GRID_FILE}); move it "
            "away or use another output.dir / name"
        )
    if record.is_file() and (read_grid_record(gdir) or {}).get("created_by") != "fusionkit":
        raise CheckpointError(
            f"{record} was not written by fusionkit or is damaged; move {gdir} away or use "
            "another output.dir / name"
        )
    try:
        gdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create {gdir}: {exc.strerror or exc}") from None
    return gdir


def run_grid(
    recipe: Recipe,
    workers: int = 1,
    console: Console | None = None,
    registry: Registry | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run (or continue) every point of a recipe's grid; returns the grid record.

    ``executor="local"`` runs points in this process (``workers=1``) or each point in its own
    process, ``workers`` at a time, each with an equal share of the available cores;
    ``executor="ray"`` submits every point as a Ray task to the cluster at ``ray_address``
    (default: ``RAY_ADDRESS`` or a new local instance).
    """
    points = expand_grid(recipe, registry)
    ray = _import_ray() if executor == "ray" else None  # before anything is written
    gdir = _prepare_grid_dir(recipe)
    _check_unchanged(points, gdir, registry)  # refused before anything, the lock too, is written
    lock = RunDir(gdir).lock()  # one process per grid: a second one is refused, naming this one
    try:
        return _run_locked(recipe, points, gdir, workers, console, registry, ray, ray_address)
    finally:
        lock.unlock()


def _run_locked(
    recipe: Recipe,
    points: list[GridPoint],
    gdir: Path,
    workers: int,
    console: Console | None,
    registry: Registry | None,
    ray: Any,
    ray_address: str | None,
) -> dict[str, Any]:
    """:func:`run_grid` once it holds the grid folder's lock (``ray``: the module, for the
    Ray executor)."""
    _check_unchanged(points, gdir, registry)  # again: runs made while another process held it
    stale = _stale_runs(points, gdir)
    record = _grid_record(recipe, points, stale)
    todo = []
    for p in points:
        run_dir = gdir / p.tag
        if (
            is_run_dir(run_dir)
            and RunDir(run_dir).is_complete()
            and robustness_complete(run_dir, p.recipe)
        ):
            record["runs"][p.tag]["status"] = "done"
        else:
            todo.append(p)
    atomic_write_json(gdir / GRID_FILE, record)
    if workers > 1 or ray is not None:
        todo = _largest_first(todo, registry)
    threads = max(1, available_cores() // max(1, workers))
    counts = sorted({_point_threads(p, gdir, threads) for p in todo or points})
    each = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    say = console.print if console else (lambda *a, **k: None)
    say(
        f"grid {escape(recipe.run_name)}: {len(points)} runs, {len(points) - len(todo)} already "
        f"done, {len(todo)} to run with {workers} worker(s), {each} thread(s) each -> "
        f"{escape(str(gdir))}",
        highlight=False,
        soft_wrap=True,
    )
    if stale:
        say(
            f"note: {len(stale)} run folder(s) in {escape(str(gdir))} are not points of this "
            f"grid any more: {escape(first_few(stale, 5))}; they are kept, and `fusionkit report` "
            "leaves them out",
            highlight=False,
            soft_wrap=True,
        )
    done = _PointLog(record, gdir / GRID_FILE, len(todo), say)
    if ray is not None:
        _run_on_ray(ray, todo, threads, done, ray_address)
    elif workers <= 1 or len(todo) <= 1:
        # a last point left of a -j N grid trains here, with the threads a worker would use:
        # the same command gives the same numbers however many points were left
        share = threads if workers > 1 else None
        for p in todo:
            try:
                done(p.tag, "done", _run_point(p.recipe, share, registry))
            except FusionkitError as exc:
                done(p.tag, "failed", str(exc))
            except Exception:
                done(p.tag, "failed", traceback.format_exc(limit=4))
    else:
        _run_in_processes(todo, workers, threads, done)
    return record


@dataclass
class _PointLog:
    """Called with each finished point: records it in ``grid.json`` at once (so an interrupted
    grid knows what is done) and prints a line with ``k/N``, an ETA and the point's CCCs or
    the last line of its error."""

    record: dict[str, Any]
    path: Path
    total: int
    say: Callable[..., Any]
    finished: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def __call__(self, tag: str, status: str, outcome: Any) -> None:
        self.finished += 1
        entry = self.record["runs"][tag]
        elapsed = time.perf_counter() - self.t0
        eta = duration(elapsed / self.finished * (self.total - self.finished))
        where = f"[{self.finished}/{self.total}, eta {eta}]"
        if status == "done":
            entry["status"] = "done"
            entry.pop("error", None)
            m = (outcome or {}).get("splits", {})
            summary = "  ".join(f"{s} CCC {v['ccc_mean']:.4f}" for s, v in m.items())
            self.say(f"  {where} [green]done[/] {escape(tag)}  {summary}", highlight=False)
        else:
            entry["status"] = "failed"
            entry["error"] = str(outcome)
            last = one_line(outcome, pick="final", limit=None) or "?"
            self.say(
                f"  {where} [red]failed[/] {escape(tag)}: {escape(last)}",
                highlight=False,
                soft_wrap=True,
            )
        atomic_write_json(self.path, self.record)


@dataclass
class _Worker:
    """A worker process, its end of the pipe, and the point it is running (if any)."""

    proc: Any
    conn: Any
    tag: str | None = None

    def give(self, point: GridPoint) -> None:
        self.conn.send(point.recipe)
        self.tag = point.tag


def _largest_first(points: list[GridPoint], registry: Registry | None) -> list[GridPoint]:
    """Points ordered by model size, largest first, so that parallel workers do not end on
    one long run while the others idle (the size, counted on the meta device, is a proxy for
    the training cost)."""

    def size(p: GridPoint) -> int:
        return sum(t.numel() for t in check_recipe(p.recipe, registry).parameters())

    return sorted(points, key=size, reverse=True)


def _run_in_processes(
    todo: list[GridPoint], workers: int, threads: int, done: Callable[[str, str, Any], None]
) -> None:
    """The points on ``workers`` spawned worker processes, reused from point to point (no
    interpreter start-up per point). A worker that dies without reporting (killed, out of
    memory, a segfault in a plugin) fails only the point it was running, and is replaced."""
    ctx = mp.get_context("spawn")
    queue = list(todo)
    pool: list[_Worker] = []

    def spawn() -> _Worker:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(child, threads), daemon=False)
        proc.start()
        child.close()
        return _Worker(proc, parent)

    try:
        while queue or any(w.tag for w in pool):
            for w in pool:
                if w.tag is None and queue:
                    w.give(queue.pop(0))
            while queue and len(pool) < workers:
                pool.append(spawn())
                pool[-1].give(queue.pop(0))
            busy = [w for w in pool if w.tag is not None]
            ready = wait_any([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for w in busy:
                outcome = None
                if w.conn in ready or w.conn.poll():
                    try:
                        outcome = w.conn.recv()
                    except (EOFError, OSError):
                        outcome = None
                tag = w.tag
                if outcome is not None:
                    w.tag = None
                    if outcome[0] == "interrupted":
                        raise KeyboardInterrupt
                    done(tag, *outcome)
                elif w.proc.sentinel in ready:
                    w.proc.join()
                    w.tag = None
                    pool.remove(w)  # replaced when there is work left
                    done(tag, "failed", f"worker process died: {_signal_name(w.proc.exitcode)}")
    except KeyboardInterrupt as exc:
        for w in _pass_interrupt_on(pool, at_once=isinstance(exc, Terminated)):
            w.proc.join(timeout=30)  # it stops at once, keeping its last finished epoch
        _record_sent(pool, done)
        raise
    finally:
        for w in pool:
            if w.proc.is_alive():
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
                w.proc.join(timeout=10)
                if w.proc.is_alive():
                    w.proc.terminate()
            w.conn.close()


#: seconds the workers get to report an interrupt of their own (a terminal's Ctrl-C reaches
#: the whole process group) before it is passed on to them
INTERRUPT_GRACE_S = 2.0


def _pass_interrupt_on(pool: list[_Worker], *, at_once: bool) -> list[_Worker]:
    """Send Ctrl-C (SIGINT) to the workers that did not hear the grid's interrupt, and return
    them: each keeps its last finished epoch and stops, and the next ``fusionkit run`` of the
    recipe resumes it. Idle workers are left to be told to stop like after a finished grid.

    SIGTERM (``at_once``: ``kill``, a scheduler) reaches this process only: every live worker
    is sent SIGINT. A terminal's Ctrl-C reaches every process of the group, a ``kill -INT`` of
    this process only this one: the workers still running a point that have not reported
    within :data:`INTERRUPT_GRACE_S` are sent SIGINT (without it they would train on)."""
    if not at_once:
        deadline = time.monotonic() + INTERRUPT_GRACE_S
        for w in pool:
            if w.tag is not None:
                w.conn.poll(max(0.0, deadline - time.monotonic()))

    def silent(w: _Worker) -> bool:  # running a point, and nothing reported
        return w.tag is not None and not w.conn.poll()

    told = [w for w in pool if w.proc.is_alive() and w.proc.pid and (at_once or silent(w))]
    for w in told:
        os.kill(w.proc.pid, signal.SIGINT)
    return told


def _record_sent(pool: list[_Worker], done: Callable[[str, str, Any], None]) -> None:
    """After an interrupt: record the outcomes workers sent before they stopped (a point that
    finished as the interrupt came is done, not pending)."""
    for w in pool:
        if w.tag is None:
            continue
        try:
            outcome = w.conn.recv() if w.conn.poll() else None
        except (EOFError, OSError):
            outcome = None
        if outcome is not None and outcome[0] != "interrupted":
            done(w.tag, *outcome)
        w.tag = None


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise FusionkitError(
            "--executor ray needs Ray: pip install 'fusionkit[ray]' (or use the default local "
            "executor, -j N for parallel processes)"
        ) from None
    return ray


#: how long an interrupted Ray grid waits for its running points to stop at an epoch boundary
#: before it kills them (their last finished epoch is kept either way)
RAY_STOP_SECONDS = 15.0


def _run_on_ray(
    ray: Any,
    todo: list[GridPoint],
    threads: int,
    done: Callable[[str, str, Any], None],
    address: str | None,
) -> None:
    """Dispatch grid points to a Ray cluster (optional dependency ``fusionkit[ray]``).

    Every node needs fusionkit and the plugins the recipe uses installed, and ``output.dir``
    must be on a filesystem all nodes share (each task writes its own run directory).

    Ctrl-C and SIGTERM stop the grid as they stop a local one: running points are cancelled
    (each keeps its last finished epoch), points not started stay pending, and the
    ``KeyboardInterrupt`` is raised again.
    """
    if not ray.is_initialized():
        sigint = signal.getsignal(signal.SIGINT)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        _set_sigint(sigint)  # in case Ray replaced it: Ctrl-C stops the grid as before
    task = ray.remote(num_cpus=threads, max_retries=0)(_ray_point)
    refs = {task.remote(p.recipe, threads): p.tag for p in todo}
    pending = list(refs)

    def record(ready: list[Any]) -> None:
        for ref in ready:
            try:
                outcome = ray.get(ref)
            except Exception as exc:  # RayTaskError wraps the worker's exception
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, KeyboardInterrupt | ray.exceptions.TaskCancelledError):
                    continue  # stopped by an interrupt: stays pending, resumed next time
                done(refs[ref], "failed", f"{type(cause).__name__}: {cause}")
            else:
                done(refs[ref], "done", outcome)

    # Ray replaces the handler of SIGTERM (a C++ stack dump and exit 134): SIGTERM is an
    # interrupt again while the grid waits, in short steps so that Python's handlers run.
    with sigterm_as_interrupt() as terminated:
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                record(ready)
        except KeyboardInterrupt as exc:
            for ref in pending:
                ray.cancel(ref)  # KeyboardInterrupt in the task: it keeps its last epoch
            left = pending
            try:
                if pending:
                    ready, left = ray.wait(
                        pending, num_returns=len(pending), timeout=RAY_STOP_SECONDS
                    )
                    record(ready)
            finally:
                for ref in left:  # only tasks still running: Ray fails on ended ones
                    ray.cancel(ref, force=True)
            if terminated and not isinstance(exc, Terminated):
                raise Terminated from None  # Ray's wait turns it into a plain KeyboardInterrupt
            raise


def _ray_point(recipe: Recipe, threads: int) -> dict[str, Any]:
    """A grid point as a Ray task. Ray stops a cancelled task with a Ctrl-C of its worker,
    which a worker started from a shell's background job would ignore."""
    _set_sigint(signal.default_int_handler)
    return _run_point(recipe, threads)


def _set_sigint(handler: Any) -> None:
    """Install ``handler`` for SIGINT (in the main thread; elsewhere nothing changes)."""
    if handler is None:  # not installed from Python: nothing to put back
        return
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass
