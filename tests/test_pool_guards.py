"""Guards for running grids and for the data-parallel helper: how a grid is expanded and named,
which threads a point trains with, how failures are recorded, the local worker pool (reused
workers, dead workers replaced, interrupts passed on, workers told to stop), and ``Dist``'s
arithmetic and collectives as one process sees them.

The worker pool is exercised in this process: each "worker process" is a thread that runs the
real worker loop on a real pipe, so the pool's bookkeeping is tested without spawning
interpreters."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as real_wait
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console

import fusionkit.engine.distributed as dist_mod
import fusionkit.engine.workers as workers_mod
import fusionkit.studies.grid as grid_mod
from fusionkit.core.errors import CheckpointError, RecipeError
from fusionkit.core.recipe import Recipe, validate_recipe
from fusionkit.core.registry import Registry
from fusionkit.engine.distributed import Dist
from fusionkit.engine.runs import RunDir
from fusionkit.engine.workers import Terminated, interrupt_exit_code, sigterm_as_interrupt
from fusionkit.studies.grid import GridPoint, expand_grid, point_tag, run_grid
from tests.conftest import tiny_recipe

# ----------------------------------------------------------------------------- helpers


def grid_of(
    tmp_path: Path,
    registry: Registry,
    sweep: dict[str, list[Any]] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    **training: Any,
) -> Recipe:
    """A tiny one-epoch grid recipe writing under ``tmp_path / "runs"``."""
    raw = tiny_recipe(tmp_path / "runs", epochs=1, **training)
    raw["data"]["params"]["videos"] = 1
    if sweep is not None:
        raw["sweep"] = sweep
    if variants is not None:
        raw["variants"] = variants
    return validate_recipe(raw, "grid.yaml", registry)


def no_handlers() -> SimpleNamespace:
    """:mod:`signal` as the grid module uses it, except that installing a handler does
    nothing (this test process keeps its own, and threads may not install any)."""
    return SimpleNamespace(
        signal=lambda *a: None,
        SIGINT=signal.SIGINT,
        SIGTERM=signal.SIGTERM,
        SIG_IGN=signal.SIG_IGN,
        Signals=signal.Signals,
        default_int_handler=signal.default_int_handler,
    )


class _Died(BaseException):
    """Raised by a fake point whose worker process dies under it (killed, out of memory)."""


_worker_local = threading.local()


class FakePool:
    """Stands in for ``multiprocessing``'s spawn context in :mod:`fusionkit.studies.grid`:
    each process is a thread running the real ``_serve_points`` on its end of a real pipe,
    with a sentinel that becomes ready when the thread ends. Records the processes made, the
    points each ran, and the signals sent to them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.procs: list[Any] = []
        self.calls: list[tuple[str, int]] = []
        self.kills: list[tuple[int, int]] = []
        self.methods: list[str] = []
        self.join_timeouts = 0  # joins that ended with the worker still running
        self.lock = threading.Lock()
        pool = self
        ends: dict[int, Connection] = {}

        def pipe() -> tuple[Connection, Connection]:
            parent, child = multiprocessing.Pipe()
            ends[id(child)] = parent
            return parent, child

        class Process:
            def __init__(self, target: Any, args: tuple[Any, int], daemon: bool) -> None:
                self.child, self.threads = args
                self.parent_end = ends[id(self.child)]
                self.pid = 40_000 + len(pool.procs)
                self.exitcode: int | None = None
                self.terminated = False
                self.sentinel, self._done = os.pipe()
                pool.procs.append(self)

            def start(self) -> None:
                conn = Connection(os.dup(self.child.fileno()))  # the parent closes its copy
                self.thread = threading.Thread(target=self._main, args=(conn,), daemon=True)
                self.thread.start()

            def _main(self, conn: Connection) -> None:
                _worker_local.conn = conn
                try:
                    grid_mod._serve_points(conn, self.threads)
                    self.exitcode = 0
                except OSError:  # its pipe was closed under it: it died
                    self.exitcode = -signal.SIGKILL
                finally:
                    conn.close()
                    os.close(self._done)

            def join(self, timeout: float | None = None) -> None:
                self.thread.join(5.0 if timeout is None else min(timeout, 5.0))
                if self.thread.is_alive():
                    pool.join_timeouts += 1

            def is_alive(self) -> bool:
                return self.thread.is_alive()

            def terminate(self) -> None:
                self.terminated = True

        def get_context(method: str) -> SimpleNamespace:
            self.methods.append(method)
            return SimpleNamespace(Pipe=pipe, Process=Process)

        self.interrupted = threading.Event()  # set by a SIGINT sent to a worker

        def kill(pid: int, sig: int) -> None:
            self.kills.append((pid, sig))
            self.interrupted.set()
            proc = next(p for p in self.procs if p.pid == pid)
            proc.parent_end.send(None)  # a Ctrl-C stops the worker between points

        def wait_any(objects: list[Any]) -> list[Any]:
            assert objects, "the pool waits with nothing running"
            ready = real_wait(objects, timeout=20)
            assert ready, "no worker reported within 20 s"
            return ready

        def run_point(recipe: Any, threads: int, registry: Any = None) -> dict[str, Any]:
            name = recipe if isinstance(recipe, str) else recipe.output.name
            with self.lock:
                self.calls.append((name, threads))
            if name.startswith("die"):
                _worker_local.conn.close()
                raise _Died
            if name.startswith("ctrl-c"):
                raise KeyboardInterrupt
            if name.startswith("slow"):  # trains until a SIGINT is sent to its worker
                assert self.interrupted.wait(20), "the running point was never interrupted"
                raise KeyboardInterrupt
            return {"splits": {}, "best_epoch": 1}

        monkeypatch.setattr(grid_mod, "mp", SimpleNamespace(get_context=get_context))
        monkeypatch.setattr(grid_mod, "os", SimpleNamespace(kill=kill))
        monkeypatch.setattr(grid_mod, "signal", no_handlers())  # not from worker threads
        monkeypatch.setattr(grid_mod, "wait_any", wait_any)
        monkeypatch.setattr(grid_mod, "_run_point", run_point)

    def close(self) -> None:
        for p in self.procs:
            os.close(p.sentinel)


