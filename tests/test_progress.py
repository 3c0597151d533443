"""Progress that works in logs: plain lines when the output is not a terminal."""

from __future__ import annotations

import io
import warnings

from rich.console import Console

from fusionkit.engine.progress import TaskProgress, duration, train_progress, warnings_to


def log_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=False, width=60), buf


def test_task_progress_prints_plain_lines_every_twentieth_and_the_last():
    console, buf = log_console()
    with TaskProgress("extract", 40, console) as progress:
        for k in range(40):
            progress.advance(f"video_{k}")
    lines = buf.getvalue().splitlines()
    counts = [int(line.split()[1].split("/")[0]) for line in lines]
    assert counts == [*range(1, 40, 2), 40]  # the first, every 2 units of 40, the last
    assert lines[0].startswith("extract 1/40 video_0") and "eta" in lines[0]
    assert lines[-1].startswith("extract 40/40 video_39") and "\x1b" not in buf.getvalue()


def test_training_prints_one_unwrapped_line_per_epoch_in_logs():
    console, buf = log_console()
    progress = train_progress(console, "a_run_name_that_is_long_enough_to_wrap_at_sixty_columns")
    progress.start(3, 0, 10)
    for epoch in (1, 2, 3):
        progress.epoch(
            {"epoch": epoch, "train_loss": 0.5, "val_ccc_mean": 0.6, "lr": 1e-3, "seconds": 2.0},
            improved=epoch == 1,
        )
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4  # the header, then one line per epoch, none wrapped at 60 columns
    assert "epoch 1/3" in lines[1] and "val CCC 0.6000 *" in lines[1] and "eta" in lines[1]
    assert "epoch 3/3" in lines[3] and "eta 0s" in lines[3]


def test_durations_read_naturally():
    assert [duration(s) for s in (4.4, 65, 7300)] == ["4s", "1m05s", "2h01m"]


def test_a_run_with_every_epoch_trained_says_so_not_an_empty_range():
    """Resuming a run whose epochs are all trained (it stopped before its final evaluation)
    printed "epochs 3..2"."""
    console, buf = log_console()
    train_progress(console, "r").start(2, 2, 10)
    assert buf.getvalue().strip() == "r: every epoch is trained; evaluating the best weights"


def test_warnings_print_as_one_line_without_a_source_excerpt():
    """The command and its grid workers show a warning as `warning: <message>` on one line,
    markup in the message printed as written, never the source line that raised it."""
    buf = io.StringIO()
    show = warnings_to(Console(file=buf, soft_wrap=True, highlight=False, color_system=None))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        warnings.warn("3 of 5 videos have no [audio] at all", UserWarning, stacklevel=1)
    assert buf.getvalue() == "warning: 3 of 5 videos have no [audio] at all\n"
