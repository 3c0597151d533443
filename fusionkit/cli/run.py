"""``fusionkit run``, ``fusionkit resume`` and ``fusionkit eval``: training a recipe (or a
grid of them), continuing an interrupted run, re-evaluating a finished one."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from fusionkit.cli._common import console, err_console, load, metrics_table
from fusionkit.engine.workers import interrupt_exit_code, sigterm_as_interrupt

__all__ = ["eval_cmd", "register", "resume", "run"]


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(resume)
    app.command("eval")(eval_cmd)


def run(
    recipe: Annotated[
        str | None, typer.Argument(help="recipe YAML (default: the embedded quickstart)")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, e.g. training.lr=1e-3")
    ] = None,
    resume_flag: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue the run in <output.dir>/<name> (or the grid); see also "
            "`fusionkit resume RUN_DIR`",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="parent folder of the run (output.dir)")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="run directory name (output.name)")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    workers: Annotated[
        int, typer.Option("--workers", "-j", min=1, max=256, help="parallel processes for a grid")
    ] = 1,
    strict: Annotated[
        bool, typer.Option("--strict", help="fail if any installed plugin fails to load")
    ] = False,
    executor: Annotated[
        str, typer.Option(help="where grid points run: 'local' processes or a 'ray' cluster")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or local)")
    ] = None,
) -> None:
    """Train and evaluate a recipe (or every point of its grid) into run directories."""
    from fusionkit.core.errors import FusionkitError
    from fusionkit.engine.distributed import Dist
    from fusionkit.engine.runs import RunDir, is_run_dir
    from fusionkit.engine.session import check_recipe, resolve_device, set_threads

    extra = list(overrides or [])
    # as YAML strings (a JSON string is one): --name 2024 is a name, not a number
    if out is not None:
        extra.append(f"output.dir={json.dumps(str(out))}")
    if name is not None:
        extra.append(f"output.name={json.dumps(name)}")
    rc = load(recipe, extra, strict)
    if rc.is_grid:
        _run_grid(rc, workers, quiet, executor, ray_address)
        return
    check_recipe(rc)  # every build-time error, before any folder exists
    threads = set_threads(rc.training.num_threads, share=Dist.local_processes())
    dist = Dist.from_env(resolve_device(rc.training.device, source=rc.source).type)
    target = Path(rc.output.dir) / rc.run_name
    if resume_flag:
        if not is_run_dir(target):
            raise FusionkitError(
                f"--resume: there is no run in {target}; start it without --resume, or name "
                "the run to continue: fusionkit resume RUN_DIR"
            )
        _resume(rc, RunDir.open(target) if dist.is_main else RunDir(target), quiet, dist, threads)
        return
    made = run_dir = None
    try:
        with sigterm_as_interrupt():  # from the folder's first moment (a scheduler's SIGTERM)
            made = RunDir.create(rc) if dist.is_main else None
            path = dist.broadcast(str(made.path) if made else None)
            run_dir = made or RunDir(path)
            _train(rc, run_dir, resume=False, quiet=quiet, dist=dist, threads=threads)
    except KeyboardInterrupt as exc:  # before _train took over: the folder holds nothing yet
        if made is not None and made.remove_if_unstarted():
            err_console.print("\n[yellow]interrupted[/] before the first epoch finished")
        raise typer.Exit(interrupt_exit_code(exc)) from None
    finally:
        if run_dir is not None:
            run_dir.unlock()


def resume(
    run_dir: Annotated[Path, typer.Argument(help="the run directory to continue")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
) -> None:
    """Continue an interrupted run from its last finished epoch (its own recipe.yaml)."""
    from fusionkit.engine.distributed import Dist
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import check_recipe, resolve_device, set_threads

    run = RunDir.open(run_dir)
    rc = run.recipe()
    check_recipe(rc)
    threads = set_threads(rc.training.num_threads, share=Dist.local_processes())
    dist = Dist.from_env(resolve_device(rc.training.device, source=rc.source).type)
    _resume(rc, run, quiet, dist, threads)


def _resume(rc, run, quiet: bool, dist, threads: int) -> None:
    """Continue ``run`` with ``rc`` under its lock (the main process checks that ``rc`` trains
    what the run was created for)."""
    try:
        if dist.is_main:
            run.lock()
            run.check_same_training(rc)
        _train(rc, run, resume=True, quiet=quiet, dist=dist, threads=threads)
    finally:
        run.unlock()


def _train(rc, run, *, resume: bool, quiet: bool, dist, threads: int) -> None:
    from fusionkit.engine.runs import resume_command
    from fusionkit.engine.train import Diverged, ResumeRefused
    from fusionkit.studies.grid import train_and_evaluate

    if not dist.is_main:
        quiet = True
        console.quiet = True
    if resume and run.is_complete():  # every process: none of them trains a finished run
        if dist.is_main:
            run.clean_temp_files()  # a kill's leftovers (e.g. during a robustness sweep)
            _finish_robustness(rc, run, quiet=quiet)
        return
    verb = "resuming" if resume else "fusionkit run"
    again = escape(resume_command(run.path, dist.world_size))
    try:
        with sigterm_as_interrupt():
            console.print(f"[bold]{verb}[/] {escape(rc.run_name)} -> {escape(str(run.path))}")
            result = train_and_evaluate(
                rc, run, resume=resume, console=None if quiet else console, dist=dist
            )
    except KeyboardInterrupt as exc:
        if not dist.is_main:  # rank 0 says what was kept, once
            raise typer.Exit(interrupt_exit_code(exc)) from None
        if not resume and run.remove_if_unstarted():
            err_console.print("\n[yellow]interrupted[/] before the first epoch finished")
        elif run.is_complete():
            err_console.print(
                f"\n[yellow]interrupted[/] during the robustness sweeps: the run is complete and "
                f"the values computed so far are kept in {escape(str(run.path))}\n"
                f"resume with: {again}"
            )
        else:
            err_console.print(
                f"\n[yellow]interrupted[/]: the last finished epoch is saved in "
                f"{escape(str(run.path))}\nresume with: {again}"
            )
        raise typer.Exit(interrupt_exit_code(exc)) from None
    except Exception as exc:  # a FusionkitError, or a crash (out of memory, a plugin's bug)
        if dist.is_main:
            # nothing started: remove the folder, so that a retry gets the same name
            removed = not resume and run.remove_if_unstarted()
            kept = not removed and (run / "state.safetensors").is_file()
            if kept and isinstance(exc, Diverged):  # resume is exact: it would diverge again
                err_console.print(
                    f"the finished epochs are kept in {escape(str(run.path))}, but resuming it "
                    "repeats the same steps: start a new run with the fix (another "
                    "training.lr, a training.grad_clip, or other data)"
                )
            elif kept and not isinstance(exc, ResumeRefused):  # that one says how to go on
                err_console.print(
                    f"the last finished epoch is saved in {escape(str(run.path))}; after fixing "
                    f"the cause, resume with: {again}"
                )
        raise
    console.print(
        metrics_table(
            f"{rc.run_name} (best epoch {result.best_epoch})",
            result.metrics,
            list(rc.model.targets),
        )
    )
    console.print(f"run directory: {escape(str(run.path))}")


def _finish_robustness(rc, run, *, quiet: bool) -> None:
    """A complete run (locked by the caller): evaluate the values of ``rc``'s robustness
    sweeps that its ``robustness/`` folder lacks (a sweep interrupted after training, or one
    added with ``run --resume``), on the run's best weights; nothing to do when none is."""
    from fusionkit.engine.runs import resume_command
    from fusionkit.engine.session import load_run
    from fusionkit.studies.robustness import missing_by_sweep, results_path, run_recipe_robustness

    specs = list(rc.evaluation.robustness)
    todo = [
        f"{spec.label} ({len(miss)} of {len(spec.values) * len(spec.splits)})"
        for spec, miss in zip(specs, missing_by_sweep(run.path, specs), strict=True)
        if miss
    ]
    if not todo:
        console.print(
            f"{escape(str(run.path))} is complete already; nothing to do (its results are in "
            f"{escape(str(run.path / 'metrics.json'))})"
        )
        return
    console.print(
        f"{escape(str(run.path))} is complete; evaluating the robustness values it misses on "
        f"its best weights (no training): {escape(', '.join(todo))}"
    )

    def on_value(split: str, value: object, metrics: dict) -> None:
        if not quiet:
            console.print(
                f"  {escape(split)} {escape(repr(value))}: CCC-mean {metrics['ccc_mean']:.4f}"
            )

    try:
        with sigterm_as_interrupt():
            session = load_run(run, device=rc.training.device).session
            run_recipe_robustness(run, specs, session=session, on_value=on_value)
    except KeyboardInterrupt as exc:
        err_console.print(
            f"\n[yellow]interrupted[/]: the robustness values computed so far are kept in "
            f"{escape(str(run.path))}\nresume with: {escape(resume_command(run.path))}"
        )
        raise typer.Exit(interrupt_exit_code(exc)) from None
    for spec in specs:
        where = results_path(run.path, spec)
        console.print(f"robustness {escape(spec.label)}: {escape(str(where))}")
    console.print(f"run directory: {escape(str(run.path))}")