@pytest.fixture
def fake_pool(monkeypatch: pytest.MonkeyPatch):
    pool = FakePool(monkeypatch)
    yield pool
    pool.close()


def points(*tags: str) -> list[GridPoint]:
    """Grid points whose "recipe" is their tag (what the fake points look at)."""
    return [GridPoint(t, {}, t) for t in tags]  # type: ignore[arg-type]


class Recorder:
    """The pool's ``done`` callback: records ``(tag, status, outcome)``."""

    def __init__(self, raise_at_first: type[BaseException] | None = None) -> None:
        self.seen: list[tuple[str, str, Any]] = []
        self.raise_at_first = raise_at_first

    def __call__(self, tag: str, status: str, outcome: Any) -> None:
        self.seen.append((tag, status, outcome))
        if self.raise_at_first is not None:
            raise self.raise_at_first


# ----------------------------------------------------------------------------- expansion


def test_values_that_spell_nothing_or_edge_separators_keep_stable_readable_names():
    """A value's slug drops separators at its ends and is ``x`` when nothing is left: run
    folder names are a grid's memory of which points are done, so they must not drift."""
    assert point_tag({"data.params.path": "/data/set/"}) == "path-data-set"
    assert point_tag({"data.params.tag": "", "training.seed": 2}) == "tag-x_seed-2"
    assert point_tag({"data.params.tag": "//"}) == "tag-x"


def test_a_sweep_axis_named_variant_is_refused(tmp_path, registry):
    """``variant`` is the axis of ``variants:``; a sweep of it would be silently ignored."""
    rc = grid_of(tmp_path, registry, {"variant": ["a"], "training.seed": [0]})
    with pytest.raises(RecipeError, match=r"sweep\.variant: reserved for `variants:`"):
        expand_grid(rc, registry=registry)


def test_a_sweep_cannot_set_the_output_location(tmp_path, registry):
    """Every point's output is the grid's folder: a sweep of ``output.*`` is refused, not
    silently overwritten."""
    rc = grid_of(tmp_path, registry, {"output.dir": [str(tmp_path / "x")], "training.seed": [0]})
    with pytest.raises(RecipeError, match=r"sweep\.output\.dir: a sweep cannot set output"):
        expand_grid(rc, registry=registry)


def test_the_point_limit_counts_variants_as_an_axis(tmp_path, registry, monkeypatch):
    """3 variants x 2 seeds = 6 points: over a limit of 5, before any point is built."""
    monkeypatch.setattr(grid_mod, "MAX_POINTS", 5)
    variants = {v: {"model.head.params.hidden": h} for v, h in (("a", 4), ("b", 6), ("c", 8))}
    rc = grid_of(tmp_path, registry, {"training.seed": [0, 1]}, variants)
    with pytest.raises(RecipeError, match=r"sweep: 6 points; a grid has at most 5"):
        expand_grid(rc, registry=registry)


