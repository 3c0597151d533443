"""Component registry filled by plugins discovered through entry points.

The core never names a component: every encoder, fusion, gate, head and dataset (the built-in
ones included) arrives through the ``fusionkit`` entry-point group and the
:func:`fusionkit.hookspecs.fusionkit_register_components` hook.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any

import pluggy
from pydantic import BaseModel

from fusionkit import hookspecs
from fusionkit.errors import PluginError

__all__ = [
    "KINDS",
    "Component",
    "PluginLoadFailure",
    "PluginLoadWarning",
    "Registry",
    "did_you_mean",
    "get_registry",
    "raise_for_failures",
]

#: The component kinds the core knows how to compose.
KINDS: tuple[str, ...] = (
    "dataset",
    "encoder",
    "fusion",
    "gate",
    "head",
    "perturbation",
    # feature extractors run by dataset plugins at extraction time (`fusionkit extract`)
    "audio_backbone",
    "visual_backbone",
)
ENTRY_POINT_GROUP = "fusionkit"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class EmptyParams(BaseModel):
    """Params model of a component that takes no parameters."""

    model_config = {"extra": "forbid"}


@dataclass(frozen=True)
class Component:
    """A registered component.

    Attributes:
        kind: one of :data:`KINDS`.
        name: the name recipes use (lowercase, digits and underscores).
        build: called as ``build(params, **kind_kwargs)`` (see :mod:`fusionkit.interfaces`).
        params: pydantic model validating the recipe's ``params`` block.
        summary: one line shown by ``fusionkit plugins list``.
        distribution: the installed distribution that registered it.
        version: that distribution's version.
        plugin: the entry-point name.
    """

    kind: str
    name: str
    build: Callable[..., Any]
    params: type[BaseModel]
    summary: str = ""
    distribution: str = "<unknown>"
    version: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class PluginLoadFailure:
    """A plugin skipped by tolerant loading: its entry point, distribution and the error."""

    plugin: str
    distribution: str
    error: str
    version: str = ""


class PluginLoadWarning(UserWarning):
    """Category of the one warning emitted per plugin skipped by tolerant loading."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass
class Registry:
    """Name -> :class:`Component` tables, one per kind."""

    _items: dict[str, dict[str, Component]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[PluginLoadFailure] = field(default_factory=list)
    _current: tuple[str, str, str] = ("<direct>", "", "")

    def add(
        self,
        kind: str,
        name: str,
        *,
        build: Callable[..., Any],
        params: type[BaseModel] | None = None,
        summary: str = "",
    ) -> None:
        """Register one component; raises :class:`PluginError` on an invalid or duplicate one."""
        dist, version, plugin = self._current
        where = f"plugin '{plugin}' from distribution '{dist}'"
        if kind not in self._items:
            raise PluginError(
                f"{where} registers {name!r} as unknown kind {kind!r}; kinds are: "
                f"{', '.join(KINDS)}{did_you_mean(kind, KINDS)}"
            )
        if not _NAME_RE.match(name):
            raise PluginError(
                f"{where} registers {kind} {name!r}: names are lowercase letters, digits and "
                "underscores, starting with a letter"
            )
        if params is None:
            params = EmptyParams
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(f"{where}: {kind} {name!r} params must be a pydantic BaseModel class")
        if not callable(build):
            raise PluginError(f"{where}: {kind} {name!r} build must be callable")
        table = self._items[kind]
        if name in table:
            other = table[name]
            raise PluginError(
                f"{kind} {name!r} is registered twice: by distribution '{other.distribution}' "
                f"(plugin '{other.plugin}') and by distribution '{dist}' (plugin '{plugin}'); "
                "uninstall one of them or rename the component"
            )
        table[name] = Component(kind, name, build, params, summary, dist, version, plugin)

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def get(self, kind: str, name: str) -> Component:
        """Look a component up; an unknown name raises with the registered ones listed."""
        table = self._items[kind]
        if name not in table:
            known = ", ".join(sorted(table)) or "(none registered)"
            raise PluginError(
                f"unknown {kind} {name!r}{did_you_mean(name, table)}; registered {kind}s: {known}"
            )
        return table[name]

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._items.get(kind, {})

    def components(self) -> list[Component]:
        return [c for kind in KINDS for _, c in sorted(self._items[kind].items())]

    def register_module(
        self, module: ModuleType | object, *, plugin: str, distribution: str, version: str
    ) -> None:
        """Run one plugin module's hook implementations against this registry."""
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(module, name=plugin)
        pm.check_pending()
        self._current = (distribution, version, plugin)
        try:
            pm.hook.fusionkit_register_components(registry=self)
        finally:
            self._current = ("<direct>", "", "")


def _strict_from_env() -> bool:
    return os.environ.get("FUSIONKIT_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


def load_registry(*, strict: bool | None = None) -> Registry:
    """Build a registry from every entry point in the ``fusionkit`` group.

    A plugin that fails to import or registers an invalid component is reported in one warning
    naming its distribution and the error, and every other plugin still loads. With
    ``strict=True`` (or ``FUSIONKIT_STRICT_PLUGINS=1``) the first failure raises instead.
    Duplicate component names are always an error.
    """
    strict = _strict_from_env() if strict is None else strict
    registry = Registry()
    eps = sorted(
        md.entry_points(group=ENTRY_POINT_GROUP),
        key=lambda e: (e.dist.name if e.dist else "", e.name),
    )
    for ep in eps:
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        version = ep.dist.version if ep.dist is not None else ""
        # Register into a scratch registry first so that a plugin failing half-way leaves
        # nothing behind; clashes with already-loaded plugins are checked on merge.
        scratch = Registry()
        try:
            module = ep.load()
            scratch.register_module(module, plugin=ep.name, distribution=dist, version=version)
        except Exception as exc:  # a broken plugin must not take the others down
            msg = f"{type(exc).__name__}: {exc}"
            if strict:
                raise PluginError(
                    f"plugin '{ep.name}' from distribution '{dist}' {version} failed to load: {msg}"
                ) from None
            registry.failures.append(PluginLoadFailure(ep.name, dist, msg, version))
            warnings.warn(
                f"fusionkit: skipped plugin '{ep.name}' from distribution '{dist}' {version}: "
                f"{msg} (use --strict or FUSIONKIT_STRICT_PLUGINS=1 to make this an error)",
                PluginLoadWarning,
                stacklevel=2,
            )
            continue
        for comp in scratch.components():
            registry._current = (comp.distribution, comp.version, comp.plugin)
            registry.add(
                comp.kind, comp.name, build=comp.build, params=comp.params, summary=comp.summary
            )
        registry._current = ("<direct>", "", "")
    return registry


def raise_for_failures(registry: Registry) -> None:
    """Strict mode after the fact: raise :class:`PluginError` naming every plugin that failed to
    load into ``registry`` (for settings read after the registry was built, e.g. a recipe's)."""
    if registry.failures:
        skipped = "; ".join(
            f"plugin '{f.plugin}' from distribution '{f.distribution}' {f.version}: {f.error}"
            for f in registry.failures
        )
        raise PluginError(f"strict plugin loading: {len(registry.failures)} failed: {skipped}")


@lru_cache(maxsize=1)
def _cached_registry(strict: bool) -> Registry:
    return load_registry(strict=strict)


def get_registry(*, strict: bool | None = None) -> Registry:
    """The process-wide registry (loaded once)."""
    return _cached_registry(_strict_from_env() if strict is None else strict)


def clear_registry_cache() -> None:
    _cached_registry.cache_clear()
