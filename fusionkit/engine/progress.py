"""Progress of long work: live bars on a terminal, one plain line per unit of work otherwise.

When standard output is a file (``nohup``, SLURM, CI logs) a live display would print nothing
useful until it ends, so there each finished epoch (or grid point, or extraction job batch)
prints one self-contained line with the numbers and an estimate of the time left.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["TaskProgress", "TrainProgress", "duration", "train_progress", "warnings_to"]


def warnings_to(console: Console) -> Callable[..., None]:
    """A ``warnings.showwarning`` printing each warning as one line, ``warning: <message>``,
    on ``console`` (no source excerpt): how the command and its grid workers show them."""

    def show(message: Any, category: Any, filename: Any, lineno: Any, file: Any = None,
             line: Any = None) -> None:  # fmt: skip
        console.print(f"[yellow]warning:[/] {escape(str(message))}")

    return show


def duration(seconds: float) -> str:
    """``"42s"``, ``"3m05s"`` or ``"2h07m"``.

    >>> duration(185)
    '3m05s'
    """
    s = round(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class TrainProgress(Protocol):
    """What training reports while it runs."""

    def start(self, epochs: int, done: int, steps: int) -> None: ...

    def step(self) -> None: ...

    def epoch(self, record: dict[str, Any], improved: bool) -> None: ...

    def close(self) -> None: ...


class _Quiet:
    def start(self, epochs: int, done: int, steps: int) -> None:
        pass

    def step(self) -> None:
        pass

    def epoch(self, record: dict[str, Any], improved: bool) -> None:
        pass

    def close(self) -> None:
        pass


def _summary(record: dict[str, Any], improved: bool) -> str:
    val = record.get("val_ccc_mean")
    val_text = f"{val:.4f}" if isinstance(val, float) else "n/a"
    return (
        f"loss {record['train_loss']:.4f}  val CCC {val_text}{' *' if improved else ''}  "
        f"lr {record['lr']:.1e}"
    )


class _Lines:
    """One plain line per epoch, for logs."""

    def __init__(self, console: Console, label: str) -> None:
        self.console = console
        self.label = label
        self.t0 = time.perf_counter()
        self.epochs = 0
        self.done0 = 0

    def start(self, epochs: int, done: int, steps: int) -> None:
        self.epochs, self.done0, self.t0 = epochs, done, time.perf_counter()
        todo = (
            f"epochs {done + 1}..{epochs}, {steps} steps each"
            if done < epochs
            else "every epoch is trained; evaluating the best weights"
        )
        self.console.print(f"{escape(self.label)}: {todo}", highlight=False, soft_wrap=True)

    def step(self) -> None:
        pass

    def epoch(self, record: dict[str, Any], improved: bool) -> None:
        n = record["epoch"]
        per = (time.perf_counter() - self.t0) / max(1, n - self.done0)
        left = per * (self.epochs - n)
        self.console.print(
            f"{escape(self.label)} epoch {n}/{self.epochs}  {_summary(record, improved)}  "
            f"{record['seconds']:.1f}s  eta {duration(left)}",
            highlight=False,
            soft_wrap=True,
        )

    def close(self) -> None:
        pass


class _Bars:
    """Live bars for a terminal."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.epochs_task: Any = None
        self.steps_task: Any = None

    def start(self, epochs: int, done: int, steps: int) -> None:
        self.bar.start()
        self.epochs_task = self.bar.add_task("epochs", total=epochs, completed=done, info="")
        self.steps_task = self.bar.add_task("steps", total=steps, info="")

    def step(self) -> None:
        self.bar.advance(self.steps_task)

    def epoch(self, record: dict[str, Any], improved: bool) -> None:
        self.bar.update(self.epochs_task, advance=1, info=_summary(record, improved))
        self.bar.reset(self.steps_task)

    def close(self) -> None:
        self.bar.stop()


def train_progress(console: Console | None, label: str = "train") -> TrainProgress:
    """Bars when ``console`` is a terminal, plain lines when it is a file, nothing if ``None``."""
    if console is None:
        return _Quiet()
    if console.is_terminal:
        return _Bars(console)
    return _Lines(console, label)


class TaskProgress:
    """Progress of ``total`` units of work (extraction jobs, files): a live bar on a terminal,
    otherwise one plain line each time another 5% (at least one unit) is done, with k/N, the
    unit just finished and the estimated time left. Use it as a context manager::

        with TaskProgress("extract", len(jobs), console) as progress:
            for job in jobs:
                ...
                progress.advance(job.label)
    """

    def __init__(self, description: str, total: int, console: Console | None) -> None:
        self.description, self.total, self.console = description, total, console
        self.done = 0
        self.t0 = time.perf_counter()
        self._next_line = 0
        self._bar: Progress | None = None
        if console is not None and console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[item]}"),
                console=console,
                transient=False,
            )
            self._task = self._bar.add_task(escape(description), total=total, item="")

    def __enter__(self) -> TaskProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, item: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, item=escape(item))
            return
        if self.console is None or (self.done < self._next_line and self.done < self.total):
            return
        self._next_line = self.done + max(1, self.total // 20)
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        self.console.print(
            f"{escape(self.description)} {self.done}/{self.total} {escape(item)}  "
            f"elapsed {duration(elapsed)}  eta {duration(left)}",
            highlight=False,
            soft_wrap=True,
        )
