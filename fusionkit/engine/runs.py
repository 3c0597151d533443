"""Run directories: creation, ownership, locking, completion.

A run directory is created by fusionkit with an atomic ``mkdir`` (two runs never get the same
one) and holds ``run.json`` from its first moment: the marker that fusionkit made it, with the
hash of the recipe that trains into it. fusionkit writes into, resumes or re-evaluates only
folders that carry this marker, and only while it holds the folder's lock (``.lock``, an
advisory ``flock`` released by the operating system when the process ends, however it ends).

A run is *complete* when ``run.json`` says so; that is the last file written, after the
metrics and predictions, and it records the SHA-256 of each of them.

Files::

    run.json              marker, versions, components, training settings, status (complete:
                          file hashes)
    recipe.yaml           the resolved recipe
    state.safetensors     resumable training state (last finished epoch)
    model.safetensors     best weights (the epoch named in state and metrics)
    history.csv           one line per finished epoch, appended as training goes
    normalization.safetensors   z-scoring statistics of the training split (when used)
    metrics.json          final metrics per split (written at the end)
    predictions/<split>.safetensors   per-frame predictions and gate weights
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fusionkit.core.errors import CheckpointError, FusionkitError, RecipeError
from fusionkit.core.params import first_few, short_repr
from fusionkit.core.recipe import (
    NAME_PATTERN,
    Recipe,
    RobustnessSpec,
    recipe_to_yaml,
    training_sha256_of,
    training_view_of,
    validate_recipe,
)
from fusionkit.core.registry import Registry, get_registry
from fusionkit.core.yamlio import read_yaml
from fusionkit.engine.files import (
    atomic_write_json,
    atomic_write_text,
    clean_temp_files,
    file_sha256,
    parse_record,
    read_json,
)

__all__ = [
    "BEST_FILE",
    "GRID_FILE",
    "HISTORY_FILE",
    "MARKER_FILE",
    "METRICS_FILE",
    "NORMALIZATION_FILE",
    "PREDICTIONS_DIR",
    "RECIPE_FILE",
    "STATE_FILE",
    "RecipeChanged",
    "RunDir",
    "RunMarker",
    "check_output_file",
    "check_unchanged",
    "is_run_dir",
    "read_grid_record",
    "read_metrics",
    "recorded_metrics",
    "resume_command",
    "run_or_grid_holding",
]

MARKER_FILE = "run.json"
#: the file that marks a grid folder (written by ``fusionkit run`` on a recipe with a sweep)
GRID_FILE = "grid.json"
RECIPE_FILE = "recipe.yaml"
LOCK_FILE = ".lock"
STATE_FILE = "state.safetensors"
BEST_FILE = "model.safetensors"
BEST_NEXT = "model.next.safetensors"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
NORMALIZATION_FILE = "normalization.safetensors"
PREDICTIONS_DIR = "predictions"
MARKER_FORMAT = 1
_MAX_SUFFIX = 10_000


class RecipeChanged(CheckpointError):
    """A run was created by a training recipe other than the one given.

    Attributes:
        changes: ``(dotted path, the run's value, the given recipe's value)`` per setting.
    """

    def __init__(self, message: str, changes: list[tuple[str, Any, Any]]) -> None:
        super().__init__(message)
        self.changes = changes


class RunMarker(BaseModel):
    """Contents of ``run.json``."""

    model_config = ConfigDict(extra="allow")

    format: int = MARKER_FORMAT
    created_by: Literal["fusionkit"] = "fusionkit"
    recipe_sha256: str
    status: Literal["running", "complete"] = "running"
    created: str = ""
    completed: str | None = None
    files: dict[str, str] = Field(
        default_factory=dict, description="at completion: file -> SHA-256"
    )
    training_view: dict[str, Any] | None = Field(
        None,
        description="the training settings the run was created with (Recipe.training_view); "
        "names the key when recipe.yaml is edited later (absent in runs made before it)",
    )


def _git_sha() -> str | None:
    """The commit of the fusionkit checkout that runs (with ``-dirty`` when it has uncommitted
    changes), not of the folder the command runs in; None for an installed package."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, check=False, cwd=here
        )

    try:
        if git("ls-files", "--error-unmatch", Path(__file__).name).returncode != 0:
            return None  # not a file of a git checkout (an installed package)
        sha = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not sha:
        return None
    return f"{sha}-dirty" if dirty else sha