def _run_grid(rc, workers: int, quiet: bool, executor: str, ray_address: str | None) -> None:
    import os

    from fusionkit.core.errors import FusionkitError
    from fusionkit.studies.grid import run_grid

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FusionkitError(
            "a recipe with sweep/variants cannot run under torchrun: run the grid without "
            "torchrun (points run one after another), or torchrun one point at a time"
        )
    if executor not in ("local", "ray"):
        raise FusionkitError(f"--executor: unknown {executor!r}; use 'local' or 'ray'")
    try:
        with sigterm_as_interrupt():
            record = run_grid(
                rc,
                workers=workers,
                console=None if quiet else console,
                executor=executor,
                ray_address=ray_address,
            )
    except KeyboardInterrupt as exc:
        again = escape(shlex.join(["fusionkit", *sys.argv[1:]]))  # overrides and -j included
        err_console.print(
            "\n[yellow]interrupted[/]: finished points are kept and running ones keep their "
            f"last finished epoch; continue with the same command: {again}"
        )
        raise typer.Exit(interrupt_exit_code(exc)) from None
    failed = [t for t, r in record["runs"].items() if r["status"] != "done"]
    if failed:
        err_console.print(f"[red]{len(failed)} run(s) failed[/]: {escape(', '.join(failed))}")
        raise typer.Exit(1)


