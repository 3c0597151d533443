"""Component registry filled by plugins discovered through entry points.

The core never names a component: every encoder, fusion, gate, head and dataset (the built-in
ones included) arrives through the ``fusionkit`` entry-point group and the hooks of
:mod:`fusionkit.core.hookspecs`.

Registration is typed. Each *kind* names the keyword arguments its build functions receive
(the ``*Build`` protocol of :mod:`fusionkit.core.interfaces`) and the protocol the built
object satisfies; :meth:`Registry.add` checks the build function's signature, and
:meth:`Registry.build` checks what it returns. Plugins may declare new kinds.

Two distributions that register the same name do not break fusionkit: the clash is reported
by ``fusionkit plugins list`` and becomes an error only for a recipe that uses the name (or
everywhere in strict mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata as md
import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any, TypeVar, get_type_hints

import pluggy
import torch
from pydantic import BaseModel
from torch import nn

from fusionkit.core import hookspecs, interfaces
from fusionkit.core.errors import FusionkitError, PluginError, RecipeError, ShapeError, one_line
from fusionkit.core.params import EmptyParams, did_you_mean

__all__ = [
    "CORE_KINDS",
    "Component",
    "Kind",
    "PluginLoadFailure",
    "PluginLoadWarning",
    "Registry",
    "get_registry",
    "load_registry",
    "register",
    "registered_name",
]

ENTRY_POINT_GROUP = "fusionkit"
#: The distribution whose plugins ship with fusionkit (loaded before any other).
DISTRIBUTION = "fusionkit"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_MARK = "__fusionkit_component__"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Kind:
    """A kind of component.

    Attributes:
        name: the kind's name (``fusion``), lowercase.
        build: the ``*Build`` protocol: its ``__call__`` keyword-only arguments are what every
            build function of the kind receives after the params.
        returns: a runtime-checkable protocol the built object satisfies.
        module: whether the built object must be a ``torch.nn.Module``.
        summary: one line for listings.
        distribution: who declared it (``fusionkit`` for the core kinds).
    """

    name: str
    build: type
    returns: type
    module: bool = False
    summary: str = ""
    distribution: str = "fusionkit"

    @property
    def build_kwargs(self) -> tuple[str, ...]:
        sig = inspect.signature(self.build.__call__)
        return tuple(p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY)


CORE_KINDS: tuple[Kind, ...] = (
    Kind("dataset", interfaces.DatasetBuild, interfaces.Dataset, summary="videos with labels"),
    Kind("encoder", interfaces.EncoderBuild, interfaces.Encoder, True, "per-modality encoder"),
    Kind("fusion", interfaces.FusionBuild, interfaces.Fusion, True, "modalities -> step stacks"),
    Kind("gate", interfaces.GateBuild, interfaces.Gate, True, "step stacks -> one sequence"),
    Kind("head", interfaces.HeadBuild, interfaces.Head, True, "sequence -> targets"),
    Kind(
        "perturbation",
        interfaces.PerturbationBuild,
        interfaces.Perturbation,
        summary="seeded corruption of a video",
    ),
)


@dataclass(frozen=True)
class Component:
    """A registered component.

    Attributes:
        kind: its kind's name.
        name: the name recipes use (lowercase letters, digits and underscores).
        build: called as ``build(params, **kind_kwargs)``.
        params: pydantic model validating the recipe's ``params`` block.
        summary: one line shown by ``fusionkit plugins list``.
        distribution, version: the installed distribution that registered it.
        plugin: the entry-point name.
    """

    kind: str
    name: str
    build: Callable[..., Any]
    params: type[BaseModel]
    summary: str = ""
    distribution: str = "<direct>"
    version: str = ""
    plugin: str = ""

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}".strip() + f" (plugin '{self.plugin}')"


@dataclass(frozen=True)
class _Mark:
    kind: str
    name: str
    params: type[BaseModel] | None
    summary: str


def register(
    kind: str, name: str, *, params: type[BaseModel] | None = None, summary: str = ""
) -> Callable[[F], F]:
    """Mark a build function (or class) as a component, next to its definition.

    The plugin's hook then registers every marked function of a module with
    :meth:`Registry.add_module`. ``params`` defaults to the annotation of the build
    function's first argument (:class:`~fusionkit.core.params.EmptyParams` if none), and
    ``summary`` to the first line of its docstring.

    Example::

        @register("fusion", "mylab_residual")
        def build_residual(params: ResidualParams, *, in_dims: dict[str, int]) -> ResidualFusion:
            \"\"\"Per-frame fusion refined by residual MLP steps.\"\"\"
            return ResidualFusion(params, in_dims)
    """

    def mark(build: F) -> F:
        setattr(build, _MARK, _Mark(kind, name, params, summary))
        return build

    return mark


def registered_name(build: Callable[..., Any]) -> str | None:
    """The name :func:`register` gave a build function (``None`` if it has no mark)."""
    mark = getattr(build, _MARK, None)
    return mark.name if isinstance(mark, _Mark) else None


def _params_of(build: Callable[..., Any]) -> type[BaseModel] | type:
    """The params model a build function's first argument is annotated with; ``EmptyParams``
    when it has no class annotation. A class that is not a pydantic model is returned as is
    (and rejected by :meth:`Registry.add`)."""
    target = build.__init__ if inspect.isclass(build) else build
    try:
        names = list(inspect.signature(build).parameters)
    except (TypeError, ValueError):
        names = []
    if not names:
        return EmptyParams
    try:
        ann = get_type_hints(target).get(names[0])
    except Exception:  # another annotation cannot be resolved: resolve the first one alone
        ann = getattr(target, "__annotations__", {}).get(names[0])
        if isinstance(ann, str):
            try:  # the plugin's own annotation, in its own module (its code already ran)
                ann = eval(ann, getattr(target, "__globals__", {}))
            except Exception as exc:
                raise PluginError(
                    f"cannot resolve the annotation {ann!r} of the first argument of "
                    f"{getattr(build, '__qualname__', build)!r} ({type(exc).__name__}: {exc}); "
                    "import it at module level, or pass params= when registering"
                ) from None
    return ann if isinstance(ann, type) and ann is not object else EmptyParams


def _summary_of(build: Callable[..., Any]) -> str:
    doc = inspect.getdoc(build) or ""
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""


@dataclass(frozen=True)
class PluginLoadFailure:
    """A plugin skipped by tolerant loading: its entry point, distribution and the error."""

    plugin: str
    distribution: str
    error: str
    version: str = ""


class PluginLoadWarning(UserWarning):
    """Category of the one warning emitted per plugin skipped by tolerant loading."""


@dataclass
class Registry:
    """Kinds, and name -> component tables per kind (several entries when names clash)."""

    _kinds: dict[str, Kind] = field(default_factory=lambda: {k.name: k for k in CORE_KINDS})
    _items: dict[tuple[str, str], list[Component]] = field(default_factory=dict)
    failures: list[PluginLoadFailure] = field(default_factory=list)
    _origin: tuple[str, str, str] = ("<direct>", "", "")

    # ------------------------------------------------------------------ kinds

    def add_kind(self, kind: Kind) -> None:
        """Declare a new kind (raises :class:`PluginError` if the name is taken); the
        declaring distribution is recorded from the plugin being loaded."""
        if self._origin[0] != "<direct>":
            kind = dataclasses.replace(kind, distribution=self._origin[0])
        if not _NAME_RE.match(kind.name):
            raise PluginError(f"{self._where()}: kind name {kind.name!r} is not lowercase_words")
        if kind.name in self._kinds and self._kinds[kind.name] != kind:
            other = self._kinds[kind.name]
            raise PluginError(
                f"{self._where()} declares kind {kind.name!r}, already declared by "
                f"'{other.distribution}'"
            )
        self._kinds[kind.name] = kind

    def kinds(self) -> list[Kind]:
        return list(self._kinds.values())

    def kind(self, name: str) -> Kind:
        if name not in self._kinds:
            raise PluginError(
                f"unknown kind {name!r}{did_you_mean(name, self._kinds)}; kinds: "
                + ", ".join(self._kinds)
            )
        return self._kinds[name]

    # ------------------------------------------------------------------ components

    def _where(self) -> str:
        dist, _, plugin = self._origin
        return f"plugin '{plugin}' from distribution '{dist}'"

    def add(
        self,
        kind: str,
        name: str,
        *,
        build: Callable[..., Any],
        params: type[BaseModel] | None = None,
        summary: str = "",
    ) -> None:
        """Register one component; an invalid one raises :class:`PluginError`.

        The build function must take the params instance first and accept the keyword
        arguments of its kind (see :class:`Kind`).
        """
        where = self._where()
        if kind not in self._kinds:
            raise PluginError(
                f"{where} registers {name!r} as unknown kind {kind!r}"
                f"{did_you_mean(kind, self._kinds)}; kinds are: {', '.join(self._kinds)}"
            )
        if not _NAME_RE.match(name):
            raise PluginError(
                f"{where} registers {kind} {name!r}: names are lowercase letters, digits and "
                "underscores, starting with a letter"
            )
        summary = summary or _summary_of(build)
        if params is None:
            params = _params_of(build)
            if not issubclass(params, BaseModel):
                raise PluginError(
                    f"{where}: {kind} {name!r}: the first argument of build is annotated "
                    f"{params.__name__}, which is not a pydantic model; derive it from "
                    "plugin.Params"
                )
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise PluginError(f"{where}: {kind} {name!r} params must be a pydantic BaseModel class")
        if not callable(build):
            raise PluginError(f"{where}: {kind} {name!r} build must be callable")
        self._check_signature(kind, name, build, where)
        dist, version, plugin = self._origin
        comp = Component(kind, name, build, params, summary, dist, version, plugin)
        entries = self._items.setdefault((kind, name), [])
        if any(c.distribution == dist and c.plugin == plugin for c in entries):
            raise PluginError(f"{where} registers {kind} {name!r} twice")
        entries.append(comp)

    def _check_signature(self, kind: str, name: str, build: Callable[..., Any], where: str) -> None:
        try:
            sig = inspect.signature(build)
        except (TypeError, ValueError):
            return  # builtins without a signature: checked when built
        params = list(sig.parameters.values())
        var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
        accepted = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        missing = [k for k in self._kinds[kind].build_kwargs if k not in accepted and not var_kw]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if missing or not (positional or any(p.kind is p.VAR_POSITIONAL for p in params)):
            want = ", ".join(
                [
                    "params",
                    *(
                        f"*, {k}" if i == 0 else k
                        for i, k in enumerate(self._kinds[kind].build_kwargs)
                    ),
                ]
            )
            raise PluginError(
                f"{where}: {kind} {name!r} build{sig} does not match the {kind} build "
                f"signature ({want})" + (f"; missing keyword(s) {missing}" if missing else "")
            )

    def add_module(self, *modules: ModuleType) -> None:
        """Register every function or class marked with :func:`register` in ``modules``."""
        for module in modules:
            for obj in list(vars(module).values()):
                mark = getattr(obj, _MARK, None)
                if isinstance(mark, _Mark) and getattr(obj, "__module__", "") == module.__name__:
                    self.add(
                        mark.kind, mark.name, build=obj, params=mark.params, summary=mark.summary
                    )

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._items if k == kind)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._items

    def get(self, kind: str, name: str) -> Component:
        """Look a component up; an unknown or clashing name raises :class:`PluginError`."""
        entries = self._items.get((kind, name))
        if not entries:
            known = self.names(kind)
            listing = ", ".join(known) or "(none registered)"
            raise PluginError(
                f"unknown {kind} {name!r}{did_you_mean(name, known)}; registered {kind}s: {listing}"
            )
        if len(entries) > 1:
            raise PluginError(self.clash_message(kind, name))
        return entries[0]

    def clash_message(self, kind: str, name: str) -> str:
        who = " and ".join(c.origin for c in self._items[(kind, name)])
        return (
            f"{kind} {name!r} is registered by more than one plugin: {who}; uninstall one of "
            "them or ask its author to rename the component"
        )

    def clashes(self) -> list[tuple[str, str]]:
        """``(kind, name)`` pairs registered by more than one plugin."""
        return sorted(key for key, entries in self._items.items() if len(entries) > 1)

    def components(self) -> list[Component]:
        """Every registered component (clashing ones included), by kind then name."""
        order = {k: i for i, k in enumerate(self._kinds)}
        keys = sorted(self._items, key=lambda kn: (order.get(kn[0], len(order)), kn[1]))
        return [c for key in keys for c in self._items[key]]

    def build(self, kind: str, name: str, params: BaseModel, *, where: str = "", **kwargs: Any):
        """Build a component from its already validated ``params``.

        Args:
            where: the recipe path it comes from (``model.fusion``), named in errors.
            **kwargs: the kind's build arguments (``in_dims=...``).

        Raises:
            RecipeError: the build function rejected its inputs (a ``ValueError``, such as
                "needs at least two modalities"), failed with a ``RuntimeError`` or
                ``MemoryError`` (torch could not allocate the weights its params ask for),
                raised any other exception (a bug in the plugin, named with its
                distribution), or returned something that is not a component of this kind.
        """
        comp = self.get(kind, name)
        where = where or kind
        if not isinstance(params, comp.params):
            raise TypeError(
                f"{where}: params of {kind} {name!r} must be a validated {comp.params.__name__} "
                f"instance, got {type(params).__name__}"
            )
        try:
            obj = comp.build(params, **kwargs)
        except (NotImplementedError, RecursionError) as exc:  # a bug, not its params
            raise RecipeError([_plugin_bug(where, kind, name, comp, exc)]) from None
        except (ShapeError, ValueError) as exc:
            raise RecipeError([f"{where}: {kind} {name!r} cannot be built: {exc}"]) from None
        except FusionkitError:
            raise  # already explained (e.g. a nested component spec that cannot be built)
        except Exception as exc:
            raise RecipeError([_build_failure(where, kind, name, comp, exc)]) from None
        spec = self._kinds[kind]
        if spec.module and not isinstance(obj, nn.Module):
            raise RecipeError(
                [
                    f"{where}: {kind} {name!r} from '{comp.distribution}' built a "
                    f"{type(obj).__name__}, not a torch.nn.Module"
                ]
            )
        if not isinstance(obj, spec.returns):
            missing = [m for m in _protocol_members(spec.returns) if not hasattr(obj, m)]
            raise RecipeError(
                [
                    f"{where}: {kind} {name!r} from '{comp.distribution}' built a "
                    f"{type(obj).__name__} that lacks {missing or 'the ' + kind + ' interface'}"
                ]
            )
        return obj

    # ------------------------------------------------------------------ loading

    def _run_hook(
        self, hook: str, module: ModuleType | object, plugin: str, dist: str, version: str
    ) -> None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(module, name=plugin)
        pm.check_pending()
        self._origin = (dist, version, plugin)
        try:
            getattr(pm.hook, hook)(registry=self)
        finally:
            self._origin = ("<direct>", "", "")

    def _merge(self, other: Registry) -> None:
        for (kind, name), entries in other._items.items():
            mine = self._items.setdefault((kind, name), [])
            mine.extend(c for c in entries if c not in mine)


def _build_failure(where: str, kind: str, name: str, comp: Component, exc: Exception) -> str:
    """One line for a build function that failed other than by rejecting its inputs: reading
    tensor values on the meta device (validation), torch failing to allocate the weights its
    params ask for, or (AttributeError, TypeError, KeyError, ...) a bug in the plugin."""
    text = one_line(exc) or type(exc).__name__
    on_meta = torch.get_default_device().type == "meta" and "meta" in str(exc).lower()
    if on_meta and isinstance(exc, RuntimeError | MemoryError | TypeError):
        return (
            f"{where}: {kind} {name!r} from '{comp.distribution}' reads tensor values while it "
            f"is built ({text}), which validation cannot do: it builds every component on the "
            "meta device (shapes only, no weights). Compute such values in forward, or from "
            "the params (docs/plugins.md)"
        )
    if isinstance(exc, RuntimeError | MemoryError):
        return (
            f"{where}: {kind} {name!r} cannot be built: {text}; check the sizes in "
            f"{where}.params (the memory they need)"
        )
    return _plugin_bug(where, kind, name, comp, exc)


def _plugin_bug(where: str, kind: str, name: str, comp: Component, exc: BaseException) -> str:
    """One line for an unexpected exception from a plugin's build function."""
    detail = one_line(exc)
    return (
        f"{where}: {kind} {name!r} from '{comp.distribution}' raised {type(exc).__name__}"
        + (f": {detail}" if detail else "")
        + " while building (a bug in the plugin; report it to the authors of "
        + f"'{comp.distribution}')"
    )


