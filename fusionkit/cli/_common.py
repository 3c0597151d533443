"""What the command modules share: consoles, recipe arguments, the metrics table."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

#: exit status of a command whose output was its product and was closed (128 + SIGPIPE)
CLOSED_OUTPUT_EXIT = 141


class _Console(Console):
    """A console that outlives its reader: when the stream is closed (output piped into
    ``head``, a pager that quit), the command goes on without printing to it and says so on
    standard error, instead of rich's default of exiting with status 1 in mid-run, without a
    word, leaving an interrupted run behind. A command whose printed lines are its product
    (``stream`` without ``--out``) sets :attr:`stop_on_closed` and ends quietly instead."""

    stop_on_closed = False

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.file.fileno())  # later writes, and the flush at exit, succeed
        os.close(devnull)
        if self.stop_on_closed:
            raise SystemExit(CLOSED_OUTPUT_EXIT)
        if self is not err_console:
            err_console.print(
                "[yellow]warning:[/] standard output was closed by the command reading it; "
                "fusionkit goes on without printing there (redirect the output to a file to "
                "keep it)"
            )


#: Standard output; long lines are never hard-wrapped (paths and hints stay copyable in logs).
console = _Console(soft_wrap=True, highlight=False)


def shown_path(path: Path) -> str:
    """``path`` for a message: bytes that are not UTF-8 (a file name from another system) as
    ``\\xff`` escapes, which any output can print, and rich markup escaped."""
    return escape(os.fsencode(path).decode("utf-8", "backslashreplace"))


def listing(command: Callable[..., None]) -> Callable[..., None]:
    """A command whose printed lines are its whole product (``recipe list``, ``plugins list``):
    when its reader closes the output (``| head``), it ends quietly, as such a listing does,
    rather than warning that it goes on without printing."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        console.stop_on_closed = True
        try:
            command(*args, **kwargs)
        finally:
            console.stop_on_closed = False

    return run


#: Standard error.
err_console = _Console(stderr=True, soft_wrap=True, highlight=False)


def split_recipe_args(
    recipe: str | None, overrides: list[str] | None
) -> tuple[str | None, list[str]]:
    """``fusionkit run key=value`` (no file) means the embedded quickstart with overrides."""
    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, overrides


def load(recipe: str | None, overrides: list[str] | None, strict: bool = False):
    """Load and validate a recipe, honouring ``--strict`` and the recipe's ``strict_plugins``."""
    from fusionkit.core.recipe import load_recipe
    from fusionkit.core.registry import get_registry, raise_for_failures

    if strict:  # through the environment so that worker processes are strict too
        os.environ["FUSIONKIT_STRICT_PLUGINS"] = "1"
    path, ovr = split_recipe_args(recipe, overrides)
    rc = load_recipe(path, ovr)
    if rc.strict_plugins:
        os.environ["FUSIONKIT_STRICT_PLUGINS"] = "1"
        raise_for_failures(get_registry())
    return rc


def _short(targets: list[str]) -> dict[str, str]:
    """Column labels: initials (V, A) when they are unambiguous, else the full names."""
    initials = [t[:1].upper() for t in targets]
    if len(set(initials)) == len(targets):
        return dict(zip(targets, initials, strict=True))
    return {t: t for t in targets}


def metrics_table(title: str, splits: dict[str, dict[str, Any]], targets: list[str]) -> Table:
    """Rich table of per-split metrics (CCC per target and mean, PCC, RMSE, frames)."""
    short = _short(targets)
    table = Table(title=escape(title))
    table.add_column("split")
    short = {t: escape(v) for t, v in short.items()}
    for t in targets:
        table.add_column(f"CCC-{short[t]}", justify="right")
    if len(targets) > 1:
        table.add_column("CCC-mean", justify="right", style="bold", no_wrap=True, min_width=8)
    for metric in ("PCC", "RMSE"):
        for t in targets:
            table.add_column(f"{metric}-{short[t]}", justify="right")

    def num(x: Any) -> str:
        return f"{x:.4f}" if isinstance(x, int | float) else "n/a"

    for split, m in splits.items():
        row = [escape(split)] + [num(m.get(f"ccc_{t}")) for t in targets]
        if len(targets) > 1:
            row.append(num(m.get("ccc_mean")))
        row += [num(m.get(f"pcc_{t}")) for t in targets]
        row += [num(m.get(f"rmse_{t}")) for t in targets]
        table.add_row(*row)
    caption = [f"{v} = {k}" for k, v in short.items() if k != v]
    caption.append("frames: " + ", ".join(f"{s} {m.get('n_frames')}" for s, m in splits.items()))
    table.caption = escape("; ".join(caption))
    return table
