"""Overrides: changing a raw recipe by dotted paths, with one rule for everything that does it.

Command-line ``key.path=value`` items, the values of a grid's ``sweep`` axes and the override
sets of its ``variants`` all go through :func:`apply_overrides`, so the same change gives the
same recipe whichever way it is written. The rule:

* paths are applied shallowest first, and a component's ``name`` before its siblings, so
  ``model.gate.name=grjca model.gate.params.temperature=0.5`` works in any order;
* setting a component's ``name`` to a *different* component drops the params of the old one
  (they belong to it); params set by the same overrides are applied on top.

Values are YAML, where a ``#`` at the start or after a space starts a comment. A command-line
value with such a ``#`` (``output.name=tagf #lr3``) is refused rather than silently cut:
quote the value to keep the ``#`` (``'output.name="tagf #lr3"'``); a ``#`` inside a word
(``a#b``) is plain text.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from fusionkit.core.errors import RecipeError
from fusionkit.core.params import short_repr
from fusionkit.core.yamlio import load_yaml

__all__ = ["MAX_OVERRIDE_CHARS", "apply_overrides", "parse_overrides"]

#: Longest ``key=value`` item accepted on a command line.
MAX_OVERRIDE_CHARS = 10_000
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^\d+$")


def _comment_at(raw: str) -> int | None:
    """Where a YAML comment starts in ``raw`` (a ``#`` first or after whitespace, outside any
    quoted or block scalar), or ``None``. ``raw`` is valid YAML."""
    starts = [i for i, c in enumerate(raw) if c == "#" and (i == 0 or raw[i - 1] in " \t\r\n")]
    if not starts:
        return None
    spans = [
        (t.start_mark.index, t.end_mark.index)
        for t in yaml.scan(raw, Loader=yaml.SafeLoader)
        if isinstance(t, yaml.ScalarToken)
    ]
    for i in starts:
        if not any(a <= i < b for a, b in spans):
            return i
    return None


def parse_overrides(items: Iterable[str], source: str = "<command line>") -> dict[str, Any]:
    """Parse ``key.path=value`` strings (values are YAML: ``lr=1e-3``, ``splits=[val]``) into an
    ordered ``{path: value}`` mapping; a path given twice keeps its last value.

    A value holding a YAML comment (``#`` first or after a space, unquoted) is refused: YAML
    would drop the rest of it silently. Quote the value to keep the ``#``."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        shown = short_repr(item)
        if len(item) > MAX_OVERRIDE_CHARS:
            problems.append(f"override {shown}: longer than {MAX_OVERRIDE_CHARS:,} characters")
            continue
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not key or not all(_KEY_RE.match(p) for p in parts):
            looks_like_file = not sep and item.endswith((".yaml", ".yml"))
            bad = next((p for p in parts if not _KEY_RE.match(p)), None) if sep and key else None
            if looks_like_file:
                fix = (
                    "a recipe file must be the first argument, and only one is taken; "
                    "overrides are key.path=value"
                )
            elif bad == "":
                fix = "a key part is empty (two dots in a row, or a dot at an end)"
            elif bad is not None:
                hint = re.sub(r"[^A-Za-z0-9_]", "_", bad)
                fix = f"key part {short_repr(bad)} may hold only letters, digits and '_'" + (
                    f" (did you mean {hint!r}?)" if _KEY_RE.match(hint) else ""
                )
            else:
                fix = "expected key.path=value, e.g. training.lr=1e-3"
            problems.append(f"override {shown}: {fix}")
            continue
        try:
            value = load_yaml(raw, "<override>") if raw.strip() != "" else ""
        except RecipeError as exc:
            problems.append(f"override {shown}: value is not valid YAML ({exc.problems[0]})")
            continue
        at = _comment_at(raw)
        if at is not None:
            quoted = f'{key}="{raw.strip()}"'
            fix = (
                f"quote the value: {short_repr(quoted)}"
                if isinstance(value, str | None)
                else "quote the text that holds the '#'"
            )
            problems.append(
                f"override {shown}: {short_repr(raw[at:])} would be dropped as a YAML comment "
                f"(a '#' first or after a space starts one); to keep it, {fix}; else remove it"
            )
            continue
        if isinstance(value, str) and _FLOAT_RE.match(value):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string
        out.pop(key, None)
        out[key] = value
    if problems:
        raise RecipeError(problems, source)
    return out


def _order(path: str) -> tuple[int, bool]:
    parts = path.split(".")
    return len(parts), parts[-1] != "name"


def apply_overrides(
    raw: Mapping[str, Any],
    overrides: Mapping[str, Any] | Iterable[str],
    where: str = "override",
    source: str = "<recipe>",
) -> dict[str, Any]:
    """A copy of ``raw`` with every ``{dotted.path: value}`` (or ``"key.path=value"`` string)
    applied, missing mappings created, under the rule in the module docstring. Errors name
    ``source``, the recipe file the overrides apply to.

    >>> r = {"model": {"gate": {"name": "tagf", "params": {"temperature": 0.1}}}}
    >>> apply_overrides(r, {"model.gate.name": "last"})["model"]["gate"]
    {'name': 'last', 'params': {}}
    """
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    data = copy.deepcopy(dict(raw))
    for path in sorted(overrides, key=_order):
        parts = path.split(".")
        if not path or any(not p for p in parts):
            raise RecipeError([f"{where} {path!r}: not a dotted recipe path"], source)
        node: Any = data
        for i, key in enumerate(parts[:-1]):
            nxt = node.get(key)
            if nxt is None:
                nxt = node[key] = {}
            if not isinstance(nxt, dict):
                at = ".".join(parts[: i + 1])
                fix = f"; set the whole list instead: {at}=[...]" if isinstance(nxt, list) else ""
                raise RecipeError(
                    [f"{where} {path}: {at} is a {type(nxt).__name__}, not a mapping{fix}"],
                    source,
                )
            node = nxt
        last, value = parts[-1], copy.deepcopy(overrides[path])
        if last == "name" and "params" in node and node.get("name") != value:
            node["params"] = {}
        node[last] = value
    return data
