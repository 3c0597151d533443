"""``fusionkit stream``: online prediction of a trained run over a features or media file."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from fusionkit.cli._common import console, err_console, shown_path

if TYPE_CHECKING:
    from fusionkit.engine.session import Session


#: The frame rate a features file is streamed at when ``--fps`` is not given.
ASSUMED_FPS = 30.0


def register(app: typer.Typer) -> None:
    app.command("stream")(stream)


def stream(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    source: Annotated[
        Path,
        typer.Argument(
            help="features file: .safetensors or .npz with one (frames, features) array per "
            "modality, the features the run was trained on (at most 2,000,000 frames); a "
            "media file only for a dataset plugin that reads media (none shipped does)"
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="write frame,seconds,<targets>,latency_ms as CSV (a new file; never inside "
            "a run or grid)",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="overwrite an existing --out file")
    ] = False,
    fps: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            max=1000.0,
            help="frames per second of a features file (it holds none; 30 when not given, "
            "with a note): sets the seconds column, the --realtime pace and the latency budget",
        ),
    ] = None,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="pace the input at the video's frame rate")
    ] = False,
    context: Annotated[
        int | None, typer.Option(min=1, max=100_000, help="frames kept (default: data.window)")
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:N or auto (CUDA when present)")
    ] = "cpu",
    threads: Annotated[int, typer.Option(min=1, max=1024, help="CPU threads")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only the summary")] = False,
) -> None:
    """Predict valence/arousal frame by frame, as from a live source (no future frame is
    used), printing or writing each frame's prediction and its compute latency."""
    import torch

    from fusionkit.core.errors import DataError
    from fusionkit.engine.files import atomic_write_text
    from fusionkit.engine.progress import TaskProgress
    from fusionkit.engine.runs import check_output_file
    from fusionkit.engine.session import load_run, set_threads
    from fusionkit.engine.streaming import StreamingPredictor
    from fusionkit.engine.streaming import stream as run_stream
    from fusionkit.engine.workers import interrupt_exit_code, sigterm_as_interrupt

    if out is not None:
        check_output_file(out, force)  # before the model is loaded: a refused --out is told at once
    set_threads(threads)
    session = load_run(run_dir, device=device).session
    rc = session.recipe
    features, rate = _read_source(source, session, fps)
    if rate is None:
        rate = ASSUMED_FPS
        err_console.print(
            f"[yellow]note:[/] {shown_path(source)} holds no frame rate: the seconds column "
            f"and the latency budget assume {ASSUMED_FPS:g} fps; give the video's rate with --fps"
        )
    dims = {m: int(x.shape[1]) for m, x in features.items()}
    predictor = StreamingPredictor(
        session.model, dims, context or rc.data.window, session.normalizer, bf16=session.bf16
    )
    for note in predictor.notes:  # where the streamed numbers are not the whole video's
        err_console.print(f"[yellow]note:[/] {escape(note)}")
    targets = list(rc.model.targets)
    total = next(iter(features.values())).shape[0]
    lines = ["frame,seconds," + ",".join(targets) + ",latency_ms"]
    latencies: list[float] = []
    shown = console if out is not None and not quiet else None
    console.stop_on_closed = out is None and not quiet  # the printed lines are the product
    if out is None and not quiet:  # the header names the columns (the run's target order)
        console.print(lines[0], highlight=False)
    try:
        with sigterm_as_interrupt(), TaskProgress("stream", total, shown) as progress:
            for f in run_stream(predictor, features, rate, realtime):
                if not bool(torch.isfinite(f.prediction).all()):
                    got = ", ".join(
                        f"{t}={v}" for t, v in zip(targets, f.prediction.tolist(), strict=True)
                    )
                    raise DataError(
                        f"{source}: the model predicts a non-finite value at frame {f.index} "
                        f"({got}): the features there are far beyond the training range after "
                        "the run's z-scoring (or are not the features the run was trained on); "
                        "fix those frames"
                        + (f"; nothing was written to {out}" if out is not None else "")
                    )
                values = ",".join(f"{v:.6f}" for v in f.prediction.tolist())
                lines.append(f"{f.index},{f.seconds:.3f},{values},{f.latency * 1e3:.3f}")
                latencies.append(f.latency)
                if out is None and not quiet:
                    console.print(lines[-1], highlight=False)
                progress.advance(f"latency {f.latency * 1e3:.2f} ms")
    except KeyboardInterrupt as exc:
        err_console.print(_interrupted(out, quiet, len(latencies), total))
        raise typer.Exit(interrupt_exit_code(exc)) from None
    finally:
        console.stop_on_closed = False
    if out is not None:
        atomic_write_text(out, "\n".join(lines) + "\n")
    console.print(_summary(latencies, rate) + (f"; wrote {escape(str(out))}" if out else ""))


def _read_source(
    source: Path, session: Session, fps: float | None
) -> tuple[dict[str, Any], float | None]:
    """The per-modality features of ``source`` (a features file, or a media file the run's
    dataset can extract) checked against the run's inputs, and their frame rate: ``fps``, else
    the media file's, else None (a features file holds none)."""
    from fusionkit.core.errors import DataError
    from fusionkit.core.interfaces import MediaFeatures
    from fusionkit.engine.streaming import check_features, read_feature_file

    modalities = sorted(session.recipe.model.encoders)
    expected = {m: int(session.dataset.feature_dims[m]) for m in modalities}
    if source.suffix in (".safetensors", ".npz"):
        return read_feature_file(source, modalities, expected), fps
    if isinstance(session.dataset, MediaFeatures):
        features, media_fps = session.dataset.media_features(source)
        return check_features(features, source, modalities, expected), fps or media_fps
    raise DataError(
        f"{source}: dataset {session.recipe.data.name!r} cannot read media files; give a "
        ".safetensors or .npz features file with one (frames, features) array per modality "
        "(for Aff-Wild2: the rows of the run's extract caches, see docs/recipes.md, Streaming)"
    )


def _interrupted(out: Path | None, quiet: bool, done: int, total: int) -> str:
    """What a Ctrl-C after ``done`` of ``total`` frames leaves behind, and how to go on."""
    if out is not None:
        kept = (
            f"{escape(str(out))} was not written (it is written once every frame is "
            "streamed; an earlier file there is intact)"
        )
    elif quiet:
        kept = "nothing was written (-q prints the summary only)"
    elif done == 0:
        kept = "no frame was printed"
    else:
        kept = f"the predictions of frames 0 to {done - 1} are printed above"
    return (
        f"\n[yellow]interrupted[/] after {done} of {total} frames: {kept}; run the same "
        "command again to stream the file from its start"
    )


def _summary(latencies: list[float], rate: float) -> str:
    """Median and 99th-percentile latency per frame against the frame budget at ``rate``."""
    ms = sorted(x * 1e3 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    speed = (len(ms) / rate) / max(sum(latencies), 1e-9)
    return (
        f"streamed {len(ms)} frames at {rate:g} fps: latency p50 {statistics.median(ms):.2f} ms, "
        f"p99 {p99:.2f} ms, budget {1e3 / rate:.1f} ms per frame; {speed:.1f}x real time"
    )