def test_points_cut_to_the_same_run_name_are_refused(tmp_path, registry):
    """A 100-character variant name leaves no room for the seed in a point's name: the two
    seeds would share one run folder (they train different recipes, so only the name check
    can see it)."""
    name = "v" * 100
    rc = grid_of(tmp_path, registry, {"training.seed": [0, 1]}, {name: {"model.gate.name": "last"}})
    with pytest.raises(RecipeError, match=rf"two points share the run name '{name}'"):
        expand_grid(rc, registry=registry)


@pytest.mark.parametrize("name", [".hidden", "-j", "_a", "+a", "a" * 101])
def test_variant_names_start_with_a_letter_or_digit_and_have_at_most_100_characters(
    tmp_path, registry, name
):
    """A variant names a run folder: a leading '.' hides it, a leading '-' reads as an option,
    and names are at most 100 characters."""
    rc = grid_of(tmp_path, registry, variants={name: {"model.gate.name": "last"}})
    with pytest.raises(RecipeError, match=r"variant names are letters, digits"):
        expand_grid(rc, registry=registry)


def test_grid_json_records_axes_variants_order_and_pending_points(tmp_path, registry, monkeypatch):
    """``grid.json`` says what the grid is (axes, variants, declared order) and, for a grid
    stopped before any point finished, every point as pending with its axis values."""

    def interrupted(recipe: Any, threads: Any, registry: Any = None) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(grid_mod, "_run_point", interrupted)
    variants = {"z": {"model.gate.name": "last"}, "a": {"model.head.params.hidden": 4}}
    rc = grid_of(tmp_path, registry, {"training.seed": [1, 0]}, variants)
    with pytest.raises(KeyboardInterrupt):
        run_grid(rc, registry=registry)
    saved = json.loads((tmp_path / "runs" / "tiny" / "grid.json").read_text())
    assert saved["created_by"] == "fusionkit" and saved["name"] == "tiny"
    assert saved["axes"] == {"training.seed": [1, 0]}
    assert saved["variants"] == variants
    assert saved["order"] == ["z_seed-1", "z_seed-0", "a_seed-1", "a_seed-0"]
    assert saved["runs"]["a_seed-0"] == {
        "values": {"variant": "a", "training.seed": 0},
        "status": "pending",
    }
    assert {r["status"] for r in saved["runs"].values()} == {"pending"}
    assert saved["stale"] == []


def test_a_grid_json_written_by_another_tool_is_refused(tmp_path, registry):
    """A folder whose ``grid.json`` fusionkit did not write is not taken for a grid to
    continue; nothing is run or written there."""
    gdir = tmp_path / "runs" / "tiny"
    gdir.mkdir(parents=True)
    (gdir / "grid.json").write_text(json.dumps({"created_by": "mytool", "runs": {}}))
    rc = grid_of(tmp_path, registry, {"training.seed": [0]})
    with pytest.raises(CheckpointError, match=r"was not written by fusionkit or is damaged"):
        run_grid(rc, registry=registry)
    assert [p.name for p in gdir.iterdir()] == ["grid.json"]


def test_an_edited_grid_is_refused_even_when_its_first_points_never_started(
    tmp_path, registry, monkeypatch
):
    """Every point's run is compared with the recipe, not only those before the first point
    without a run: seed-0 never started, seed-1 was made with lr 0.003, and the recipe now
    says 0.01."""
    ran: list[str] = []
    monkeypatch.setattr(grid_mod, "_run_point", lambda rc, *a, **k: ran.append(rc.run_name))
    _, second = expand_grid(grid_of(tmp_path, registry, {"training.seed": [0, 1]}), registry)
    RunDir.create(second.recipe, registry, exact=True).unlock()
    (tmp_path / "runs" / "tiny" / "grid.json").write_text(
        json.dumps({"created_by": "fusionkit", "runs": {}})
    )
    edited = grid_of(tmp_path, registry, {"training.seed": [0, 1]}, lr=0.01)
    with pytest.raises(
        CheckpointError, match=r"holds 1 run\(s\) .*: seed-1 \(training\.lr 0\.003 -> 0\.01\)"
    ):
        run_grid(edited, registry=registry)
    assert ran == []


