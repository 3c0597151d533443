"""``fusionkit recipe ...``: validate, show, list and copy recipes; the JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fusionkit.cli._common import console, listing, load

app = typer.Typer(no_args_is_help=True, help="Validate, show, list and copy recipes.")


@app.command("validate")
def recipe_validate(
    recipe: Annotated[str | None, typer.Argument(help="recipe YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="fail if any installed plugin fails to load")
    ] = False,
) -> None:
    """Check a recipe (and overrides) without running it: the schema, every component's params,
    and building the dataset and the model (no data read, no weights allocated)."""
    from fusionkit.engine.session import check_recipe
    from fusionkit.studies.grid import expand_grid

    rc = load(recipe, overrides, strict)
    if rc.is_grid:
        points = expand_grid(rc)
        for p in points:
            check_recipe(p.recipe)
        console.print(
            f"[green]ok[/]: {escape(rc.source)} ({escape(rc.run_name)}, a grid of "
            f"{len(points)} runs)"
        )
        return
    check_recipe(rc)
    console.print(f"[green]ok[/]: {escape(rc.source)} ({escape(rc.run_name)})")


@app.command("show")
def recipe_show(
    recipe: Annotated[str | None, typer.Argument(help="recipe YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Print the resolved recipe (defaults filled in) as YAML."""
    from fusionkit.core.recipe import recipe_to_yaml

    console.out(recipe_to_yaml(load(recipe, overrides)))


@app.command("schema")
def recipe_schema(
    out: Annotated[
        Path | None,
        typer.Option(help="write the schema to this file (a new file; never inside a run or grid)"),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="overwrite an existing --out file")
    ] = False,
) -> None:
    """JSON Schema of recipes with every installed component's params (for editors)."""
    from fusionkit.core.schema import recipe_json_schema
    from fusionkit.engine.files import atomic_write_text
    from fusionkit.engine.runs import check_output_file

    if out is not None:
        check_output_file(out, force)
    text = json.dumps(recipe_json_schema(), indent=2)
    if out is not None:
        atomic_write_text(out, text + "\n")
        console.print(f"wrote {escape(str(out))}")
    else:
        console.out(text)


def _shipped() -> list[tuple[str, Path]]:
    from fusionkit.core.recipe import recipes_root

    root = recipes_root()
    return sorted((str(p.relative_to(root).with_suffix("")), p) for p in root.rglob("*.yaml"))


def _describe(path: Path) -> str:
    from fusionkit.core.errors import FusionkitError
    from fusionkit.core.yamlio import read_yaml

    try:
        raw = read_yaml(path)
    except FusionkitError:
        return ""
    text = str(raw.get("description", "")) if isinstance(raw, dict) else ""
    return " ".join(text.split())


@app.command("list")
@listing
def recipe_list() -> None:
    """The recipes shipped with fusionkit, with one line each."""
    table = Table(show_header=True, box=None, padding=(0, 2), pad_edge=False)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description", overflow="fold")
    for name, path in _shipped():
        table.add_row(escape(name), escape(_describe(path)))
    console.print(table)
    console.print("copy one to edit it: fusionkit recipe copy NAME DEST.yaml")


@app.command("copy")
def recipe_copy(
    name: Annotated[str, typer.Argument(help="a shipped recipe (see `fusionkit recipe list`)")],
    dest: Annotated[Path, typer.Argument(help="file (or folder) to write")],
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write an editable copy of a shipped recipe."""
    from fusionkit.core.errors import FusionkitError
    from fusionkit.core.params import did_you_mean
    from fusionkit.engine.files import atomic_write_bytes

    shipped = dict(_shipped())
    key = name.removesuffix(".yaml")
    if key not in shipped:
        raise FusionkitError(
            f"no shipped recipe {name!r}{did_you_mean(key, shipped)}; see `fusionkit recipe list`"
        )
    target = dest / f"{Path(key).name}.yaml" if dest.is_dir() else dest
    if target.exists() and not force:
        raise FusionkitError(f"{target} exists; pass --force to overwrite it")
    atomic_write_bytes(target, shipped[key].read_bytes())
    console.print(f"wrote {escape(str(target))} (from {escape(key)})")
