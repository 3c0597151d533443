"""The ``fusionkit`` application: every command, and one-line errors."""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Annotated, Any

import typer
from rich.markup import escape

from fusionkit.cli._common import err_console
from fusionkit.core.errors import FusionkitError
from fusionkit.engine.progress import warnings_to

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="fusionkit: audio-visual fusion for continuous valence/arousal.",
)


def _version(value: bool) -> None:
    if value:
        from fusionkit.core import __version__

        typer.echo(f"fusionkit {__version__}")
        raise typer.Exit()


#: the commands that train as one job over the processes of a torchrun launch
MULTI_PROCESS = frozenset({"run", "resume"})


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """fusionkit: audio-visual fusion for continuous valence/arousal."""
    command = ctx.invoked_subcommand
    if _rank_tag() and command is not None and command not in MULTI_PROCESS:
        # every process would run the whole command, each against the others' files and locks
        raise FusionkitError(
            f"fusionkit {command} runs as one process; only `run` and `resume` train under "
            "torchrun: start it without torchrun"
        )


def _register() -> None:
    # Each area keeps its commands in its own module of this package.
    from fusionkit.cli import data, plugins, recipe, report, run, runs, stream, weights

    run.register(app)
    app.add_typer(recipe.app, name="recipe")
    app.add_typer(plugins.app, name="plugins")
    report.register(app)
    data.register(app)
    weights.register(app)
    stream.register(app)
    runs.register(app)


_register()


def _flow(text: str) -> str:
    """A help text with the line breaks inside each paragraph joined, so the terminal wraps
    it (typer keeps a docstring's line breaks, which split sentences and commands)."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def _flow_help(typer_app: typer.Typer) -> None:
    """:func:`_flow` every command's and group's help, from their docstrings."""
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = _flow(info.callback.__doc__)
    for group in typer_app.registered_groups:
        sub = group.typer_instance
        if sub is not None:
            _flow_help(sub)


_flow_help(app)


def _no_type_tags() -> None:
    """typer prints a type tag (``<str>``, ``<bool>``, ``<list[str]>``) beside every
    parameter; fusionkit's help texts say what a value is, so options show a plain name
    (``--out OUT``), flags and arguments nothing."""
    from typer import core

    def display(param: Any, ctx: Any) -> str | None:
        if isinstance(param, core.TyperArgument) or getattr(param, "is_flag", False):
            return None
        return param.metavar or param.name.upper()

    core.TyperOption.display_type_rich = display  # type: ignore[method-assign]
    core.TyperArgument.display_type_rich = display  # type: ignore[method-assign]


_no_type_tags()


def main() -> None:
    """Console entry point: user mistakes print one message, no traceback."""
    warnings.showwarning = warnings_to(err_console)  # one line each, no source excerpt
    try:
        app()
    except FusionkitError as exc:
        err_console.print(f"[bold red]error{_rank_tag()}:[/] {escape(str(exc))}")
        sys.exit(2)


def _rank_tag() -> str:
    """`` (rank N)`` in a process of a multi-process launch (torchrun sets ``RANK`` and
    ``WORLD_SIZE``), so that the same error of N processes reads as N processes' errors."""
    import os

    world = os.environ.get("WORLD_SIZE", "")
    if world.isdigit() and int(world) > 1:
        return f" (rank {os.environ.get('RANK', '?')})"
    return ""
