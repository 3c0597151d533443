"""The folder a report is written to: which folders ``--out`` may name, and writing every
file of a report there so that a failure leaves the earlier report as it was.

A report folder carries ``report.json`` (:data:`REPORT_MARK`): who made it, the command, the
sources and the list of files it wrote. A new report replaces an earlier one of fusionkit's
whole; a folder with anything else in it is refused, and so is a folder inside a run or grid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import time
from pathlib import Path

from fusionkit.core.errors import CheckpointError, FusionkitError
from fusionkit.core.params import first_few
from fusionkit.engine.files import new_temp_folder, read_json, write_flushed
from fusionkit.engine.runs import run_or_grid_holding
from fusionkit.studies.render import report_files
from fusionkit.studies.report import Report

__all__ = ["REPORT_MARK", "check_report_dir", "write_report"]


REPORT_MARK = "report.json"
# Files (and the folder) a report writes; an unmarked folder holding only these, with a
# report.md of fusionkit's, is a report written before reports carried REPORT_MARK.
_REPORT_NAMES = frozenset(
    {"report.md", "report.html", "table.tex", "summary.csv", "runs.csv", "curves.csv",
     "robustness.csv", "gate_flags.csv", "plots"}
)  # fmt: skip


def _report_files_in(folder: Path) -> list[str] | None:
    """The files an earlier report in ``folder`` wrote (relative, ``/``-separated), or None
    when ``folder`` is not a report of fusionkit's."""
    mark = folder / REPORT_MARK
    if mark.is_file():
        try:
            rec = read_json(mark, "report mark")
        except FusionkitError:
            return None
        if not isinstance(rec, dict) or rec.get("created_by") != "fusionkit":
            return None
        files = rec.get("files")
        if not isinstance(files, list):
            return None
        return [REPORT_MARK, *(f for f in files if isinstance(f, str))]
    names = {p.name for p in folder.iterdir()}
    plots = folder / "plots"
    head = folder / "report.md"
    try:
        legacy = (
            names <= _REPORT_NAMES
            and head.is_file()
            and head.read_bytes()[:40].startswith(b"# Comparison report")
            and (not plots.exists() or all(p.suffix == ".png" for p in plots.iterdir()))
        )
    except OSError:
        return None
    if not legacy:
        return None
    return sorted(names) + [  # `plots` itself too: an empty plots folder is the report's
        f"plots/{p.name}" for p in (plots.iterdir() if plots.is_dir() else [])
    ]


def check_report_dir(out_dir: Path) -> str:
    """Refuse an ``--out`` the report must not be written to, naming it and the fix; else say
    what it is: ``"new"`` (missing), ``"empty"`` or ``"report"`` (an earlier report of
    fusionkit's, which the new one replaces entirely). Cheap: call it before the report is
    computed."""
    out = Path(out_dir)
    target = out.resolve()
    if target.exists() and not target.is_dir():
        kind = "a file" if target.is_file() else "not a folder"
        raise FusionkitError(
            f"--out {out} is {kind}; the report is a folder of files: give a new or empty "
            "folder (e.g. --out reports/NAME)"
        )
    for p in (target, *target.parents):
        if p.exists() and not p.is_dir():
            raise FusionkitError(
                f"--out {out}: {p} is a file, not a folder; give a new or empty folder"
            )
    held = run_or_grid_holding(target)
    if held is not None:
        p, found, marker = held
        where = "is" if p == target else "is inside"
        raise FusionkitError(
            f"--out {out} {where} the fusionkit {found} directory {p} (it has {marker}); "
            "a report is never written into runs or grids: give a new or empty folder "
            "outside them"
        )
    if not target.exists():
        return "new"
    try:
        entries = list(target.iterdir())
    except OSError as exc:
        raise FusionkitError(
            f"--out {out} cannot be read ({exc.strerror or exc}); fix its permissions or give "
            "a new or empty folder"
        ) from None
    if not entries:
        return "empty"
    files = _report_files_in(target)
    if files is None:
        raise FusionkitError(
            f"--out {out} was not made by fusionkit report (it is not empty and has no "
            f"{REPORT_MARK}); give a new or empty folder"
        )
    allowed = set(files) | {f.rsplit("/", 1)[0] for f in files if "/" in f}
    foreign = sorted(
        str(p.relative_to(target))
        for p in target.rglob("*")
        if p.relative_to(target).as_posix() not in allowed
    )
    if foreign:
        shown = first_few(foreign, 3)
        raise FusionkitError(
            f"--out {out} holds files its earlier report did not write ({shown}); move them "
            "away or give a new or empty folder"
        )
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = None
    if cwd is not None and (cwd == target or target in cwd.parents):
        raise FusionkitError(
            f"--out {out} is or holds the current folder, and the new report replaces it "
            "whole; run the command from outside it"
        )
    return "report"