def _protocol_members(proto: type) -> list[str]:
    """The attribute and method names a protocol requires."""
    members = getattr(proto, "__protocol_attrs__", None)  # Python 3.12+
    if members is None:
        import typing

        members = typing._get_protocol_attrs(proto)  # type: ignore[attr-defined]
    return sorted(members)


def required_fusionkit(dist: Any) -> str:
    """A distribution's requirement on fusionkit (``fusionkit>=0.2,<0.3``), or ``""``."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    for text in getattr(dist, "requires", None) or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if canonicalize_name(req.name) == "fusionkit" and req.marker is None:
            return str(req)
    return ""


def _version_problem(dist: Any) -> str | None:
    """Why the installed fusionkit does not satisfy what a plugin declares, or ``None``."""
    from packaging.requirements import Requirement

    from fusionkit.core import __version__

    text = required_fusionkit(dist)
    if text and not Requirement(text).specifier.contains(__version__, prereleases=True):
        return f"requires {text} but this is fusionkit {__version__}; update the plugin"
    return None


def _strict_from_env() -> bool:
    return os.environ.get("FUSIONKIT_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes"}


def _one_line_error(exc: BaseException) -> str:
    """``Type: message`` on one line (pluggy's messages span several)."""
    if isinstance(exc, PluginError):
        text = str(exc)
    elif isinstance(exc, SystemExit):
        text = f"SystemExit: {exc.code}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return one_line(text, limit=None)


def _check_implements_hooks(module: object, ep: Any) -> None:
    """Raise :class:`PluginError` unless ``module`` implements a fusionkit hook."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(module, name=ep.name)
    if not pm.get_hookcallers(module):
        raise PluginError(
            "the entry point implements no fusionkit hook: decorate "
            "fusionkit_register_components with @plugin.hookimpl, and name the module that "
            "defines it in the entry point, not the function"
        )


def _entry_point_hint(ep: Any) -> str:
    return f'entry point {ep.name} = "{ep.value}" in [project.entry-points.fusionkit]'


@dataclass
class _Loaded:
    """A plugin whose module imported: what it declared, and its scratch registry."""

    ep: Any
    module: Any
    dist: str
    version: str
    kinds: list[Kind]
    scratch: Registry | None = None


def load_registry(*, strict: bool | None = None) -> Registry:
    """Build a registry from every entry point in the ``fusionkit`` group.

    A plugin that fails to import (including ``SystemExit``), implements no hook or registers
    an invalid component is reported in one warning naming its distribution, entry point and
    the error, and every other plugin still loads; nothing it declared (kinds included) stays
    registered. A name registered by two plugins is kept for both and is an error only where
    it is used. With ``strict=True`` (or ``FUSIONKIT_STRICT_PLUGINS=1``) all these problems
    are collected and raised together in one :class:`PluginError`.

    Whatever plugins print while loading goes to stderr, so that stdout stays clean for
    machine-readable output.
    """
    strict = _strict_from_env() if strict is None else strict
    problems: list[str] = []
    with contextlib.redirect_stdout(sys.stderr):
        registry = _load_all(strict, problems)
    problems += [registry.clash_message(*kn) for kn in registry.clashes()] if strict else []
    if problems:
        raise PluginError("; ".join(problems))
    return registry


def _load_all(strict: bool, problems: list[str]) -> Registry:
    """Load every plugin; with ``strict``, append one line per failed plugin to ``problems``
    instead of warning."""
    registry = Registry()
    # fusionkit's own plugins first: the kinds they declare are theirs, whatever another
    # distribution is called (one sorting before it could otherwise take a kind over)
    eps = sorted(
        md.entry_points(group=ENTRY_POINT_GROUP),
        key=lambda e: (
            (e.dist.name if e.dist else "") != DISTRIBUTION,
            e.dist.name if e.dist else "",
            e.name,
        ),
    )

    def fail(ep: Any, dist: str, version: str, exc: BaseException | str, hint: bool = True) -> None:
        msg = exc if isinstance(exc, str) else _one_line_error(exc)
        if hint:
            msg = f"{msg} ({_entry_point_hint(ep)}; fix it and reinstall)"
        registry.failures.append(PluginLoadFailure(ep.name, dist, msg, version))
        if strict:  # raised all together at the end
            how = " " if not hint else " failed to load: "
            problems.append(f"plugin '{ep.name}' from distribution '{dist}' {version}{how}{msg}")
            return
        warnings.warn(
            f"fusionkit: skipped plugin '{ep.name}' from distribution '{dist}' {version}: "
            f"{msg} (use --strict or FUSIONKIT_STRICT_PLUGINS=1 to make this an error)",
            PluginLoadWarning,
            stacklevel=4,
        )

    loaded: list[_Loaded] = []
    for ep in eps:  # import every plugin and collect the kinds first
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        version = ep.dist.version if ep.dist is not None else ""
        mismatch = _version_problem(ep.dist) if ep.dist is not None else None
        if mismatch and strict:
            fail(ep, dist, version, mismatch, hint=False)
            continue
        if mismatch:  # loaded all the same: it may still work
            warnings.warn(
                f"fusionkit: plugin '{ep.name}' from distribution '{dist}' {version} {mismatch}",
                PluginLoadWarning,
                stacklevel=3,
            )
        try:
            module = ep.load()
            _check_implements_hooks(module, ep)
            scratch = Registry(_kinds=dict(registry._kinds))
            scratch._run_hook("fusionkit_register_kinds", module, ep.name, dist, version)
            kinds = [k for k in scratch.kinds() if k.name not in registry._kinds]
        except (Exception, SystemExit) as exc:  # a broken plugin must not take the others down
            fail(ep, dist, version, exc)
            continue
        for kind in kinds:  # tentatively: dropped again if the plugin fails below
            registry._kinds[kind.name] = kind
        loaded.append(_Loaded(ep, module, dist, version, kinds))
    for item in loaded:
        # Register into a scratch registry first, so that a plugin failing half-way leaves
        # nothing behind.
        scratch = Registry(_kinds=dict(registry._kinds))
        try:
            scratch._run_hook(
                "fusionkit_register_components", item.module, item.ep.name, item.dist, item.version
            )
        except (Exception, SystemExit) as exc:
            fail(item.ep, item.dist, item.version, exc)
            continue
        if not scratch._items and not item.kinds:  # loaded, but adds nothing at all
            fail(
                item.ep,
                item.dist,
                item.version,
                "registers no component and declares no kind: mark each build function "
                "with @plugin.register(kind, name) in the module its hook passes to "
                "registry.add_module, or call registry.add in the hook",
                hint=False,
            )
            continue
        item.scratch = scratch
    _drop_failed_kinds(registry, loaded, fail)
    for item in loaded:
        if item.scratch is not None:
            registry._merge(item.scratch)
    return registry


def _drop_failed_kinds(
    registry: Registry, loaded: list[_Loaded], fail: Callable[..., None]
) -> None:
    """Remove the kinds of plugins that failed, and fail the plugins that registered
    components of those kinds (until nothing changes)."""
    while True:
        gone = {k.name for item in loaded if item.scratch is None for k in item.kinds}
        gone &= set(registry._kinds)
        for name in gone:
            del registry._kinds[name]
        newly = False
        for item in loaded:
            if item.scratch is None:
                continue
            orphans = sorted({k for k, _ in item.scratch._items if k not in registry._kinds})
            if orphans:
                fail(
                    item.ep,
                    item.dist,
                    item.version,
                    f"registers components of kind(s) {orphans}, declared by a plugin that "
                    "failed to load",
                )
                item.scratch = None
                newly = True
        if not newly:
            return


def raise_for_failures(registry: Registry) -> None:
    """Strict mode after the fact: raise :class:`PluginError` naming every plugin that failed to
    load into ``registry`` and every clashing name (for settings read after the registry was
    built, e.g. a recipe's ``strict_plugins``)."""
    problems = [
        f"plugin '{f.plugin}' from distribution '{f.distribution}' {f.version}: {f.error}"
        for f in registry.failures
    ] + [registry.clash_message(*kn) for kn in registry.clashes()]
    if problems:
        raise PluginError(
            f"strict plugin loading: {len(problems)} problem(s): " + "; ".join(problems)
        )


@lru_cache(maxsize=2)
def _cached_registry(strict: bool) -> Registry:
    return load_registry(strict=strict)


def get_registry(*, strict: bool | None = None) -> Registry:
    """The process-wide registry (loaded once)."""
    return _cached_registry(_strict_from_env() if strict is None else strict)


def clear_registry_cache() -> None:
    _cached_registry.cache_clear()
