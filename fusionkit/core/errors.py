"""One exception hierarchy for everything a user can get wrong.

The CLI prints a :class:`FusionkitError` as one line without a traceback; any other exception
is a bug in fusionkit or a plugin and keeps its traceback.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CheckpointError",
    "DataError",
    "FusionkitError",
    "PluginError",
    "RecipeError",
    "ShapeError",
    "TrainingError",
    "one_line",
]


class FusionkitError(Exception):
    """Base class of user-facing errors: the message says what is wrong and how to fix it."""


#: Most problems of one recipe listed in its error message (the rest are counted).
MAX_PROBLEMS_SHOWN = 20


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
            shown = [f"  - {p}" for p in self.problems[:MAX_PROBLEMS_SHOWN]]
            if len(self.problems) > MAX_PROBLEMS_SHOWN:
                shown.append(f"  - and {len(self.problems) - MAX_PROBLEMS_SHOWN} more")
            lines = "\n".join(shown)
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


def one_line(
    error: object, *, pick: Literal["all", "first", "final"] = "all", limit: int | None = 300
) -> str:
    """An error (or its text) as one line for a one-line message; ``""`` when it has no text.

    ``pick="all"`` joins its non-blank lines with ``"; "``, ``"first"`` keeps the first
    (a summary followed by details), ``"final"`` the last (a recorded traceback ends with the
    exception). Runs of whitespace become one space; past ``limit`` characters it is cut and
    ends with ``" ..."``.

    >>> one_line(ValueError("bad size\n  got 3"))
    'bad size; got 3'
    >>> one_line("Traceback ...\n  File x\nKeyError: 'a'", pick="final")
    "KeyError: 'a'"
    """
    lines = [" ".join(line.split()) for line in str(error or "").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    text = {"all": "; ".join(lines), "first": lines[0], "final": lines[-1]}[pick]
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."
