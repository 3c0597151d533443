"""Data commands: ``fusionkit extract`` (raw media -> feature caches) and
``fusionkit predict`` (trained runs -> one submission file)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fusionkit.cli._common import console, err_console, load
from fusionkit.core.params import first_few


def extract(
    recipe: Annotated[str, typer.Argument(help="recipe YAML whose data section to extract")],
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, e.g. data.params.root=/x")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", "-j", min=1, help="parallel worker processes")
    ] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
) -> None:
    """Turn a dataset's raw media into per-video feature caches (resumable; valid caches are
    skipped, stale or corrupt ones recomputed). For a grid recipe, the data of every point."""
    from fusionkit.core.errors import DataError
    from fusionkit.core.interfaces import Extractable, ExtractReport
    from fusionkit.core.registry import get_registry
    from fusionkit.engine.session import build_dataset
    from fusionkit.engine.workers import interrupt_exit_code, sigterm_as_interrupt
    from fusionkit.studies.grid import expand_grid

    rc = load(recipe, list(overrides or []))
    registry = get_registry()
    # a grid whose points set other data params (backbones, anchors, ...) needs the caches of
    # each: every distinct data section of its points, each once
    recipes = [p.recipe for p in expand_grid(rc, registry)] if rc.is_grid else [rc]
    sections = {json.dumps(r.data.model_dump(mode="json"), sort_keys=True): r for r in recipes}
    datasets = []
    for r in sections.values():
        dataset = build_dataset(r, registry)
        if not isinstance(dataset, Extractable):
            raise DataError(
                f"dataset {r.data.name!r} reads ready features: there is nothing to extract"
            )
        datasets.append(dataset)
    report = ExtractReport()
    try:
        with sigterm_as_interrupt(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for dataset in datasets:
                report.add(dataset.extract(workers=workers, progress=not quiet))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (timeout, kill, a batch scheduler)
        err_console.print(
            "\n[yellow]interrupted[/]: finished caches are kept; run the same command to resume"
        )
        raise typer.Exit(interrupt_exit_code(exc)) from None
    for w in caught:
        err_console.print(f"[yellow]warning:[/] {escape(str(w.message))}", soft_wrap=True)
    settings = f" ({len(datasets)} data settings of the grid)" if len(datasets) > 1 else ""
    table = Table(title=f"fusionkit extract: {rc.data.name}{settings}")
    for col in ("caches", "computed", "refreshed", "skipped (valid)", "failed", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(
        str(report.total),
        str(report.computed),
        str(len(report.refreshed)),
        str(report.skipped),
        str(len(report.failed)),
        f"{report.seconds:.1f}",
    )
    console.print(table)
    for label, why in report.refreshed.items():
        console.print(f"recomputed {escape(label)}: {escape(why)}", highlight=False)
    for d in report.cache_dirs:
        console.print(f"cache: {escape(str(d))}", highlight=False)
    if report.failed:
        for label, err in report.failed.items():
            err_console.print(
                f"[red]failed[/] {escape(label)}: {escape(err)}", highlight=False, soft_wrap=True
            )
        err_console.print(
            f"[red]{len(report.failed)} job(s) failed[/]; fix them and re-run (valid caches "
            "are kept)"
        )
        raise typer.Exit(1)


def predict(
    runs: Annotated[
        list[Path],
        typer.Argument(help="run directories; together they must cover every target"),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="submission file to write (a new file; never inside a run or grid)"
        ),
    ],
    split: Annotated[
        str, typer.Option(help="split to predict (one the runs' dataset provides)")
    ] = "test",
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="dataset param override KEY=VALUE (repeatable), e.g. --data root=/x "
            "--data test_list=/x/test.txt",
        ),
    ] = None,
    missing_value: Annotated[
        float | None,
        typer.Option(help="fill a target no run predicts with this constant (else an error)"),
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N")
    ] = "auto",
    force: Annotated[
        bool, typer.Option("--force", help="overwrite an existing --out file")
    ] = False,
) -> None:
    """Write per-frame predictions of a split as one CSV file: the ABAW layout
    (image_location,valence,arousal) for datasets with official frame lists such as
    Aff-Wild2, video,frame,<targets> otherwise.

    Every run must be complete and unchanged since it finished, and all of them must have
    predicted the same data (videos and frames)."""
    from fusionkit.engine.predict import check_missing_value, predict_run, write_submission
    from fusionkit.engine.runs import check_output_file

    check_output_file(out, force)  # before any run is loaded: a refused --out is told at once
    check_missing_value(missing_value)
    results = [predict_run(r, split, list(data or []), device=device) for r in runs]
    summary = write_submission(results, out, missing_value)
    console.print(
        f"wrote {out}: {summary['rows']} rows, {summary['videos']} videos, columns "
        f"{', '.join(summary['columns'])}",
        highlight=False,
    )
    for key, text, unit in (
        ("padded", "padded with the last prediction", "rows"),
        ("truncated", "truncated to the listed frames", "frames cut"),
    ):
        if summary[key]:
            items = [f"{v} ({n} of {of} {unit})" for v, (n, of) in summary[key].items()]
            console.print(f"{text}: {first_few(items, 10)}", highlight=False)
    if summary["missing"]:
        err_console.print(
            f"[yellow]filled with {missing_value}[/]: {', '.join(summary['missing'])}"
        )


def register(app: typer.Typer) -> None:
    """Add the data commands to the main app."""
    app.command("extract")(extract)
    app.command("predict")(predict)