def test_stale_run_folders_are_listed_in_name_order(tmp_path, registry, monkeypatch):
    """Run folders that are no longer points are recorded and named sorted by name, whatever
    order the file system lists them in."""
    monkeypatch.setattr(grid_mod, "_run_point", lambda *a, **k: {"splits": {}})
    gdir = tmp_path / "runs" / "tiny"
    gdir.mkdir(parents=True)
    (gdir / "grid.json").write_text(json.dumps({"created_by": "fusionkit", "runs": {}}))
    names = ["seed-9", "seed-3", "seed-7", "seed-5", "seed-4", "seed-8"]
    for name in names:
        (gdir / name).mkdir()
        (gdir / name / "run.json").write_text("{}")
    out = io.StringIO()
    record = run_grid(
        grid_of(tmp_path, registry, {"training.seed": [0]}),
        console=Console(file=out, width=400, color_system=None),
        registry=registry,
    )
    assert record["stale"] == sorted(names)
    assert "seed-3, seed-4, seed-5, seed-7, seed-8" in out.getvalue()


# ----------------------------------------------------------------------------- one point


def test_training_num_threads_wins_over_the_workers_share(tmp_path, registry, monkeypatch):
    """A point trains with its recipe's ``training.num_threads`` when set, else the share of
    the cores its worker was given."""
    asked: list[int | None] = []

    class Stop(Exception):
        pass

    def record(n: int | None) -> int:
        asked.append(n)
        raise Stop

    monkeypatch.setattr(grid_mod, "set_threads", record)
    (fixed,) = expand_grid(
        grid_of(tmp_path, registry, {"training.seed": [0]}, num_threads=1), registry
    )
    (shared,) = expand_grid(grid_of(tmp_path / "b", registry, {"training.seed": [0]}), registry)
    for p in (fixed, shared):
        with pytest.raises(Stop):
            grid_mod._run_point(p.recipe, 3, registry)
    assert asked == [1, 3]


def test_the_announced_threads_are_capped_at_the_cores_and_prefer_the_recipe(
    tmp_path, registry, monkeypatch
):
    """Threads of a point: ``training.num_threads`` (capped at the cores), else those its
    finished epochs used, else the worker's share."""
    monkeypatch.setattr(grid_mod, "available_cores", lambda: 4)
    resumed: dict[str, int | None] = {"value": None}
    monkeypatch.setattr(grid_mod, "resumed_threads", lambda path: resumed["value"])
    gdir = tmp_path / "runs" / "tiny"

    def threads(share: int, **training: Any) -> int:
        (p,) = expand_grid(
            grid_of(tmp_path, registry, {"training.seed": [0]}, **training), registry
        )
        return grid_mod._point_threads(p, gdir, share)

    assert threads(2, num_threads=8) == 4
    assert threads(2, num_threads=1) == 1
    assert threads(2) == 2
    resumed["value"] = 3
    assert threads(2) == 3
    assert threads(2, num_threads=1) == 1  # the recipe's setting over the resumed count


def test_the_header_gives_the_range_of_thread_counts(tmp_path, registry, monkeypatch):
    """Points pinned to different ``training.num_threads`` are announced as a range."""
    monkeypatch.setattr(grid_mod, "available_cores", lambda: 4)
    monkeypatch.setattr(grid_mod, "_run_point", lambda *a, **k: {"splits": {}})
    variants = {"one": {"training.num_threads": 1}, "three": {"training.num_threads": 3}}
    out = io.StringIO()
    run_grid(
        grid_of(tmp_path, registry, variants=variants),
        console=Console(file=out, width=300, color_system=None),
        registry=registry,
    )
    assert "2 runs, 0 already done, 2 to run with 1 worker(s), 1-3 thread(s) each" in out.getvalue()


def test_a_crash_keeps_its_traceback_in_grid_json_and_prints_its_last_line(
    tmp_path, registry, monkeypatch
):
    """A point that crashes records the traceback in ``grid.json`` (to debug it later) and
    prints only the error's last line."""

    def crash(recipe: Any, threads: Any, registry: Any = None) -> dict[str, Any]:
        raise ZeroDivisionError("plugin divided by zero")

    monkeypatch.setattr(grid_mod, "_run_point", crash)
    out = io.StringIO()
    run_grid(
        grid_of(tmp_path, registry, {"training.seed": [0]}),
        console=Console(file=out, width=300, color_system=None),
        registry=registry,
    )
    error = json.loads((tmp_path / "runs" / "tiny" / "grid.json").read_text())["runs"]["seed-0"][
        "error"
    ]
    assert error.startswith("Traceback (most recent call last):\n")
    assert "in crash\n" in error
    assert error.endswith("ZeroDivisionError: plugin divided by zero\n")
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("failed seed-0: ZeroDivisionError: plugin divided by zero")
    )


# ----------------------------------------------------------------------------- worker body


class Inbox:
    """A worker's end of the pipe: hands out ``items`` (raising those that are exceptions)
    and records what the worker sends back."""

    def __init__(self, *items: Any) -> None:
        self.items, self.sent = list(items), []

    def recv(self) -> Any:
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def send(self, outcome: Any) -> None:
        self.sent.append(outcome)


