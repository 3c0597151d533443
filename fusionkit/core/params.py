"""The base of every params block, and how validation problems are worded.

Every component declares a pydantic model for its ``params`` block. Deriving it from
:class:`Params` gives the two rules fusionkit relies on: unknown keys are errors (a typo is
reported, not ignored) and floats are finite (``.inf`` or ``.nan`` never reach a model).
Components whose params model derives from plain ``BaseModel`` still get the finiteness rule:
the recipe checks every validated params block with :func:`nonfinite_fields`.
"""

from __future__ import annotations

import datetime
import math
import reprlib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "EmptyParams",
    "Params",
    "describe_validation_error",
    "did_you_mean",
    "error_at",
    "first_few",
    "nonfinite_fields",
    "refuse_boolean_numbers",
    "short_repr",
    "with_valid_keys",
]


def _numeric(annotation: Any) -> str | None:
    """``"scalar"`` when ``annotation`` takes an ``int`` or ``float`` (optional too), ``"list"``
    when it is a list or tuple of them, else None; never for one that also takes ``bool``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float):
        return "scalar"
    if origin is typing.Annotated:
        return _numeric(args[0])
    if origin in (typing.Union, types.UnionType):
        if bool in args:
            return None
        kinds = {_numeric(a) for a in args} - {None}
        return kinds.pop() if len(kinds) == 1 else None
    if origin in (list, tuple) and args and args[-1] is not Ellipsis:
        return "list" if all(_numeric(a) == "scalar" for a in args) else None
    if origin in (list, tuple) and args:
        return "list" if _numeric(args[0]) == "scalar" else None
    return None


def refuse_boolean_numbers(model: type[BaseModel], raw: Any) -> Any:
    """Refuse a boolean where ``model`` expects a number: pydantic would read ``true`` as 1,
    and YAML reads ``yes``, ``no``, ``on`` and ``off`` as booleans, so ``patience: off`` would
    silently mean 0. Use it in a ``mode="before"`` model validator."""
    if not isinstance(raw, dict):
        return raw
    for name, field in model.model_fields.items():
        key = field.alias or name
        value, kind = raw.get(key), _numeric(field.annotation)
        if kind == "scalar" and isinstance(value, bool):
            bad: tuple[str | int, ...] = (key,)
        elif kind == "list" and isinstance(value, list | tuple):
            at = next((i for i, x in enumerate(value) if isinstance(x, bool)), None)
            if at is None:
                continue
            bad, value = (key, at), value[at]
        else:
            continue
        raise error_at(
            bad,
            f"a number is expected, got the boolean {str(value).lower()} (YAML reads "
            "yes/no/on/off/true/false as booleans): write the number",
            value,
        )
    return raw


class Params(BaseModel):
    """Base class of params models: unknown keys rejected, floats finite, no boolean where a
    number is expected."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_numbers(cls, raw: Any) -> Any:
        return refuse_boolean_numbers(cls, raw)


class EmptyParams(Params):
    """Params model of a component that takes no parameters."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest choice, or ``""``.

    >>> did_you_mean("lrr", ["lr", "epochs"])
    " (did you mean 'lr'?)"
    """
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        # repr() of an integer of more than 4300 digits raises, and a long one is no message
        if x.bit_length() > 200:
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_REPR = _ShortRepr()
_REPR.maxlevel = 2
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 4


def short_repr(value: Any) -> str:
    """A short ``repr`` that never builds the whole text of a large or deeply nested value.

    >>> short_repr(list(range(1000)))
    '[0, 1, 2, 3, ...]'
    """
    return _REPR.repr(value)


def first_few(items: Sequence[str], n: int = 5, sep: str = ", ") -> str:
    """The first ``n`` of ``items`` joined by ``sep``, then ``and <k> more`` (for messages).

    >>> first_few(["a", "b", "c"], 2)
    'a, b, and 1 more'
    """
    more = [f"and {len(items) - n} more"] if len(items) > n else []
    return sep.join([*items[:n], *more])


def nonfinite_fields(params: BaseModel) -> list[str]:
    """Dotted paths of non-finite floats anywhere in a validated params instance."""
    out: list[str] = []

    def walk(value: Any, path: str, depth: int) -> None:
        if depth > 32:
            return
        if isinstance(value, float) and not math.isfinite(value):
            out.append(path or "<value>")
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{path}.{name}" if path else name, depth + 1)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k), depth + 1)
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{path}.{i}" if path else str(i), depth + 1)

    walk(params, "", 0)
    return out


def _fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """Field names of the nested model that a pydantic error location points into."""
    cur: Any = model
    for part in loc[:-1]:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        subs = [a for a in (ann, *getattr(ann, "__args__", ())) if _is_model(a)]
        cur = subs[0] if subs else None
    return list(cur.model_fields) if _is_model(cur) else []


