"""Reading YAML with bounds: file size, nesting depth, and the size of the value once YAML
aliases are expanded; and without duplicate keys.

A mapping that gives a key twice is refused: YAML would keep the last one and silently drop
the first (a second ``training:`` block would replace the whole first one). Keys merged in
with ``<<: *anchor`` may still be overridden, as YAML intends; a merge of several mappings
(``<<: [*a, *b]``) that set one key is refused, since YAML readers disagree on which wins.

A recipe is small. A file of megabytes, a value nested thousands of levels deep or a few
lines of aliases that expand to billions of values ("billion laughs") are mistakes or
attacks, and each ends in one :class:`~fusionkit.core.errors.RecipeError` instead of a hang,
a ``RecursionError`` or gigabytes of memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fusionkit.core.errors import RecipeError

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_VALUES", "load_yaml", "read_yaml"]

#: Largest recipe file read (bytes).
MAX_FILE_BYTES = 1 << 20
#: Deepest nesting of mappings and lists.
MAX_DEPTH = 64
#: Most values (scalars, mappings, lists) a document may hold with every alias expanded.
MAX_VALUES = 100_000
#: Most duplicate keys listed in one error.
MAX_REPORTED = 10


class _TooDeep(Exception):
    pass


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _BoundedLoader(yaml.SafeLoader):
    """A safe loader that refuses documents nested deeper than :data:`MAX_DEPTH` and mappings
    that give a key twice."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._path: list[str] = []  # keys (and list indices) leading to the node composed
        #: ``(line, dotted key, line of its first occurrence)`` of every repeated key.
        self.duplicates: list[tuple[int, str, int]] = []
        #: ``(line, dotted key)`` of every key set by two mappings of one merge sequence.
        self.merge_overlaps: list[tuple[int, str]] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        named = index is not None  # None: a mapping key or the document itself
        if named:
            self._path.append(_key_text(index))
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if named:
                self._path.pop()

    def compose_mapping_node(self, anchor: Any) -> Any:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if key.tag == _MERGE_TAG:
                self._check_merge(key, value)
                continue
            ident, line = (key.tag, key.value), key.start_mark.line + 1
            if ident in first:
                path = ".".join([*self._path, str(key.value)])
                self.duplicates.append((line, path, first[ident]))
            else:
                first[ident] = line
        return node

    def _check_merge(self, key: Any, value: Any) -> None:
        """Record keys that two mappings of a merge sequence (``<<: [*a, *b]``) both set."""
        if not isinstance(value, yaml.SequenceNode):
            return
        seen: set[tuple[str, str]] = set()
        for source in value.value:
            if not isinstance(source, yaml.MappingNode):
                continue
            for k, _ in source.value:
                if not isinstance(k, yaml.ScalarNode) or k.tag == _MERGE_TAG:
                    continue
                if (k.tag, k.value) in seen:
                    path = ".".join([*self._path, str(k.value)])
                    self.merge_overlaps.append((key.start_mark.line + 1, path))
                seen.add((k.tag, k.value))


#: Most characters of a number in a recipe (Python refuses to read integers of more than
#: 4300 digits; no recipe field takes a number anywhere near this long).
MAX_NUMBER_CHARS = 100


def _construct_bounded_int(loader: yaml.SafeLoader, node: Any) -> Any:
    if len(str(node.value)) > MAX_NUMBER_CHARS:
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"a number of {len(node.value)} characters (at most {MAX_NUMBER_CHARS})",
            node.start_mark,
        )
    return yaml.SafeLoader.construct_yaml_int(loader, node)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _construct_bounded_int)


def _key_text(index: Any) -> str:
    if isinstance(index, yaml.ScalarNode):
        return str(index.value)
    return str(index) if isinstance(index, int) else "?"


def _expanded_size(root: Any) -> int:
    """Values in ``root`` counting every shared (aliased) object each time it is reached,
    computed in time linear in the number of distinct objects."""
    if not isinstance(root, dict | list):
        return 1
    memo: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order: children are counted before their parents
        node, children_done = stack.pop()
        if id(node) in memo:
            continue
        children = list(node.values() if isinstance(node, dict) else node)
        if not children_done:
            if id(node) in visiting:  # a value that contains itself never ends
                return MAX_VALUES + 1
            visiting.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if isinstance(c, dict | list))
            continue
        total = 1
        for c in children:
            total += memo.get(id(c), 1) if isinstance(c, dict | list) else 1
        memo[id(node)] = min(total, MAX_VALUES + 1)
        visiting.discard(id(node))
    return memo[id(root)]


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML text within the bounds above; errors name ``source`` and the line."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader checks the characters here already
        data = loader.get_single_data()
        if loader.duplicates:
            raise RecipeError(
                [
                    f"line {line}: duplicate key {path!r} (first at line {first}); YAML would "
                    "keep only the last one: merge them into one"
                    for line, path, first in sorted(loader.duplicates)[:MAX_REPORTED]
                ],
                source,
            )
        if loader.merge_overlaps:
            raise RecipeError(
                [
                    f"line {line}: {path!r} is set by more than one mapping merged with <<; "
                    "YAML readers disagree on which one wins: set it in one of them only, or "
                    "after the merge"
                    for line, path in sorted(set(loader.merge_overlaps))[:MAX_REPORTED]
                ],
                source,
            )
    except _TooDeep:
        raise RecipeError(
            [f"nested more than {MAX_DEPTH} levels deep; recipes are shallow mappings"], source
        ) from None
    except yaml.reader.ReaderError as exc:
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise RecipeError(
            [f"YAML cannot contain the control character {char!r} (position {exc.position})"],
            source,
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        problem = " ".join(str(problem).split())
        raise RecipeError([f"YAML syntax error{where}: {problem}"], source) from None
    finally:
        if loader is not None:
            loader.dispose()
    if _expanded_size(data) > MAX_VALUES:
        raise RecipeError(
            [
                f"expands to more than {MAX_VALUES:,} values (YAML aliases repeating a large "
                "value?); write the recipe out without nested aliases"
            ],
            source,
        )
    return data


def read_yaml(path: Path, what: str = "recipe") -> Any:
    """Read a YAML file of at most :data:`MAX_FILE_BYTES`, strictly UTF-8."""
    source = str(path)
    if not path.exists():
        raise RecipeError([f"file not found: {path}"], source)
    if not path.is_file():
        raise RecipeError([f"{path} is not a file"], source)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise RecipeError(
            [f"the file is {size:,} bytes; a {what} is at most {MAX_FILE_BYTES:,} bytes"], source
        )
    raw = path.read_bytes()[: MAX_FILE_BYTES + 1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(
            [
                f"not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r}); is it a "
                f"{what} file?"
            ],
            source,
        ) from None
    return load_yaml(text, source)