def test_a_worker_sends_a_fusionkit_error_as_its_one_line_message(monkeypatch):
    """fusionkit's own errors are already written for the user: a worker reports the message
    alone (no traceback), as the single-process grid does."""

    def refuse(recipe: Any, threads: int) -> dict[str, Any]:
        raise CheckpointError("output.dir /x is not a folder")

    monkeypatch.setattr(grid_mod, "_run_point", refuse)
    inbox = Inbox("a", None)
    grid_mod._serve_points(inbox, 1)
    assert inbox.sent == [("failed", "output.dir /x is not a folder")]


def test_a_grid_records_a_fusionkit_error_as_its_message(tmp_path, registry, monkeypatch):
    """In this process too, a point stopped by a fusionkit error records its message, not a
    traceback."""

    def refuse(recipe: Any, threads: Any, registry: Any = None) -> dict[str, Any]:
        raise CheckpointError("output.dir /x is not a folder")

    monkeypatch.setattr(grid_mod, "_run_point", refuse)
    record = run_grid(grid_of(tmp_path, registry, {"training.seed": [0]}), registry=registry)
    assert record["runs"]["seed-0"] == {
        "values": {"training.seed": 0},
        "status": "failed",
        "error": "output.dir /x is not a folder",
    }


def test_a_worker_interrupted_in_a_point_reports_it_and_runs_no_more(monkeypatch):
    """Ctrl-C in a point: the worker says "interrupted" once and stops, leaving the points it
    was sent afterwards unstarted."""
    ran: list[str] = []

    def interrupted(recipe: str, threads: int) -> dict[str, Any]:
        ran.append(recipe)
        raise KeyboardInterrupt

    monkeypatch.setattr(grid_mod, "_run_point", interrupted)
    monkeypatch.setattr(grid_mod, "signal", no_handlers())
    inbox = Inbox("a", "b", None)
    grid_mod._serve_points(inbox, 1)
    assert ran == ["a"] and inbox.sent == [("interrupted", "interrupted")]


def test_a_worker_interrupted_while_it_waits_stops_quietly():
    """Ctrl-C while a worker waits for its next point ends it without a traceback."""
    inbox = Inbox(KeyboardInterrupt(), "never")
    try:
        grid_mod._serve_points(inbox, 1)
    except KeyboardInterrupt:
        pytest.fail("the worker let a Ctrl-C between points escape")
    assert inbox.sent == [] and inbox.items == ["never"]


def test_a_worker_process_watches_its_parent_before_serving(monkeypatch):
    """A worker first arranges to die with the grid process (a ``kill -9`` of the grid must
    not leave workers holding memory), then serves points."""
    order: list[str] = []
    monkeypatch.setattr(grid_mod, "die_with_parent", lambda: order.append("watch"))
    monkeypatch.setattr(grid_mod, "_serve_points", lambda conn, threads: order.append("serve"))
    monkeypatch.setattr(grid_mod, "signal", no_handlers())
    grid_mod._serve(Inbox(None), 1)
    assert order == ["watch", "serve"]


def test_a_worker_that_died_names_exit_statuses_and_unknown_signals():
    """An exit status of 0 is an exit status (not a "signal 0"); an unknown signal number is
    named by its number."""
    assert grid_mod._signal_name(0) == "exit status 0"
    assert grid_mod._signal_name(-77) == "signal 77"


# ----------------------------------------------------------------------------- the pool


def test_the_pool_reuses_its_workers_and_never_runs_more_than_asked(fake_pool):
    """5 points on 2 workers: 2 spawned processes that take point after point (no interpreter
    start-up per point), each told to stop at the end rather than terminated."""
    done = Recorder()
    grid_mod._run_in_processes(points("a", "b", "c", "d", "e"), 2, 3, done)
    assert fake_pool.methods == ["spawn"]
    assert len(fake_pool.procs) == 2
    assert sorted(t for t, _, _ in done.seen) == ["a", "b", "c", "d", "e"]
    assert {s for _, s, _ in done.seen} == {"done"}
    assert sorted(fake_pool.calls) == [(t, 3) for t in "abcde"]  # each once, with the share
    assert all(p.threads == 3 and p.exitcode == 0 and not p.terminated for p in fake_pool.procs)


