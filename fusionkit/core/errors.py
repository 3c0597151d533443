"""One exception hierarchy for everything a user can get wrong.

The CLI prints a :class:`FusionkitError` as one line without a traceback; any other exception
is a bug in fusionkit or a plugin and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "FusionkitError",
    "PluginError",
    "RecipeError",
    "ShapeError",
    "TrainingError",
]


class FusionkitError(Exception):
    """Base class of user-facing errors: the message says what is wrong and how to fix it."""


class RecipeError(FusionkitError):
    """A recipe (file or command-line override) is invalid.

    Args:
        problems: one line per problem, each starting with the dotted config path.
        source: the recipe file (or ``<command line>``), named in the message.
    """

    def __init__(self, problems: list[str], source: str = "<recipe>") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"invalid recipe {source}"
        if len(self.problems) == 1:
            super().__init__(f"{head}: {self.problems[0]}")
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{head} ({len(self.problems)} problems):\n{lines}")


class PluginError(FusionkitError):
    """A plugin failed to load, registered something invalid, or a name clashes."""


class DataError(FusionkitError):
    """A data folder, feature cache or annotation file is missing or malformed."""


class CheckpointError(FusionkitError):
    """A run directory or one of its files is missing, unreadable or inconsistent."""


class TrainingError(FusionkitError):
    """Training cannot go on without producing wrong numbers (e.g. a non-finite loss)."""


class ShapeError(FusionkitError, ValueError):
    """A tensor reached a component with the wrong shape; the message names both."""