def _provenance(recipe: Recipe, registry: Registry) -> dict[str, Any]:
    """Versions, components with their distributions, command line: what made the run."""
    from fusionkit.core import __version__

    used = [("dataset", recipe.data.name)]
    used += [("encoder", s.name) for s in recipe.model.encoders.values()]
    used += [("fusion", recipe.model.fusion.name), ("gate", recipe.model.gate.name)]
    used += [("head", recipe.model.head.name)]
    used += [("perturbation", p.name) for p in recipe.training.perturbations]
    comps = []
    for kind, name in used:
        c = registry.get(kind, name)
        comps.append(
            {"kind": kind, "name": name, "distribution": c.distribution, "version": c.version}
        )
    return {
        "fusionkit": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_sha": _git_sha(),
        "argv": sys.argv,
        "seed": recipe.training.seed,
        "components": comps,
    }


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder fusionkit created for a run (it has ``run.json``)."""
    return (Path(path) / MARKER_FILE).is_file()


def run_or_grid_holding(path: str | Path) -> tuple[Path, str, str] | None:
    """The nearest of ``path`` (resolved) and its parents that is a fusionkit run or grid
    directory, as ``(folder, "run" or "grid", the file that marks it)``; ``None`` when none
    is. Nothing written on a user's behalf (reports, submissions, streamed predictions,
    converted weights, schemas, feature caches) may land there."""
    target = Path(path).resolve()
    for p in (target, *target.parents):
        if is_run_dir(p):
            return p, "run", MARKER_FILE
        if (p / GRID_FILE).is_file():
            return p, "grid", GRID_FILE
    return None


def check_output_dir(parent: Path, what: str, *, in_grid: bool = False) -> None:
    """Refuse to make a new run or grid (``what``, for the message) under ``parent`` when
    ``parent`` is, or is inside, a run directory, or a grid directory unless ``in_grid`` (a
    grid making its own points): their files belong to them, and reports, resumes and the
    clean-up of leftovers would read or delete the new folder as theirs."""
    held = run_or_grid_holding(parent)
    if held is None or (in_grid and held[1] == "grid"):
        return
    folder, kind, marker = held
    raise CheckpointError(
        f"output.dir {parent} is inside the fusionkit {kind} directory {folder} (it has "
        f"{marker}); a new {what} is never made inside another run or grid: set output.dir "
        "(or --out) to a folder outside it"
    )


def check_output_file(path: Path, force: bool = False, option: str = "--out") -> None:
    """Refuse a file target of a command (``option`` names it in the message): one that is a
    folder, one that is or is inside a run or grid directory (always: those files belong to
    the run), and an existing file unless ``force`` (``--force``) is given. Cheap: call it
    before the work that produces the file."""
    out = Path(path)
    if out.is_dir():
        raise FusionkitError(f"{option} {out} is a folder; give the path of a file to write")
    held = run_or_grid_holding(out)
    if held is not None:
        folder, kind, marker = held
        raise FusionkitError(
            f"{option} {out} is inside the fusionkit {kind} directory {folder} (it has "
            f"{marker}); fusionkit never writes other files into runs or grids: give a path "
            "outside them"
        )
    if out.exists() and not force:
        raise FusionkitError(
            f"{option} {out} exists; pass --force to overwrite it, or give a new file"
        )
    if not out.parent.is_dir():  # a mistyped path makes no folders
        raise FusionkitError(
            f"{option} {out}: the folder {out.parent} does not exist; create it first, or give "
            "a path in an existing folder"
        )


def _merged_sweep(
    old: RobustnessSpec, new: RobustnessSpec, registry: Registry | None
) -> RobustnessSpec:
    """``new``, with ``old``'s values added when the two differ in their values alone."""
    head_old = old.model_dump(mode="json", exclude={"values"})
    head_new = new.model_dump(mode="json", exclude={"values"})
    if head_old != head_new:
        return new
    values = sorted({json.dumps(v): v for v in [*old.values, *new.values]}.values(), key=float)
    return RobustnessSpec.model_validate(
        {**head_new, "values": values}, context={"registry": registry or get_registry()}
    )