def test_a_dead_worker_fails_only_its_point_and_is_replaced(fake_pool):
    """A worker that dies without reporting fails its own point, named by its signal; a new
    worker runs the rest, in order."""
    done = Recorder()
    grid_mod._run_in_processes(points("die-1", "a", "b"), 1, 2, done)
    assert done.seen == [
        ("die-1", "failed", "worker process died: SIGKILL (out of memory?)"),
        ("a", "done", {"splits": {}, "best_epoch": 1}),
        ("b", "done", {"splits": {}, "best_epoch": 1}),
    ]
    assert fake_pool.calls == [("die-1", 2), ("a", 2), ("b", 2)]
    assert len(fake_pool.procs) == 2


def test_a_point_interrupted_in_a_worker_stops_the_pool(fake_pool):
    """A worker's "interrupted" report is Ctrl-C for the grid: it stops, nothing is recorded
    for the point, the next is not started, and no signal is sent (Ctrl-C reached them)."""
    done = Recorder()
    with pytest.raises(KeyboardInterrupt) as info:
        grid_mod._run_in_processes(points("ctrl-c", "a"), 1, 1, done)
    assert not isinstance(info.value, Terminated)
    assert done.seen == [] and fake_pool.calls == [("ctrl-c", 1)]
    assert fake_pool.kills == []


def test_a_ctrl_c_every_worker_heard_is_not_sent_to_them_again(fake_pool):
    """A terminal's Ctrl-C reaches every process of the group: workers that report it
    themselves get no second SIGINT."""
    done = Recorder()
    with pytest.raises(KeyboardInterrupt):
        grid_mod._run_in_processes(points("ctrl-c-1", "ctrl-c-2", "a"), 2, 1, done)
    assert sorted(fake_pool.calls) == [("ctrl-c-1", 1), ("ctrl-c-2", 1)]
    assert done.seen == [] and fake_pool.kills == []


def test_a_ctrl_c_of_the_grid_process_alone_is_passed_on_to_its_running_workers(
    fake_pool, monkeypatch
):
    """`kill -INT` of the grid process (a script, a scheduler) reaches it alone: the workers
    still running a point are sent SIGINT after a short wait for their own reports, so they
    stop at once and keep their last finished epoch instead of training on, and idle workers
    are told to stop: the grid waits on none of them in vain."""
    monkeypatch.setattr(grid_mod, "INTERRUPT_GRACE_S", 0.2)
    done = Recorder(raise_at_first=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt) as info:
        grid_mod._run_in_processes(points("a", "slow"), 2, 1, done)
    assert not isinstance(info.value, Terminated)
    assert [s[:2] for s in done.seen] == [("a", "done")]  # "slow" stays pending
    assert fake_pool.kills == [(fake_pool.procs[1].pid, signal.SIGINT)]
    assert fake_pool.join_timeouts == 0


def test_sigterm_to_the_grid_is_passed_on_to_its_workers_as_ctrl_c(fake_pool):
    """SIGTERM reaches the grid process only: each live worker is sent SIGINT, so that it
    keeps its last finished epoch."""
    done = Recorder(raise_at_first=Terminated)
    with pytest.raises(Terminated):
        grid_mod._run_in_processes(points("a", "b", "c", "d"), 2, 1, done)
    assert sorted(fake_pool.kills) == [(p.pid, signal.SIGINT) for p in fake_pool.procs]
    assert len(fake_pool.procs) == 2


def test_a_parallel_grid_starts_the_largest_models_first_with_a_share_of_one_thread(
    tmp_path, registry, monkeypatch, fake_pool
):
    """-j 8 on 4 cores: each worker gets 1 thread (never 0), and points are handed out
    largest model first so that no worker ends on one long run while the others idle."""
    monkeypatch.setattr(grid_mod, "available_cores", lambda: 4)
    given: list[str] = []
    real_give = grid_mod._Worker.give

    def give(self: Any, point: GridPoint) -> None:
        given.append(point.tag)
        real_give(self, point)

    monkeypatch.setattr(grid_mod._Worker, "give", give)
    variants = {v: {"model.head.params.hidden": h} for v, h in (("a", 4), ("b", 32), ("c", 8))}
    out = io.StringIO()
    record = run_grid(
        grid_of(tmp_path, registry, variants=variants),
        workers=8,
        console=Console(file=out, width=300, color_system=None),
        registry=registry,
    )
    assert given == ["b", "c", "a"]
    assert [p.threads for p in fake_pool.procs] == [1, 1, 1]
    assert "3 to run with 8 worker(s), 1 thread(s) each" in out.getvalue()
    assert [r["status"] for r in record["runs"].values()] == ["done"] * 3
    saved = json.loads((tmp_path / "runs" / "tiny" / "grid.json").read_text())
    assert saved["runs"] == record["runs"]


# ----------------------------------------------------------------------------- signals


class _Exited(Exception):
    pass


