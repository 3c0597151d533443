"""`fusionkit plugins ...`: list installed plugins per distribution and check their components."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from fusionkit.cli._common import console, listing
from fusionkit.core.errors import PluginError, one_line
from fusionkit.core.registry import PluginLoadWarning

if TYPE_CHECKING:
    from fusionkit.core.registry import Component, PluginLoadFailure, Registry
    from fusionkit.testing import ConformanceReport

app = typer.Typer(no_args_is_help=True, help="List installed plugins and check their components.")

_STYLE = {"pass": "green", "fail": "bold red", "skip": "dim", "warn": "yellow"}


def _normalize(name: str) -> str:
    """PEP 503 normalised distribution name (``Fusionkit_XAttn`` -> ``fusionkit-xattn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class DistributionInfo:
    """What one installed distribution contributes to the registry."""

    name: str
    version: str = ""
    requires_fusionkit: str = ""
    entry_points: list[str] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)
    failures: list[PluginLoadFailure] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "requires_fusionkit": self.requires_fusionkit,
            "entry_points": self.entry_points,
            "components": [
                {"kind": c.kind, "name": c.name, "plugin": c.plugin, "summary": c.summary}
                for c in self.components
            ],
            "failures": [f.__dict__ for f in self.failures],
        }


def _requirement_on_fusionkit(dist: str) -> str:
    """The distribution's requirement on fusionkit (e.g. ``fusionkit>=0.2,<0.3``), or ``""``."""
    from fusionkit.core.registry import required_fusionkit

    if _normalize(dist) == "fusionkit":
        return ""
    try:
        return required_fusionkit(md.distribution(dist))
    except md.PackageNotFoundError:
        return ""


def distributions(reg: Registry) -> list[DistributionInfo]:
    """Group the registry's components and load failures by distribution (fusionkit first)."""
    infos: dict[str, DistributionInfo] = {}

    def info(name: str, version: str) -> DistributionInfo:
        if name not in infos:
            infos[name] = DistributionInfo(name, version, _requirement_on_fusionkit(name))
        return infos[name]

    for c in reg.components():
        d = info(c.distribution, c.version)
        d.components.append(c)
        if c.plugin and c.plugin not in d.entry_points:
            d.entry_points.append(c.plugin)
    for f in reg.failures:
        d = info(f.distribution, f.version)
        d.failures.append(f)
        if f.plugin not in d.entry_points:
            d.entry_points.append(f.plugin)
    return sorted(infos.values(), key=lambda d: (d.name != "fusionkit", d.name))


def _load(strict: bool, *, quiet: bool = False) -> Registry:
    """Load the plugins; ``quiet`` leaves reporting skipped plugins to the caller."""
    from fusionkit.core.registry import load_registry

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", PluginLoadWarning)
        return load_registry(strict=strict or None)


@app.command("list")
@listing
def plugins_list(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="fail on a broken plugin")] = False,
) -> None:
    """Installed plugin distributions: version, fusionkit requirement, components and kinds."""
    reg = _load(strict, quiet=True)  # failures are listed under their distribution below
    dists = distributions(reg)
    if as_json:
        data = {
            "distributions": [d.to_dict() for d in dists],
            "components": [
                {
                    "kind": c.kind,
                    "name": c.name,
                    "distribution": c.distribution,
                    "version": c.version,
                    "plugin": c.plugin,
                    "summary": c.summary,
                }
                for c in reg.components()
            ],
            "failures": [f.__dict__ for f in reg.failures],
            "clashes": [
                {"kind": k, "name": n, "message": reg.clash_message(k, n)} for k, n in reg.clashes()
            ],
        }
        console.out(json.dumps(data, indent=2))
        return
    for d in dists:
        head = f"[bold]{escape(d.name)}[/] {escape(d.version)}"
        notes = []
        if d.requires_fusionkit:
            from packaging.requirements import Requirement

            from fusionkit.core import __version__

            ok = Requirement(d.requires_fusionkit).specifier.contains(__version__, prereleases=True)
            notes.append(f"requires {d.requires_fusionkit}" + ("" if ok else " (NOT this version)"))
        if d.entry_points:
            notes.append("entry points: " + ", ".join(d.entry_points))
        if notes:
            head += f"  [dim]({escape('; '.join(notes))})[/]"
        console.print(head, highlight=False)
        if d.components:
            table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False)
            table.add_column("kind", style="cyan", no_wrap=True)
            table.add_column("name", style="bold", no_wrap=True)
            table.add_column("summary", overflow="fold")
            clashing = set(reg.clashes())
            for c in d.components:
                name = c.name + (" [red](clash)[/]" if (c.kind, c.name) in clashing else "")
                table.add_row(f"  {c.kind}", name, escape(c.summary))
            console.print(table)
        for f in d.failures:
            console.print(
                f"  [red]not loaded[/]: plugin '{escape(f.plugin)}': {escape(f.error)}",
                highlight=False,
            )
    for kind, name in reg.clashes():
        console.print(f"[red]name clash[/]: {escape(reg.clash_message(kind, name))}")
    n_dists = sum(bool(d.components) for d in dists)
    console.print(
        f"{len(reg.components())} components from {n_dists} "
        f"distribution{'s' if n_dists != 1 else ''}"
        + (f"; [red]{len(reg.failures)} plugin(s) failed to load[/]" if reg.failures else ""),
        highlight=False,
    )


