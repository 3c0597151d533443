"""The ``fusionkit`` command line: run, eval, plugins, recipe."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fusionkit.errors import FusionkitError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="fusionkit: audio-visual fusion for continuous valence/arousal.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="Validate and show recipes.")
app.add_typer(recipe_app, name="recipe")

console = Console()
err_console = Console(stderr=True)


def _split_recipe_args(
    recipe: str | None, overrides: list[str] | None
) -> tuple[str | None, list[str]]:
    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *overrides]
    return recipe, overrides


def _short(targets: list[str]) -> dict[str, str]:
    """Column labels: initials (V, A) when they are unambiguous, else the full names."""
    initials = [t[:1].upper() for t in targets]
    if len(set(initials)) == len(targets):
        return dict(zip(targets, initials, strict=True))
    return {t: t for t in targets}


def metrics_table(title: str, splits: dict[str, dict[str, Any]], targets: list[str]) -> Table:
    """Rich table of per-split metrics (CCC per target and mean, PCC, RMSE, frames)."""
    short = _short(targets)
    table = Table(title=title)
    table.add_column("split")
    for t in targets:
        table.add_column(f"CCC-{short[t]}", justify="right")
    if len(targets) > 1:
        table.add_column("CCC-mean", justify="right", style="bold", no_wrap=True, min_width=8)
    for metric in ("PCC", "RMSE"):
        for t in targets:
            table.add_column(f"{metric}-{short[t]}", justify="right")
    for split, m in splits.items():
        row = [split] + [f"{m[f'ccc_{t}']:.4f}" for t in targets]
        if len(targets) > 1:
            row.append(f"{m['ccc_mean']:.4f}")
        row += [f"{m[f'pcc_{t}']:.4f}" for t in targets]
        row += [f"{m[f'rmse_{t}']:.4f}" for t in targets]
        table.add_row(*row)
    caption = [f"{v} = {k}" for k, v in short.items() if k != v]
    caption.append("frames: " + ", ".join(f"{s} {m['n_frames']}" for s, m in splits.items()))
    table.caption = "; ".join(caption)
    return table


@app.command()
def run(
    recipe: Annotated[
        str | None, typer.Argument(help="recipe YAML (default: the embedded quickstart)")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key.path=value overrides, e.g. training.lr=1e-3")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue the interrupted run of this recipe")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress display")] = False,
    workers: Annotated[
        int, typer.Option("--workers", "-j", min=1, help="parallel CPU processes for a sweep")
    ] = 1,
    strict: Annotated[
        bool, typer.Option("--strict", help="fail if any installed plugin fails to load")
    ] = False,
    executor: Annotated[
        str, typer.Option(help="where grid points run: 'local' processes or a 'ray' cluster")
    ] = "local",
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS or local)")
    ] = None,
) -> None:
    """Train and evaluate a recipe (or every point of its sweep) into run directories."""
    from fusionkit.recipe import load_recipe
    from fusionkit.runs import prepare_run_dir
    from fusionkit.train import Trainer

    if strict:  # through the environment so that sweep worker processes are strict too
        os.environ["FUSIONKIT_STRICT_PLUGINS"] = "1"
    path, ovr = _split_recipe_args(recipe, overrides)
    rc = load_recipe(path, ovr)
    if rc.strict_plugins:
        from fusionkit.registry import get_registry, raise_for_failures

        os.environ["FUSIONKIT_STRICT_PLUGINS"] = "1"
        raise_for_failures(get_registry())
    if (rc.sweep or rc.variants) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FusionkitError(
            "a recipe with sweep/variants cannot run under torchrun: run the grid without "
            "torchrun (points run one after another), or torchrun one point at a time"
        )
    if rc.sweep or rc.variants:
        from fusionkit.sweep import run_grid

        if executor not in ("local", "ray"):
            raise FusionkitError(f"--executor: unknown {executor!r}; use 'local' or 'ray'")
        record = run_grid(
            rc,
            str(path or "<default>"),
            workers=workers,
            console=console,
            executor=executor,
            ray_address=ray_address,
        )
        failed = [t for t, r in record["runs"].items() if r["status"] != "done"]
        if failed:
            err_console.print(f"[red]{len(failed)} run(s) failed[/]: {', '.join(failed)}")
            raise typer.Exit(1)
        return
    from fusionkit.distributed import init_from_env, share_from_main
    from fusionkit.train import resolve_device

    # Under torchrun every process runs this command; rank 0 owns the run directory.
    dist_info = init_from_env(resolve_device(rc.training.device).type)
    fresh = not (resume and (Path(rc.output.dir) / rc.run_name).exists())
    run_dir = prepare_run_dir(rc, resume=resume) if dist_info.is_main else None
    run_dir = Path(str(share_from_main(dist_info, str(run_dir) if run_dir else None)))
    if not dist_info.is_main:
        quiet = True
        console.quiet = True
    out = None if quiet else console
    console.print(f"[bold]fusionkit run[/] {rc.run_name} -> {run_dir}")
    try:
        trainer = Trainer(rc, run_dir, console=out)
    except FusionkitError:
        if fresh and dist_info.is_main:  # e.g. a missing data folder: leave no empty run dir
            _remove_unstarted_run(run_dir)
        raise
    if dist_info.enabled:
        console.print(
            f"data parallel: {dist_info.world_size} processes, "
            f"{dist_info.world_size * rc.training.batch_size} windows per optimizer step"
        )
    console.print(
        f"model: {sum(p.numel() for p in trainer.model.parameters()):,} parameters on "
        f"{trainer.device} ({'bf16' if trainer.bf16 else 'fp32'})"
    )
    try:
        result = trainer.fit(resume=resume)
    except KeyboardInterrupt:
        err_console.print(
            f"\n[yellow]interrupted[/]: the last finished epoch is saved in {run_dir}\n"
            f"resume with: fusionkit run {path or ''} {' '.join(ovr)} --resume".replace("  ", " ")
        )
        raise typer.Exit(130) from None
    console.print(
        metrics_table(
            f"{rc.run_name} (best epoch {result.best_epoch})",
            result.metrics,
            list(rc.model.targets),
        )
    )
    console.print(f"run directory: {run_dir}")


def _remove_unstarted_run(run_dir: Path) -> None:
    """Delete a run directory that holds only what prepare_run_dir wrote."""
    from fusionkit.runs import MANIFEST_FILE, RECIPE_FILE

    if {p.name for p in run_dir.iterdir()} <= {RECIPE_FILE, MANIFEST_FILE}:
        for p in run_dir.iterdir():
            p.unlink()
        run_dir.rmdir()


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
) -> None:
    """Reload a run's best weights and recompute its metrics; compares with metrics.json."""
    from fusionkit.checkpoint import load_weights
    from fusionkit.runs import load_run_recipe, read_metrics
    from fusionkit.train import BEST_FILE, Trainer

    rc = load_run_recipe(run_dir)
    stored = read_metrics(run_dir)
    trainer = Trainer(rc, run_dir, console=None)
    load_weights(Path(run_dir) / BEST_FILE, trainer.model)
    results, _ = trainer.evaluate_splits()
    console.print(metrics_table(f"{rc.run_name} (re-evaluated)", results, list(rc.model.targets)))
    mismatches = [
        f"{split}.{k}: stored {stored['splits'][split][k]!r}, now {v!r}"
        for split, m in results.items()
        for k, v in m.items()
        if split in stored.get("splits", {}) and stored["splits"][split].get(k) != v
    ]
    if mismatches:
        err_console.print("[red]differs from metrics.json:[/]\n  " + "\n  ".join(mismatches))
        raise typer.Exit(1)
    console.print("[green]reproduces metrics.json exactly[/]")