def watch_parent(
    monkeypatch: pytest.MonkeyPatch, started_by: int | None, ppids: list[int]
) -> tuple[int | None, bool]:
    """Run ``die_with_parent``'s watcher in this thread, started by process ``started_by``
    (None: not by multiprocessing), with ``os.getppid`` answering ``ppids`` in turn: the exit
    status it ends with (None if it still watches when they run out) and whether its thread
    is a daemon."""
    threads: list[tuple[Any, bool]] = []
    answers = iter(ppids)

    def exit_(code: int) -> None:
        raise _Exited(code)

    def thread(target: Any, name: str, daemon: bool) -> SimpleNamespace:
        return SimpleNamespace(start=lambda: threads.append((target, daemon)))

    parent = None if started_by is None else SimpleNamespace(pid=started_by)
    monkeypatch.setattr(
        workers_mod, "multiprocessing", SimpleNamespace(parent_process=lambda: parent)
    )
    monkeypatch.setattr(workers_mod, "time", SimpleNamespace(sleep=lambda s: None))
    monkeypatch.setattr(
        workers_mod, "os", SimpleNamespace(getppid=lambda: next(answers), _exit=exit_)
    )
    monkeypatch.setattr(workers_mod, "threading", SimpleNamespace(Thread=thread))
    workers_mod.die_with_parent(poll_seconds=0.0)
    ((target, daemon),) = threads
    try:
        target()
    except _Exited as exc:
        return exc.args[0], daemon
    except StopIteration:
        return None, daemon
    return None, daemon


def test_a_worker_exits_when_reparented_to_any_other_process(monkeypatch):
    """The watcher compares the parent with the one it started under: a worker re-parented to
    a subreaper (a container's init, ``systemd --user``), not only to process 1, exits with
    status 1; while the parent lives it keeps watching, from a daemon thread that never holds
    the worker's exit."""
    assert watch_parent(monkeypatch, 4242, [4242, 4242, 555]) == (1, True)
    assert watch_parent(monkeypatch, 4242, [4242, 4242, 4242]) == (None, True)
    assert watch_parent(monkeypatch, None, [77, 77, 31]) == (1, True)


def test_interrupts_exit_with_the_shells_codes():
    """Ctrl-C exits 130 (128 + SIGINT), SIGTERM 143 (128 + SIGTERM)."""
    assert interrupt_exit_code(KeyboardInterrupt()) == 128 + signal.SIGINT == 130
    assert interrupt_exit_code(Terminated()) == 128 + signal.SIGTERM == 143


def test_sigterm_inside_raises_terminated_and_is_counted():
    """Inside, SIGTERM's handler raises :class:`Terminated` and records the signal (so a
    library that turns it into a plain ``KeyboardInterrupt`` cannot hide it); outside, the
    previous handler is back."""
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt() as seen:
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(Terminated):
            handler(signal.SIGTERM, None)
        assert seen == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- Dist


class FakeCollectives:
    """``torch.distributed`` as one rank of a job sees it, the other ranks simulated:
    ``others`` are the values they contribute; every call is recorded."""

    def __init__(self, others: list[Any]) -> None:
        self.others = others
        self.calls: list[tuple[str, Any]] = []

    def all_reduce(self, value: torch.Tensor) -> None:
        self.calls.append(("all_reduce", None))
        for v in self.others:
            value += v

    def all_gather_object(self, out: list[Any], obj: Any) -> None:
        self.calls.append(("all_gather_object", obj))
        out[:] = [obj, *self.others]

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.calls.append(("broadcast", src))

    def barrier(self) -> None:
        self.calls.append(("barrier", None))


def test_mean_is_the_sum_over_ranks_divided_by_their_number(monkeypatch):
    """Rank 0 of 4 with 1.0 and the others 2.0, 3.0, 6.0: every rank gets 12 / 4 = 3.0, and
    the ranks wait for each other at a barrier; a single process returns its value and calls
    no collective at all."""
    fake = FakeCollectives([torch.tensor(2.0), torch.tensor(3.0), torch.tensor(6.0)])
    monkeypatch.setattr(dist_mod, "dist", fake)
    assert Dist(rank=0, world_size=4).mean(torch.tensor(1.0)).item() == pytest.approx(3.0)
    Dist(rank=0, world_size=4).barrier()
    assert fake.calls == [("all_reduce", None), ("barrier", None)]
    fake.calls.clear()
    assert Dist().mean(torch.tensor(5.0)).item() == 5.0
    Dist().barrier()
    Dist().sync_buffers(torch.nn.BatchNorm1d(2))
    assert Dist().broadcast("runs/tiny") == "runs/tiny"
    assert fake.calls == []


