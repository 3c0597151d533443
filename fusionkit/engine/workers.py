"""Processes and signals: workers that never outlive the process that started them, and
SIGTERM handled like Ctrl-C.

A ``kill -9`` of a parent leaves its children running: they finish their jobs and then wait
forever, holding memory (and, on a GPU machine, GPU memory). A worker that calls
:func:`die_with_parent` first exits on its own within a second of its parent's death.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Terminated", "die_with_parent", "interrupt_exit_code", "sigterm_as_interrupt"]


def die_with_parent(poll_seconds: float = 1.0) -> None:
    """Start a daemon thread that ends this process when its parent process is gone.

    The parent is the process that started this one through :mod:`multiprocessing` (known
    from the start-up handshake, so a parent killed while this one was still importing is
    noticed too), else the operating-system parent.
    """
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None and started_by.pid else os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="fusionkit-die-with-parent", daemon=True).start()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``kill``, a batch scheduler) arrived: handled like Ctrl-C."""


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """The exit status of a command stopped by ``exc``, as a shell reports a signal: 143
    (128 + SIGTERM) for :class:`Terminated`, 130 (128 + SIGINT) for Ctrl-C."""
    return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main
    thread, so that it takes Ctrl-C's path: the run keeps its last finished epoch (or is
    removed when none finished) and the resume hint is printed. The previous handler is
    restored on exit. Outside the main thread nothing changes (Python delivers signals to the
    main thread only).

    Yields the list of the SIGTERMs received inside, for code whose libraries turn the
    :class:`Terminated` into a plain ``KeyboardInterrupt`` (Ray's wait does)."""
    seen: list[int] = []

    def raise_terminated(signum: int, frame: object) -> None:
        seen.append(signum)
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except (ValueError, OSError):  # no signal support here: leave it as it was
        yield seen
        return
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