def _with_mark(rep: Report, contents: dict[str, bytes]) -> dict[str, bytes]:
    """``contents`` and the report's :data:`REPORT_MARK` (last)."""
    from fusionkit.core import __version__

    mark = {
        "created_by": "fusionkit",
        "what": "fusionkit report",
        "command": rep.command or None,
        "fusionkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": list(rep.sources),
        "split": rep.split,
        "files": sorted(contents),
    }
    text = json.dumps(mark, indent=2, sort_keys=True) + "\n"
    return {**contents, REPORT_MARK: text.encode("utf-8")}


def write_report(rep: Report, out_dir: Path, html_page: bool = True) -> list[Path]:
    """Write ``report.md``, ``report.html``, ``table.tex``, ``summary.csv``, ``runs.csv``,
    ``curves.csv``, ``robustness.csv``, ``gate_flags.csv`` (those with content),
    ``plots/*.png`` and ``report.json`` (the mark that fusionkit made the folder) into
    ``out_dir``; returns the paths written.

    ``out_dir`` must be new, empty or an earlier report (:func:`check_report_dir`). The report
    is written into a temporary folder beside it and swapped in only when complete (an earlier
    report is renamed away, the new one renamed in, the old one removed; into an empty folder
    its files are moved, the mark last), so a failure leaves the earlier report as it was and
    no file of it survives next to the new one.
    """
    out = Path(out_dir)
    check_report_dir(out)
    contents = _with_mark(rep, report_files(rep, html_page))  # rendered before any write
    target = out.resolve()

    def failed(exc: OSError, doing: str) -> CheckpointError:
        return CheckpointError(
            f"could not write the report to {out} ({doing}: {exc.strerror or exc}); the earlier "
            "report there (if any) is intact (free disk space or fix permissions, then run the "
            "command again)"
        )

    try:
        tmp = new_temp_folder(target)
    except OSError as exc:
        raise failed(exc, f"creating a folder in {target.parent}") from None
    try:
        for rel, data in contents.items():
            p = tmp / rel
            try:
                p.parent.mkdir(exist_ok=True)
                write_flushed(p, data)
            except OSError as exc:
                raise failed(exc, f"writing {rel}") from None
        try:  # one report at a time swaps into this folder (advisory, where supported)
            lock_fd = os.open(target.parent, os.O_RDONLY)
        except OSError as exc:
            raise failed(exc, f"opening {target.parent}") from None
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
            kind = check_report_dir(out)  # again: it may have changed while we rendered
            old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}.tmp"
            if kind == "empty":  # the folder itself stays (its permissions, a shell in it)
                moved: list[str] = []
                try:
                    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == REPORT_MARK):
                        os.rename(entry, target / entry.name)  # the mark last
                        moved.append(entry.name)
                except OSError as exc:
                    for name in moved:  # back out what was moved (the folder was empty)
                        gone = target / name
                        if gone.is_dir():
                            shutil.rmtree(gone, ignore_errors=True)
                        elif gone.exists():
                            with contextlib.suppress(OSError):
                                gone.unlink()
                    raise failed(exc, "moving the new report in") from None
            else:
                if kind == "report":
                    try:
                        os.rename(target, old)
                    except OSError as exc:
                        raise failed(exc, "moving the earlier report aside") from None
                try:
                    os.rename(tmp, target)
                except OSError as exc:
                    if kind == "report":
                        os.rename(old, target)
                    raise failed(exc, "moving the new report in") from None
            with contextlib.suppress(OSError):
                os.fsync(lock_fd)  # the renames on disk
        finally:
            os.close(lock_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old if kind == "report" else tmp, ignore_errors=True)
    return [out / rel for rel in contents]
