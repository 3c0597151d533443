"""`fusionkit report`: comparison tables from finished runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.command()(report)


def report(
    paths: Annotated[list[Path], typer.Argument(help="grid or run directories")],
    split: Annotated[str, typer.Option(help="split whose metrics are tabulated")] = "test",
    out: Annotated[Path | None, typer.Option(help="write the Markdown table here")] = None,
) -> None:
    """Table of CCC (mean ± std over seeds) per variant for finished runs."""
    from fusionkit.checkpoint import atomic_write_text
    from fusionkit.report import collect_runs, markdown_table, summarize

    text = markdown_table(summarize(collect_runs(paths), split))
    if out is not None:
        atomic_write_text(out, text)
    typer.echo(text)
