"""`fusionkit plugins ...`: list and inspect installed plugins."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(no_args_is_help=True, help="List and inspect installed plugins.")


@app.command("list")
def plugins_list(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="fail on a broken plugin")] = False,
) -> None:
    """Every registered component with its kind, distribution and version."""
    from fusionkit.registry import load_registry

    reg = load_registry(strict=strict or None)
    comps = reg.components()
    if as_json:
        data = {
            "components": [
                {
                    "kind": c.kind,
                    "name": c.name,
                    "distribution": c.distribution,
                    "version": c.version,
                    "plugin": c.plugin,
                    "summary": c.summary,
                }
                for c in comps
            ],
            "failures": [f.__dict__ for f in reg.failures],
        }
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title="fusionkit components")
    for col in ("kind", "name", "distribution", "version", "summary"):
        table.add_column(col)
    for c in comps:
        table.add_row(c.kind, c.name, c.distribution, c.version, c.summary)
    console.print(table)
    for f in reg.failures:
        err_console.print(f"[yellow]skipped plugin {f.plugin} ({f.distribution}): {f.error}[/]")