def _deeper(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    """``" (did you mean 'training.lr'?)"`` when an unknown key is a field one level down
    (``lr=1e-3`` given for the recipe), else ``""``."""
    inner = model
    for part in loc[:-1]:  # the model the unknown key was given in
        field = inner.model_fields.get(str(part)) if _is_model(inner) else None
        inner = field.annotation if field is not None else None
    if not _is_model(inner):
        return ""
    found = [
        f"{name}.{loc[-1]}"
        for name, field in inner.model_fields.items()
        if _is_model(field.annotation) and str(loc[-1]) in field.annotation.model_fields
    ]
    return f" (did you mean {' or '.join(repr(f) for f in found)}?)" if found else ""


def _is_model(x: Any) -> bool:
    return isinstance(x, type) and issubclass(x, BaseModel)


#: Readable rules for string patterns, shown instead of the regular expression in errors.
PATTERN_RULES: dict[str, str] = {}


def describe_validation_error(
    exc: ValidationError, model: type[BaseModel] | None = None, prefix: str = ""
) -> list[str]:
    """One line per problem: ``dotted.path: what is wrong (got value)``.

    Unknown keys get a did-you-mean and the valid keys; values are shown through
    :func:`short_repr`, so a huge value never turns into a huge message.
    """
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = prefix + ".".join(str(p) for p in loc)
        path = path.rstrip(".") or "<top level>"
        kind = err["type"]
        msg = str(err.get("msg", "invalid"))
        for lead in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(lead)
        if kind == "string_pattern_mismatch":
            msg = PATTERN_RULES.get(str((err.get("ctx") or {}).get("pattern")), msg)
        if kind == "extra_forbidden":
            valid = list((err.get("ctx") or {}).get("valid", [])) or _fields_at(model, loc)
            hint = _deeper(model, loc) or did_you_mean(str(loc[-1]), valid)
            listing = f"; valid keys: {', '.join(valid)}" if valid else ""
            problems.append(f"{path}: unknown key{hint}{listing}")
        elif kind == "missing":
            problems.append(f"{path}: required key is missing")
        elif kind.startswith("fusionkit_") or kind in ("value_error", "assertion_error"):
            problems.append(f"{path}: {msg}")
        elif isinstance(err.get("input"), dict | list):
            problems.append(f"{path}: {msg}")
        elif kind == "list_type" and "," in str(err.get("input")):  # a list written a, b
            items = ", ".join(x.strip() for x in str(err["input"]).split(","))
            problems.append(
                f"{path}: {msg} (got {short_repr(err['input'])}); write a list in brackets: "
                f"[{items}]"
            )
        elif kind == "string_type" and isinstance(
            err.get("input"), int | float | datetime.date | datetime.time
        ):  # 2024, 12:30 (base 60: 750), 0x1F, 1e3, 2024-01-01: YAML reads no text there
            got = err["input"]
            what = "a number" if isinstance(got, int | float) else "a date"
            problems.append(
                f"{path}: {msg} (YAML read what was written as {what}, {got}); put the text "
                f"in quotes as written: {loc[-1]}: '...' in a file, {path}='\"...\"' on the "
                "command line"
            )
        else:
            problems.append(f"{path}: {msg} (got {short_repr(err.get('input'))})")
    return problems


def error_at(loc: tuple[str | int, ...], message: str, value: Any = None) -> ValidationError:
    """A validation error at ``loc`` (relative to the model being validated), for checks that
    span fields: raised inside a validator, pydantic prefixes the location of the field."""
    err = PydanticCustomError("fusionkit_check", "{message}", {"message": message})
    return ValidationError.from_exception_data(
        "fusionkit", [{"type": err, "loc": loc, "input": value}]
    )


def with_valid_keys(exc: ValidationError, model: type[BaseModel]) -> ValidationError:
    """``exc`` with each unknown-key error carrying a did-you-mean and the valid keys of the
    model it occurred in, so that the message stays useful once nested in a recipe."""
    errors: list[Any] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            valid = _fields_at(model, loc)
            hint = did_you_mean(str(loc[-1]), valid)
            listing = f"; valid keys: {', '.join(valid)}" if valid else ""
            kind = PydanticCustomError(
                "fusionkit_unknown_key", "unknown key{rest}", {"rest": hint + listing}
            )
            errors.append({"type": kind, "loc": loc, "input": err.get("input")})
        else:  # kept as it was: same type name, same message
            kind = PydanticCustomError(err["type"], "{msg}", {"msg": err["msg"]})
            errors.append({"type": kind, "loc": loc, "input": err.get("input")})
    return ValidationError.from_exception_data(exc.title, errors)