@recipe_app.command("validate")
def recipe_validate(
    recipe: Annotated[str | None, typer.Argument(help="recipe YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Check a recipe (and overrides) without running it."""
    from fusionkit.recipe import load_recipe

    path, ovr = _split_recipe_args(recipe, overrides)
    rc = load_recipe(path, ovr)
    console.print(f"[green]ok[/]: {path or 'embedded quickstart'} ({rc.run_name})")


@recipe_app.command("show")
def recipe_show(
    recipe: Annotated[str | None, typer.Argument(help="recipe YAML")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Print the resolved recipe (defaults filled in) as YAML."""
    from fusionkit.recipe import load_recipe, recipe_to_yaml

    path, ovr = _split_recipe_args(recipe, overrides)
    typer.echo(recipe_to_yaml(load_recipe(path, ovr)))


@recipe_app.command("schema")
def recipe_schema(
    out: Annotated[Path | None, typer.Option(help="write the schema to this file")] = None,
) -> None:
    """JSON Schema of recipes with every installed component's params (for editors)."""
    from fusionkit.checkpoint import atomic_write_text
    from fusionkit.schema import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2)
    if out is not None:
        atomic_write_text(out, text + "\n")
    else:
        typer.echo(text)


def _register_subcommands() -> None:
    # Each area keeps its commands in its own module (fusionkit/cli_*.py).
    from fusionkit import cli_data, cli_plugins, cli_report

    app.add_typer(cli_plugins.app, name="plugins")
    cli_report.register(app)
    cli_data.register(app)


_register_subcommands()


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main() -> None:
    """Console entry point: user mistakes print one message, no traceback."""
    import warnings

    from rich.markup import escape

    warnings.formatwarning = _format_warning  # one plain line, not file:line + source
    try:
        app()
    except FusionkitError as exc:
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