class RunDir:
    """A run directory fusionkit created; see the module docstring.

    Get one with :meth:`create` (a new run), :meth:`open` (resume or re-evaluate). Writing
    methods require the lock (:meth:`lock`, or ``with run_dir:``).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls,
        recipe: Recipe,
        registry: Registry | None = None,
        *,
        exact: bool = False,
        in_grid: bool = False,
    ) -> RunDir:
        """Make a new run directory ``<output.dir>/<run name>`` (``-2``, ``-3``, ... when taken,
        or an error when ``exact``), lock it and write ``run.json`` and ``recipe.yaml``.

        The folder is created with one ``mkdir`` that fails if it exists, so two runs never
        share one. ``output.dir`` may not lie in a run, nor in a grid unless ``in_grid`` (the
        grid's own points).
        """
        registry = registry or get_registry()
        parent = Path(recipe.output.dir)
        name = recipe.run_name
        if not re.match(NAME_PATTERN, name):
            raise RecipeError([f"output.name: {name!r} cannot name a folder"], recipe.source)
        check_output_dir(parent, "run", in_grid=in_grid)
        marker = RunMarker(  # before the folder exists: nothing slow runs while it is bare
            recipe_sha256=recipe.training_sha256(),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            training_view=recipe.training_view(),  # names a key of a later edit
            **_provenance(recipe, registry),
        )
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                f"cannot create output.dir {parent}: {exc.strerror or exc}"
            ) from None
        if not parent.is_dir():
            raise CheckpointError(f"output.dir {parent} is not a folder")
        for k in range(1, _MAX_SUFFIX):
            path = parent / (name if k == 1 else f"{name}-{k}")
            try:
                path.mkdir()
            except FileExistsError:
                if exact:
                    raise CheckpointError(
                        f"{path} already exists; resume it with `{resume_command(path)}` "
                        "or choose another output.name"
                    ) from None
                continue
            except OSError as exc:
                raise CheckpointError(f"cannot create {path}: {exc.strerror or exc}") from None
            run = cls(path)
            try:  # an interrupt or a failure in here leaves no folder behind
                run.lock()
                atomic_write_json(path / MARKER_FILE, marker.model_dump(mode="json"))
                atomic_write_text(path / RECIPE_FILE, recipe_to_yaml(recipe))
            except BaseException:
                run.remove_if_unstarted()
                raise
            return run
        raise CheckpointError(f"{parent} holds {_MAX_SUFFIX} runs named {name}; clean it up")

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory; an error unless fusionkit created it."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise CheckpointError(
                f"{p} is a file, not a run directory: give the folder that holds run.json"
                + (f" ({p.parent})" if (p.parent / MARKER_FILE).is_file() else "")
            )
        if not p.is_dir():
            raise CheckpointError(f"run directory not found: {p}")
        if (p / GRID_FILE).is_file() and not (p / MARKER_FILE).is_file():
            points = sorted(q.name for q in p.iterdir() if (q / MARKER_FILE).is_file())
            example = f", e.g. {_q(p / points[0])}" if points else ""
            raise CheckpointError(
                f"{p} is a grid folder ({GRID_FILE}), not a run: name one of its runs"
                f"{example} (to continue the grid itself, run again the `fusionkit run` "
                "command that made it: finished points are kept)"
            )
        if not (p / MARKER_FILE).is_file():
            raise CheckpointError(
                f"{p} is not a fusionkit run directory (no {MARKER_FILE}); fusionkit only "
                "writes into or resumes folders it created"
            )
        run = cls(p)
        run.marker()  # validate it
        return run

    # ------------------------------------------------------------------ lock

    def lock(self) -> RunDir:
        """Take the run's lock for the life of this process (or until :meth:`unlock`).

        Raises:
            CheckpointError: another process holds it (naming that process), or the lock file
                cannot be made or locked (a read-only folder: naming the folder and the reason).
        """
        if self._lock_fd is not None:
            return self
        path = self.path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._lock_error(exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise CheckpointError(
                f"{self.path} is in use by {holder}; wait for it to finish or stop it"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise self._lock_error(exc) from None
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        except OSError as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise self._lock_error(exc) from None
        self._lock_fd = fd
        return self

    def _lock_error(self, exc: OSError) -> CheckpointError:
        return CheckpointError(
            f"cannot lock {self.path} ({LOCK_FILE}: {exc.strerror or exc}); the folder must be "
            "writable to train, resume or add results to what it holds"
        )

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def holder(self) -> str | None:
        """Who holds this run's lock right now (another process), or ``None``."""
        path = self.path / LOCK_FILE
        if self._lock_fd is not None or not path.is_file():
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> RunDir:
        return self.lock()

    def __exit__(self, *exc: object) -> None:
        self.unlock()

    def _require_lock(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"{self.path}: write without holding the run's lock")

    # ------------------------------------------------------------------ state

    def marker(self) -> RunMarker:
        path = self.path / MARKER_FILE
        return parse_record(RunMarker, read_json(path, "run marker"), path, "fusionkit run marker")

    def recipe(self, registry: Registry | None = None) -> Recipe:
        """The run's saved recipe, validated against the installed plugins."""
        p = self.path / RECIPE_FILE
        try:
            raw = read_yaml(p, "run recipe")
        except RecipeError as exc:
            raise CheckpointError(f"{exc}; the run's recipe.yaml was edited or damaged") from None
        try:
            return validate_recipe(raw, str(p), registry)
        except RecipeError:
            missing = self.uninstalled_component(registry or get_registry())
            if missing is not None:  # the recipe is fine: the plugin that built it is gone
                raise CheckpointError(missing) from None
            raise

    def uninstalled_component(
        self, registry: Registry, marker: RunMarker | None = None
    ) -> str | None:
        """What to install to use this run, when ``run.json`` (``marker``, read here when not
        given) records a component built by a plugin that no longer provides it (None when
        every recorded one is installed)."""
        try:
            marker = marker or self.marker()
        except FusionkitError:
            return None
        recorded = (marker.model_extra or {}).get("components")
        for c in recorded if isinstance(recorded, list) else []:
            if not isinstance(c, dict):
                continue
            kind, name = str(c.get("kind")), str(c.get("name"))
            if (kind, name) in registry:
                continue
            dist, version = c.get("distribution"), c.get("version")
            return (
                f"{self} was built with {kind} {name!r} from {dist} {version}, which no "
                f"installed plugin provides now: install it (pip install '{dist}=={version}') "
                "to use the run"
            )
        return None

    def changed_versions(self, registry: Registry, marker: RunMarker | None = None) -> list[str]:
        """The components ``run.json`` (``marker``, read here when not given) records with
        another version of their plugin than the installed one, as ``kind 'name' (dist 0.1
        built it, 0.2 is installed)``, each once; ``[]`` when none (or run.json is
        unreadable)."""
        try:
            marker = marker or self.marker()
        except FusionkitError:
            return []
        recorded = (marker.model_extra or {}).get("components")
        changed: dict[str, None] = {}
        for c in recorded if isinstance(recorded, list) else []:
            if not isinstance(c, dict):
                continue
            kind, name = str(c.get("kind")), str(c.get("name"))
            if (kind, name) not in registry:
                continue
            dist, version = c.get("distribution"), c.get("version")
            now = registry.get(kind, name)
            if now.distribution == dist and version and now.version != version:
                changed[
                    f"{kind} {name!r} ({dist} {version} built it, {now.version} is installed)"
                ] = None
        return list(changed)

    def checked_recipe(self, registry: Registry | None = None) -> Recipe:
        """:meth:`recipe`, refused when its training settings no longer match the hash in
        ``run.json`` (the file was edited after the run was created: swapped targets, another
        window or dataset param would silently change what the weights mean)."""
        rc = self.recipe(registry)
        marker = self.marker()
        if rc.training_sha256() != marker.recipe_sha256:
            raise CheckpointError(self._edited_message(marker, rc.training_view()))
        return rc

    def check_recipe_file(self, raw: Mapping[str, Any], registry: Registry | None = None) -> None:
        """Refuse ``raw``, this run's ``recipe.yaml`` as read, when it was edited after the run
        was created (:meth:`checked_recipe`). A file as fusionkit wrote it matches the hash in
        ``run.json`` as it is, so no component is built (readers such as the report work
        without the run's plugins); only a file that does not is validated, to name the
        changed keys."""
        view = training_view_of(raw)
        marker = self.marker()
        if training_sha256_of(view) == marker.recipe_sha256:
            return
        created = marker.training_view
        if isinstance(created, dict) and _changes(created, view):
            raise CheckpointError(self._edited_message(marker, view))
        self.checked_recipe(registry)  # only written another way, or an older run.json

    def record_robustness(
        self, specs: list[RobustnessSpec], registry: Registry | None = None
    ) -> None:
        """List ``specs`` in the run's ``recipe.yaml``, so that the run's own recipe names
        every sweep in ``robustness/``: sweeps added with ``run --resume``, to a finished grid,
        or by ``fusionkit robustness``. A spec of a name already listed with the same
        perturbation, params, axis, seed and splits adds its values to that one's (in numeric
        order); otherwise it replaces it. Robustness sweeps are not part of the training hash,
        so the run stays resumable."""
        rc = self.recipe(registry)
        have = list(rc.evaluation.robustness)
        labels = [s.label for s in have]
        for spec in specs:
            if spec.label not in labels:
                have.append(spec)
                labels.append(spec.label)
                continue
            i = labels.index(spec.label)
            if have[i] != spec:
                have[i] = _merged_sweep(have[i], spec, registry)
        if have == list(rc.evaluation.robustness):
            return
        ev = rc.evaluation.model_copy(update={"robustness": have})
        text = recipe_to_yaml(rc.model_copy(update={"evaluation": ev}))
        atomic_write_text(self.path / RECIPE_FILE, text)

    def check_same_training(self, recipe: Recipe, registry: Registry | None = None) -> None:
        """Refuse unless ``recipe`` trains exactly what this run was created for.

        When the run's own ``recipe.yaml`` no longer matches the hash in ``run.json`` (it was
        edited after the run was created), the error says so and names the changed keys when
        ``run.json`` records the training settings the run was created with. A readable run of
        another recipe raises :class:`RecipeChanged`, which lists the changed settings.
        """
        marker = self.marker()
        saved = marker.recipe_sha256
        if saved == recipe.training_sha256():
            return
        changes = self.training_changes(recipe, registry)
        if changes is None:
            try:
                own: Recipe | None = self.recipe(registry)
            except FusionkitError:
                own = None
            view = None if own is None else own.training_view()
            raise CheckpointError(self._edited_message(marker, view))
        diffs = [f"{path}: run has {short_repr(a)}, now {short_repr(b)}" for path, a, b in changes]
        shown = first_few(diffs, sep="; ") or "the recipe hash differs"
        fix = (
            "start a new run (without --resume) or choose another output.name"
            if self.is_complete()
            else f"resume it as it was with `{resume_command(self.path)}`, or start a new run"
        )
        raise RecipeChanged(
            f"{self.path} was created by a different recipe ({shown}); {fix}", changes
        )

    def training_changes(
        self, recipe: Recipe, registry: Registry | None = None
    ) -> list[tuple[str, Any, Any]] | None:
        """What ``recipe`` changes in this run's training: ``(dotted path, the run's value,
        the recipe's value)`` per setting, from the run's own ``recipe.yaml``; None when that
        file cannot be trusted (unreadable, or edited after the run was created)."""
        try:
            own = self.checked_recipe(registry)
        except FusionkitError:
            return None
        return _changes(own.training_view(), recipe.training_view())

    def _edited_message(self, marker: RunMarker, own: dict[str, Any] | None) -> str:
        """The run's recipe.yaml (``own``: its training view, None when it cannot be read)
        does not match run.json: which keys changed, if knowable."""
        where = self.path / RECIPE_FILE
        created = marker.training_view
        if own is None:
            what = "it can no longer be read as a recipe"
        elif isinstance(created, dict):
            diffs = [
                f"{path}: created with {short_repr(a)}, recipe.yaml has {short_repr(b)}"
                for path, a, b in _changes(created, own)
            ]
            what = first_few(diffs, sep="; ") or "the recipe hash differs"
        else:
            what = (
                "the changed key cannot be named: run.json of this run does not record the "
                "training settings it was created with"
            )
        return (
            f"{where} was edited after the run was created (its training settings no longer "
            f"match the hash in {MARKER_FILE}: {what}); restore it as it was to resume or use "
            "this run, or start a new run to train differently"
        )

    def is_complete(self) -> bool:
        """Whether the run finished and every file ``run.json`` lists is still there."""
        try:
            marker = self.marker()
        except CheckpointError:
            return False
        if marker.status != "complete":
            return False
        return all((self.path / name).is_file() for name in marker.files)

    def missing_files(self) -> list[str]:
        """Files ``run.json`` lists for a complete run that are no longer there."""
        marker = self.marker()
        if marker.status != "complete":
            return []
        return [name for name in marker.files if not (self.path / name).is_file()]

    def mark_complete(self, files: list[str]) -> None:
        """Record completion, with the SHA-256 of ``files``; the last write of a run."""
        self._require_lock()
        marker = self.marker()
        marker.status = "complete"
        marker.completed = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        marker.files = {name: file_sha256(self.path / name) for name in files}
        atomic_write_json(self.path / MARKER_FILE, marker.model_dump(mode="json"))

    def mark_running(self) -> None:
        """Back to running (a resumed run that will rewrite its results)."""
        self._require_lock()
        marker = self.marker()
        if marker.status != "running":
            marker.status, marker.completed, marker.files = "running", None, {}
            atomic_write_json(self.path / MARKER_FILE, marker.model_dump(mode="json"))

    def clean_temp_files(self) -> list[Path]:
        """Remove leftovers of interrupted atomic writes."""
        self._require_lock()
        return clean_temp_files(self.path)

    def remove_if_unstarted(self) -> bool:
        """Delete this run directory if it holds nothing but what :meth:`create` wrote (a run
        that failed before its first epoch), so that a retry gets the same name."""
        if not self.path.is_dir():
            return False
        created = {MARKER_FILE, RECIPE_FILE, LOCK_FILE, NORMALIZATION_FILE}  # before epoch 1
        for p in self.path.iterdir():
            if p.name not in created and not (p.name.startswith(".") and p.name.endswith(".tmp")):
                return False
        with signals_held():  # a second Ctrl-C does not leave half a run (no run.json)
            for p in self.path.iterdir():
                p.unlink()
            self.unlock()
            self.path.rmdir()
        return True


@contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside wait until it is left, then act as usual: for a
    few file operations that must not stop half-way. Python runs signal handlers in the main
    thread only, so elsewhere nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if held:  # delivered now, to the handler it would have met
            signal.raise_signal(held[0])


def check_unchanged(run_dir: Path, files: Mapping[str, str], name: str) -> None:
    """Refuse ``run_dir/name`` when it differs from the SHA-256 that ``run.json`` recorded for
    it at completion (``files``); a file without a recorded digest is not checked."""
    path = Path(run_dir) / name
    digest = files.get(name)
    if digest is not None and path.is_file() and file_sha256(path) != digest:
        raise CheckpointError(
            f"{path} changed after the run finished (its SHA-256 differs from the one in "
            f"{MARKER_FILE}); it is not the file the run was evaluated with: restore the "
            "original file or train a new run"
        )


def read_grid_record(grid_dir: str | Path) -> dict[str, Any] | None:
    """The ``grid.json`` of ``grid_dir`` as ``fusionkit run`` writes it: ``runs`` maps point
    names to entries with a ``values`` mapping, ``order`` lists them. None when there is none,
    or it cannot be read or has another shape (damaged)."""
    path = Path(grid_dir) / GRID_FILE
    if not path.is_file():
        return None
    try:
        rec = read_json(path, "grid record")
    except CheckpointError:
        return None
    if not isinstance(rec, dict):
        return None
    runs, order = rec.get("runs"), rec.get("order", [])
    if not isinstance(runs, dict) or not isinstance(order, list):
        return None
    fine = all(isinstance(e, dict) and isinstance(e.get("values", {}), dict) for e in runs.values())
    return rec if fine else None


def read_metrics(run_dir: str | Path, targets: list[str] | None = None) -> dict[str, Any]:
    """A run's ``metrics.json``, checked for the keys fusionkit reads from it."""
    p = Path(run_dir) / METRICS_FILE
    if not p.exists():
        complete = is_run_dir(run_dir) and RunDir(Path(run_dir)).marker().status == "complete"
        why = (
            f"{MARKER_FILE} says complete, so the file was removed: restore it or train a new run"
            if complete
            else "the run did not finish"
        )
        raise CheckpointError(f"{run_dir} has no {METRICS_FILE}: {why}")
    m = read_json(p, "metrics file")
    splits = m.get("splits") if isinstance(m, dict) else None
    if not isinstance(splits, dict):
        raise CheckpointError(f"{p}: key 'splits' is missing; the file was edited or damaged")
    need = ["ccc_mean", "n_frames", *(f"ccc_{t}" for t in targets or [])]
    for split, values in splits.items():
        missing = [k for k in need if not isinstance(values, dict) or k not in values]
        if missing:
            raise CheckpointError(
                f"{p}: splits.{split}.{missing[0]} is missing; the file was edited or damaged "
                "(`fusionkit eval` recomputes the metrics from the run's weights)"
            )
    return m


def recorded_metrics(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``metrics.json`` as read, or ``{}`` when it is missing or unreadable: for facts
    that only tune how a run is reloaded (its precision, threads, data hashes), each looked
    up with ``.get``. Where the run's numbers are used, :func:`read_metrics` checks the file."""
    try:
        metrics = read_json(Path(run_dir) / METRICS_FILE, "metrics")
    except FusionkitError:
        return {}
    return metrics if isinstance(metrics, dict) else {}


def resume_command(run_dir: str | Path, world_size: int = 1) -> str:
    """The command that continues ``run_dir`` (under torchrun for a data-parallel run)."""
    head = f"torchrun --nproc_per_node {world_size} -m " if world_size > 1 else ""
    return f"{head}fusionkit resume {_q(run_dir)}"


def _q(path: str | Path) -> str:
    """A path as a shell word, for a command the user is told to run."""
    return shlex.quote(str(path))


def _changes(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted path, value in a, value in b)`` for every leaf on which ``a`` and ``b``
    differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _changes(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [(path, a, b)]