def _select(reg: Registry, name: str | None, kind: str | None, check_all: bool) -> list[Component]:
    """Components named ``name``, else of the distribution ``name``, else of the kind ``name``;
    every component with ``--all``."""
    from fusionkit.core.params import did_you_mean

    kinds = [k.name for k in reg.kinds()]
    if kind is not None:
        reg.kind(kind)  # raises with the known kinds listed
    comps = [c for c in reg.components() if kind is None or c.kind == kind]
    if check_all:
        if name is not None:
            raise PluginError("give either a NAME or --all, not both")
        return comps
    if name is None:
        raise PluginError("name a component or a distribution to check, or pass --all")
    by_name = [c for c in comps if c.name == name]  # every registration of a clashing name
    if by_name:
        return by_name
    by_dist = [c for c in comps if _normalize(c.distribution) == _normalize(name)]
    if by_dist:
        return by_dist
    by_kind = [c for c in comps if c.kind == name]
    if by_kind:
        return by_kind
    failed = [f for f in reg.failures if _normalize(f.distribution) == _normalize(name)]
    if failed:
        f = failed[0]
        raise PluginError(
            f"distribution '{f.distribution}' failed to load (plugin '{f.plugin}'): {f.error}"
        )
    known = sorted({c.name for c in comps} | {c.distribution for c in comps} | set(kinds))
    what = f"{kind} " if kind else "component or distribution "
    raise PluginError(
        f"no {what}named {name!r}{did_you_mean(name, known)}; see `fusionkit plugins list`"
    )


def _print_report(report: ConformanceReport, *, verbose: bool) -> None:
    """Header line with the summary; every check when ``verbose``, else only the notable ones."""
    style = "green" if report.ok else "bold red"
    where = f" [dim]{escape(report.distribution)} {escape(report.version)}[/]"
    console.print(
        f"[{style}]{'ok  ' if report.ok else 'FAIL'}[/] [bold]{report.kind} "
        f"'{escape(report.name)}'[/]{where if report.distribution else ''}: {report.summary()}",
        highlight=False,
    )
    shown = [r for r in report.results if verbose or r.status in ("fail", "warn")]
    if not shown:
        return
    table = Table(show_header=False, box=None, padding=(0, 1), pad_edge=False)
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("message", overflow="fold")
    for r in shown:
        table.add_row(f"    [{_STYLE[r.status]}]{r.status.upper()}[/]", r.check, escape(r.message))
    console.print(table)


def _label(report: ConformanceReport, reports: list[ConformanceReport]) -> str:
    """``gate 'last'``, with the distribution when several reports share the name."""
    same = sum((r.kind, r.name) == (report.kind, report.name) for r in reports)
    text = f"{report.kind} '{report.name}'"
    return text + (f" ({report.distribution})" if same > 1 else "")


def _validate_params(comp: Component, given: dict[str, Any], reg: Registry) -> None:
    """``--params`` against the component's params model first: a typo or an out-of-range value
    is the user's mistake (a usage error, exit 2), not the component failing its contract."""
    from pydantic import ValidationError

    from fusionkit.core.params import describe_validation_error, first_few, nonfinite_fields

    try:
        resolved = comp.params.model_validate(given, context={"registry": reg})
    except ValidationError as exc:
        problems = describe_validation_error(exc, comp.params)
    else:
        bad = nonfinite_fields(resolved)
        problems = (
            [f"{', '.join(bad)}: must be finite numbers (not NaN or Infinity)"] if bad else []
        )
    if problems:
        raise PluginError(
            f"--params of {comp.kind} '{comp.name}': " + first_few(problems, sep="; ")
        )


