"""The ``fusionkit`` command line (one module per area of commands)."""

from fusionkit.cli.root import app, main

__all__ = ["app", "main"]