def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    split: Annotated[
        list[str] | None, typer.Option("--split", help="split(s) to evaluate (default: the run's)")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            help="auto (CUDA when present), cpu or cuda (default: the device type the run was "
            "evaluated on, when this machine has it)"
        ),
    ] = None,
) -> None:
    """Reload a run's best weights and recompute its metrics; compares with metrics.json
    (exactly: every stored number must come out bit for bit the same)."""
    from fusionkit.engine.evaluate import evaluate_splits
    from fusionkit.engine.runs import PREDICTIONS_DIR, RunDir, check_unchanged, read_metrics
    from fusionkit.engine.session import (
        data_as_evaluated,
        evaluated_device,
        load_run,
        set_run_threads,
    )

    run = RunDir.open(run_dir)
    threads, origin = set_run_threads(run, run.recipe().training.num_threads)
    loaded = load_run(run, device=device or evaluated_device(run))
    rc = loaded.session.recipe
    stored = read_metrics(run.path, list(rc.model.targets))
    splits = list(dict.fromkeys(split or rc.evaluation.splits))  # --split val --split val: once
    digests = run.marker().files
    for s in splits:  # other data than the run's cannot reproduce its numbers: say why
        if s in stored["splits"]:
            data_as_evaluated(run, loaded.session, s, stored)
            # the predictions the report reads must be those the metrics came from
            check_unchanged(run.path, digests, f"{PREDICTIONS_DIR}/{s}.safetensors")
    results, _, _ = evaluate_splits(loaded.session, splits)
    console.print(metrics_table(f"{rc.run_name} (re-evaluated)", results, list(rc.model.targets)))
    mismatches = [
        f"{s}.{k}: stored {stored['splits'][s].get(k)!r}, now {v!r}"
        for s, m in results.items()
        for k, v in m.items()
        if s in stored["splits"] and stored["splits"][s].get(k) != v
    ]
    how = f"{loaded.session.device}, {threads} thread{'s' if threads != 1 else ''} {origin}"
    if mismatches:
        err_console.print(
            f"[red]differs from metrics.json[/] (compared exactly; re-evaluated on {escape(how)}):"
            "\n  " + escape("\n  ".join(mismatches))
        )
        raise typer.Exit(1)
    compared = [s for s in splits if s in stored["splits"]]
    shown = [s for s in splits if s not in stored["splits"]]
    if shown:
        console.print(
            f"{escape(', '.join(shown))}: not in metrics.json (the run evaluated "
            f"{escape(', '.join(sorted(stored['splits'])) or 'no split')}); shown, not compared"
        )
    if compared:
        console.print(
            f"[green]reproduces metrics.json exactly[/] ({', '.join(compared)}; "
            f"re-evaluated on {escape(how)})"
        )