@app.command("check")
def plugins_check(
    name: Annotated[
        str | None,
        typer.Argument(help="a component, or a distribution or kind to check all its components"),
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", "-k", help="only components of this kind")
    ] = None,
    check_all: Annotated[
        bool, typer.Option("--all", help="check every registered component")
    ] = False,
    params: Annotated[
        str | None,
        typer.Option("--params", help="params as JSON, e.g. '{\"num_steps\": 3}' (one component)"),
    ] = None,
    skip: Annotated[
        list[str] | None, typer.Option("--skip", help="check id to skip (repeatable)")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="list passed and skipped checks too")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="fail on a broken plugin")] = False,
) -> None:
    """Run the conformance kit (fusionkit.testing) on components; exit 1 if any check fails.

    Each registration of a name that several distributions register is checked on its own and
    reported as failed (check ``clash``); the other components are checked as usual."""
    from fusionkit.testing import check_registered, known_checks

    reg = _load(strict)
    comps = _select(reg, name, kind, check_all)
    given: dict[str, Any] | None = None
    if params is not None:
        if len(comps) != 1:
            listing = ", ".join(f"{c.kind} {c.name}" for c in comps)
            raise PluginError(f"--params applies to one component; {len(comps)} match: {listing}")
        try:
            given = json.loads(params)
        except (ValueError, RecursionError) as exc:  # not JSON, or nested too deep
            raise PluginError(f"--params is not valid JSON ({one_line(exc)}): {params}") from None
        if not isinstance(given, dict):
            raise PluginError(f"--params must be a JSON object; got {params}")
        _validate_params(comps[0], given, reg)
    skips = list(skip or [])
    valid = known_checks()
    unknown = [s for s in skips if s not in valid]
    if unknown:
        from fusionkit.core.params import did_you_mean

        raise PluginError(
            f"unknown check {unknown[0]!r}{did_you_mean(unknown[0], valid)}; checks: "
            + ", ".join(valid)
        )
    reports = []
    for c in comps:
        report = check_registered(c, given, registry=reg, skip=skips)
        reports.append(report)
        if not as_json:
            _print_report(report, verbose=verbose or len(comps) == 1)
    failed = [r for r in reports if not r.ok]
    # plugins of the checked distributions (every one with --all) that did not even load: a
    # distribution half of which is broken does not conform
    dists = {_normalize(c.distribution) for c in comps}
    unloaded = [f for f in reg.failures if check_all or _normalize(f.distribution) in dists]
    if as_json:
        records = [r.to_dict() for r in reports] + [
            {"plugin": f.plugin, "distribution": f.distribution, "ok": False, "error": f.error}
            for f in unloaded
        ]
        console.out(json.dumps(records, indent=2))
    else:
        for f in unloaded:
            console.print(
                f"[bold red]FAIL[/] [bold]plugin '{escape(f.plugin)}'[/] "
                f"[dim]{escape(f.distribution)}[/]: not loaded: {escape(f.error)}",
                highlight=False,
            )
        # a component whose every check was skipped (params without defaults) is unchecked
        unchecked = [r for r in reports if r.ok and not r.counts().get("pass", 0)]
        names = ", ".join(_label(r, reports) for r in unchecked)
        style = "bold red" if failed or unloaded else "yellow" if unchecked else "green"
        conform = len(reports) - len(failed) - len(unchecked)
        console.print(
            f"[{style}]{conform} of {len(reports)} components conform[/]"
            + (": failed " + ", ".join(_label(r, reports) for r in failed) if failed else "")
            + (
                f"; {len(unchecked)} not checked ({names}: give their params with --params)"
                if unchecked
                else ""
            )
            + (f"; {len(unloaded)} plugin(s) did not load" if unloaded else ""),
            highlight=False,
        )
    if failed or unloaded:
        raise typer.Exit(1)


@app.command("kinds")
def plugins_kinds(
    strict: Annotated[bool, typer.Option("--strict", help="fail on a broken plugin")] = False,
) -> None:
    """The component kinds: what each builds, its build arguments, who declared it."""
    reg = _load(strict)  # a skipped plugin is warned about: its kinds are missing below
    table = Table(box=None, padding=(0, 2), pad_edge=False)
    for col in ("kind", "build(params, ...)", "declared by", "components", "what it is"):
        table.add_column(col, overflow="fold")
    for k in reg.kinds():
        table.add_row(
            k.name,
            ", ".join(k.build_kwargs) or "-",
            escape(k.distribution),
            str(len(reg.names(k.name))),
            escape(k.summary),
        )
    console.print(table)
