"""``fusionkit runs list``: the status of runs and grid points under a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fusionkit.cli._common import console

runs_app = typer.Typer(no_args_is_help=True, help="Inspect run directories.")


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def runs_list(
    folder: Annotated[Path, typer.Argument(help="a run or grid directory, or a parent of some")],
) -> None:
    """Every run under FOLDER with its status (complete, running or interrupted, incomplete
    when files of a complete run are missing, failed grid points) and its test CCC-mean."""
    from fusionkit.core.errors import CheckpointError, FusionkitError, one_line
    from fusionkit.engine.checkpoint import read_train_state
    from fusionkit.engine.runs import (
        GRID_FILE,
        MARKER_FILE,
        STATE_FILE,
        RunDir,
        read_grid_record,
    )
    from fusionkit.studies.scan import folders_under, read_run

    if not folder.exists():
        raise CheckpointError(f"not found: {folder}")
    table = Table(box=None, padding=(0, 2), pad_edge=False)
    table.add_column("run", overflow="fold")  # paths in full, wrapped (never cut with "…")
    for col in ("status", "epochs", "test CCC-mean"):
        table.add_column(col)
    rows = 0
    found = folders_under(folder)  # links followed once; unreadable folders passed over
    for run_path in [f for f, files in found if MARKER_FILE in files]:
        run = RunDir(run_path)
        status, epochs, score = "?", "", ""
        try:
            m = run.marker()
            status = m.status
            missing = run.missing_files()
            if missing:  # run.json says complete, but files it lists are gone
                status = f"incomplete (files missing: {', '.join(missing)})"
            elif status == "complete":
                status += _robustness_gaps(run)
            if status == "running":
                holder = run.holder()
                status = f"running ({holder})" if holder else "interrupted"
            if (run / STATE_FILE).is_file():
                epochs = str(read_train_state(run / STATE_FILE).epochs_done)
            if status.startswith("complete"):
                # read as a report reads it: the number shown is the run's only if metrics.json
                # and recipe.yaml are the files it wrote
                test = read_run(run.path).metrics["splits"].get("test", {}).get("ccc_mean")
                score = f"{test:.4f}" if isinstance(test, float) else ""
        except FusionkitError as exc:
            status = f"unreadable: {exc}"
        table.add_row(escape(str(run.path)), escape(status), epochs, score)
        rows += 1
    for grid in [f / GRID_FILE for f, files in found if GRID_FILE in files]:
        rec = read_grid_record(grid.parent)
        if rec is None:
            table.add_row(escape(str(grid)), "unreadable (damaged)")
            rows += 1
            continue
        for tag, entry in rec["runs"].items():
            point = grid.parent / tag
            if entry.get("status") == "failed" or not (point / MARKER_FILE).is_file():
                error = one_line(entry.get("error"), pick="final", limit=None)
                why = f"{entry.get('status', 'pending')}" + (f": {error}" if error else "")
                if entry.get("status") == "done":  # recorded as done, but not a run now
                    why = (
                        f"incomplete: no {MARKER_FILE}"
                        if point.is_dir()
                        else "missing: recorded as done, but the run is gone"
                    )
                table.add_row(escape(str(point)), escape(why), "", "")
                rows += 1
    if not rows:
        console.print(f"no fusionkit runs under {escape(str(folder))}")
        return
    console.print(table)


def _robustness_gaps(run) -> str:
    """``", robustness partial (...)"`` when sweeps of the run's recipe miss values (a sweep
    interrupted after training; ``fusionkit resume`` evaluates them), ``", robustness not
    checked (...)"`` when the recipe cannot be validated in this process, else ``""``."""
    from fusionkit.core.errors import FusionkitError, one_line
    from fusionkit.studies.robustness import missing_by_sweep

    try:
        specs = run.recipe().evaluation.robustness
        missing = missing_by_sweep(run.path, specs)
        gaps = [(s.label, len(m), s) for s, m in zip(specs, missing, strict=True)]
    except FusionkitError as exc:  # e.g. a plugin of the recipe is not installed here
        return f", robustness not checked (recipe.yaml: {one_line(exc, pick='first')})"
    shown = [
        f"{label}: {k} of {len(s.values) * len(s.splits)} missing" for label, k, s in gaps if k
    ]
    return f", robustness partial ({'; '.join(shown)})" if shown else ""
