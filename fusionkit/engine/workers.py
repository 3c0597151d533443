"""Worker processes that never outlive the process that started them.

A ``kill -9`` of a parent leaves its children running: they finish their jobs and then wait
forever, holding memory (and, on a GPU machine, GPU memory). A worker that calls
:func:`die_with_parent` first exits on its own within a second of its parent's death.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

__all__ = ["die_with_parent"]


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
