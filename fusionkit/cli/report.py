"""`fusionkit report` (comparison reports) and `fusionkit robustness` (perturbation sweeps on
trained checkpoints)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from fusionkit.cli._common import console, err_console


def register(app: typer.Typer) -> None:
    app.command()(report)
    app.command()(robustness)


def report(
    paths: Annotated[list[Path], typer.Argument(help="grid or run directories")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="write report.md, report.html, CSVs and plots/ into this folder: a new or "
            "empty one, or an earlier report's, which is replaced entirely"
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="split whose metrics are compared")] = "test",
    baseline: Annotated[
        str | None,
        typer.Option(
            help="row the others are compared with (default: the first), or a variant name "
            "of a grid with conditions: each row against that variant at its sweep values"
        ),
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(min=100, max=100_000, help="paired-bootstrap resamples over videos")
    ] = 2000,
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="seed of the bootstrap resampling")
    ] = 0,
    gate_videos: Annotated[
        int,
        typer.Option(
            min=1, help="videos shown in each gate plot (the longest; those with flags first)"
        ),
    ] = 3,
    throughput: Annotated[
        bool,
        typer.Option(
            "--throughput/--no-throughput",
            help="measure inference frames/s of each variant now (cached per run)",
        ),
    ] = True,
    remeasure: Annotated[
        bool, typer.Option("--remeasure", help="measure throughput again (ignore the caches)")
    ] = False,
    html_page: Annotated[bool, typer.Option("--html/--no-html", help="write report.html")] = True,
) -> None:
    """Compare finished runs: CCC mean ± std over seeds, Δ per target vs a baseline with a
    paired bootstrap (Holm-corrected; only for runs evaluated on the same data), learning
    curves, components, cost, robustness curves and gate plots (Markdown, HTML, CSV, LaTeX).
    Failed, pending and incomplete runs are listed, never used."""
    from fusionkit.studies.render import delta_table, render_markdown, results_table
    from fusionkit.studies.report import build_report
    from fusionkit.studies.reportdir import check_report_dir, write_report

    if out is not None:
        check_report_dir(out)  # before the bootstraps: a refused --out is told at once
    rep = build_report(
        paths,
        split=split,
        baseline=baseline,
        n_boot=bootstrap,
        boot_seed=seed,
        gate_videos=gate_videos,
        throughput=throughput,
        remeasure=remeasure,
    )
    rep.command = "fusionkit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if out is None:
        console.out(render_markdown(rep))
        return
    written = write_report(rep, out, html_page=html_page)
    console.out(results_table(rep))
    if any(r["delta"] is not None for r in rep.rows):
        console.out(f"Differences from the baseline {rep.baseline}:\n")
        console.out(delta_table(rep))
    for e in rep.excluded:
        console.print(
            f"[yellow]left out[/] {escape(e.where)} ({escape(e.variant)}): "
            f"{escape(e.status)}: {escape(e.detail)}"
        )
    for note in rep.notes:
        console.print(f"note: {escape(note)}")
    console.print(
        f"wrote {len(written)} files to {escape(str(out))}: "
        + ", ".join(escape(p.name) for p in written)
    )


def _parse_values(text: str) -> list[Any]:
    from fusionkit.core.errors import FusionkitError
    from fusionkit.core.yamlio import load_yaml

    values = [load_yaml(v, "--values") for v in text.split(",") if v.strip()]
    if not values:
        raise FusionkitError("--values: give at least one value, e.g. --values=-30,-15,0,15,30")
    return values


def robustness(
    paths: Annotated[list[Path], typer.Argument(help="run or grid directories (trained)")],
    perturb: Annotated[
        str | None,
        typer.Option(help="perturbation to sweep (default: each run recipe's sweeps)"),
    ] = None,
    axis: Annotated[str | None, typer.Option(help="the perturbation param swept, e.g. k")] = None,
    values: Annotated[
        str | None, typer.Option(help="comma-separated values, e.g. --values=-30,-15,0,15,30")
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option(help="fixed param key=value (repeatable)")
    ] = None,
    split: Annotated[list[str] | None, typer.Option(help="split(s) evaluated")] = None,
    seed: Annotated[
        int, typer.Option(min=0, max=2**32 - 1, help="seed of the per-video perturbation draws")
    ] = 0,
    name: Annotated[str | None, typer.Option(help="results file robustness/<name>.json")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda")] = "auto",
) -> None:
    """Evaluate trained runs under a perturbation swept over values (no retraining).

    Results go to <run>/robustness/<name>.json; values already computed are skipped. Example:
    fusionkit robustness runs/misalignment --perturb shift --param modality=audio --axis k
    --values=-30,-15,0,15,30
    """
    from pydantic import ValidationError

    from fusionkit.core.errors import FusionkitError, RecipeError
    from fusionkit.core.overrides import parse_overrides
    from fusionkit.core.params import describe_validation_error
    from fusionkit.core.recipe import RobustnessSpec
    from fusionkit.core.registry import get_registry
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import resolve_device, set_run_threads
    from fusionkit.engine.workers import interrupt_exit_code, sigterm_as_interrupt
    from fusionkit.studies.robustness import run_recipe_robustness
    from fusionkit.studies.scan import collect_runs, scan_runs

    resolve_device(device, what="--device")  # refused before any run is read
    specs: list[RobustnessSpec] | None = None
    if perturb is not None:
        if axis is None or values is None:
            raise FusionkitError(
                "--perturb needs --axis and --values (e.g. --axis k --values=0,15)"
            )
        raw = {
            "name": name,
            "perturbation": perturb,
            "params": parse_overrides(param or [], "--param"),
            "axis": axis,
            "values": _parse_values(values),
            "splits": list(dict.fromkeys(split or ["test"])),
            "seed": seed,
        }
        try:
            spec = RobustnessSpec.model_validate(raw, context={"registry": get_registry()})
        except ValidationError as exc:
            problems = _param_problems(raw) or describe_validation_error(exc)
            raise RecipeError(problems, "<command line>") from None
        specs = [spec]
    elif any(x is not None for x in (axis, values, param, split, name)):
        raise FusionkitError("--axis/--values/--param/--split/--name need --perturb")
    scan = scan_runs(paths)
    runs = collect_runs(paths, scan)
    skipped = [e for e in scan.excluded if e.status != "duplicate"]
    for e in skipped:  # a later report would otherwise pool the sweep over the others only
        err_console.print(
            f"[yellow]left out[/] {escape(e.where)} ({escape(e.variant)}): "
            f"{escape(e.status)}: {escape(e.detail)}"
        )
    finished: list[str] = []
    try:
        with sigterm_as_interrupt():
            for run in runs:
                console.print(f"[bold]{escape(str(run.run_dir))}[/]")

                def show(split_: str, value: Any, m: dict[str, Any]) -> None:
                    console.print(
                        f"  {escape(split_)} {escape(str(value)):>8}  CCC mean {m['ccc_mean']:.4f}"
                    )

                with RunDir.open(run.run_dir) as rdir:
                    # the threads the run was evaluated with, as for eval: the value at
                    # strength 0 then repeats its metrics
                    set_run_threads(rdir, rdir.recipe().training.num_threads)
                    records = run_recipe_robustness(
                        rdir, specs, on_value=show, keep_others=specs is not None, device=device
                    )
                if not records:
                    console.print("  (its recipe declares no evaluation.robustness; use --perturb)")
                for rec in records:
                    console.print(f"  robustness/{escape(str(rec['name']))}.json: complete")
                finished.append(str(run.run_dir))
        if skipped:
            err_console.print(
                f"[yellow]{len(skipped)} run(s) left out[/] (listed above): they have no "
                "results of this sweep; finish them (fusionkit resume, or the grid's "
                "fusionkit run) and run this command again to compute theirs"
            )
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (timeout, kill, a batch scheduler)
        done = f" ({len(finished)} of {len(runs)} runs finished)" if len(runs) > 1 else ""
        err_console.print(
            f"\n[yellow]interrupted[/]{done}: the values computed so far are kept in each run's "
            "robustness/ folder; run the same command again to compute only the missing ones"
        )
        raise typer.Exit(interrupt_exit_code(exc)) from None


def _param_problems(raw: dict[str, Any]) -> list[str]:
    """The problems of the fixed ``--param`` items alone (an unknown key, a bad value), named
    as ``--param KEY``; ``[]`` when they are fine or cannot be checked apart from the sweep
    (the perturbation or axis is wrong: the sweep's own message says so)."""
    from pydantic import ValidationError

    from fusionkit.core.params import describe_validation_error
    from fusionkit.core.recipe import PerturbationSpec
    from fusionkit.core.registry import get_registry

    registry = get_registry()
    params, axis = raw["params"], raw["axis"]
    if not params or ("perturbation", raw["perturbation"]) not in registry or axis in params:
        return []
    first = raw["values"][0]
    try:
        PerturbationSpec.model_validate(
            {"name": raw["perturbation"], "seed": raw["seed"], "params": {**params, axis: first}},
            context={"registry": registry},
        )
    except ValidationError as exc:
        lines = describe_validation_error(exc)
        out = []
        for line in lines:
            key = next(
                (k for k in params if line.startswith((f"params.{k}:", f"params.{k}."))), None
            )
            if key is None:
                continue
            text = "--param " + line.removeprefix("params.")
            if "valid list" in line and not isinstance(params[key], list):
                text += f" (write a list as --param '{key}=[{params[key]}]')"
            out.append(text)
        return out
    return []