def test_gathered_rng_states_give_each_rank_back_its_own(monkeypatch):
    """Rank 0 saves every rank's RNG state suffixed by rank; after a resume each rank takes
    exactly its own state back under the plain names."""
    states = [{"cpu": torch.full((2,), r, dtype=torch.uint8)} for r in range(3)]
    monkeypatch.setattr(dist_mod, "dist", FakeCollectives(states[1:]))
    saved = Dist(rank=0, world_size=3).gather_rng(states[0])
    assert sorted(saved) == ["cpu.0", "cpu.1", "cpu.2"]
    for r in range(3):
        own = Dist(rank=r, world_size=3).own_rng(saved)
        assert list(own) == ["cpu"] and torch.equal(own["cpu"], states[r]["cpu"])
    single = {"cpu": torch.zeros(2, dtype=torch.uint8)}
    assert Dist().gather_rng(single) is single
    # a state without rank suffixes (saved by one process) is used as it is, not dropped
    assert Dist(rank=1, world_size=2).own_rng(single) is single


@pytest.mark.parametrize(("n", "world"), [(1, 3), (2, 5), (3, 8), (4, 4)])
def test_every_rank_gets_its_windows_even_when_the_epoch_has_fewer_than_the_ranks(n, world):
    """Each rank trains ``windows_per_rank(n)`` windows (the step count every rank uses),
    also when there are fewer windows than processes: the permutation is wrapped as often as
    needed, so every window is trained and every rank has a full shard."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(world))
    shards = [Dist(rank=r, world_size=world).shard(perm) for r in range(world)]
    assert [len(s) for s in shards] == [1] * world  # ceil(n / world) = 1 here
    assert {int(i) for s in shards for i in s} == set(range(n))


def test_every_rank_takes_rank_0s_buffers(monkeypatch):
    """Before validation every buffer (BatchNorm's running mean, variance and count) is
    broadcast from rank 0, whichever rank calls."""
    fake = FakeCollectives([])
    monkeypatch.setattr(dist_mod, "dist", fake)
    Dist(rank=1, world_size=2).sync_buffers(torch.nn.BatchNorm1d(3))
    assert fake.calls == [("broadcast", 0)] * 3


def test_each_rank_uses_its_local_gpu_and_one_process_keeps_the_device_asked(monkeypatch):
    """Under torchrun a rank trains on ``cuda:<LOCAL_RANK>`` (not its global rank); a single
    process keeps the device it was given (``cuda:1`` stays ``cuda:1``), and CPU stays CPU."""
    cuda = torch.device("cuda")
    assert Dist(rank=5, world_size=8, local_rank=1).device(cuda) == torch.device("cuda", 1)
    assert Dist().device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert Dist(rank=1, world_size=2, local_rank=1).device(torch.device("cpu")).type == "cpu"
    model = torch.nn.Linear(2, 2)
    assert Dist().wrap(model, torch.device("cpu")) is model


@pytest.mark.parametrize(("value", "expected"), [(None, 1), ("3", 3), ("0", 1), ("two", 1)])
def test_local_processes_reads_local_world_size_and_never_says_fewer_than_one(
    monkeypatch, value, expected
):
    """The processes sharing this machine's cores: ``LOCAL_WORLD_SIZE``, at least 1, and 1
    when it is absent or not a number."""
    if value is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", value)
    assert Dist.local_processes() == expected


def test_from_env_joins_the_job_torchrun_describes(monkeypatch):
    """Without torchrun (no ``WORLD_SIZE``, or 1) it is a single process and joins nothing;
    under it, rank, size and local rank come from the environment, and a CPU job joins with
    gloo, a CUDA one with NCCL on its local GPU."""
    joined: list[str] = []
    devices: list[int] = []
    fake = SimpleNamespace(
        is_initialized=lambda: False, init_process_group=lambda backend: joined.append(backend)
    )
    monkeypatch.setattr(dist_mod, "dist", fake)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert Dist.from_env("cpu") == Dist()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Dist.from_env("cuda") == Dist()
    assert joined == [] and devices == []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert Dist.from_env("cpu") == Dist(rank=3, world_size=4, local_rank=1)
    assert Dist.from_env("cuda") == Dist(rank=3, world_size=4, local_rank=1)
    assert joined == ["gloo", "nccl"] and devices == [1]
    fake.is_initialized = lambda: True  # a process group already joined is not joined again
    assert Dist.from_env("cuda") == Dist(rank=3, world_size=4, local_rank=1)
    assert joined == ["gloo", "nccl"] and devices == [1]
