"""Feature caches for datasets that preprocess raw media (``fusionkit extract``).

Generic machinery, used by dataset plugins that implement
:class:`fusionkit.plugin.Extractable`:

* **Source fingerprints.** A file is identified by its size, its modification time and the
  SHA-256 of its size, first MiB and last MiB. Checking is cheap: the same size and
  modification time mean "unchanged". When only the time differs (a copy, a ``touch``), the
  head/tail hash decides. A folder (e.g. one video's face crops) is identified by its number
  of files and the SHA-256 of its sorted ``name, size`` list; with the same names and sizes,
  files whose modification times changed since (a rewrite, or a copy) make the SHA-256 of
  every file's content decide, as the head/tail hash does for a file. (Caches written before
  folders recorded times and content are checked by names and sizes only.)
* **Cache folders.** One folder per extractor configuration, named
  ``<kind>/<extractor>-<key>`` where ``key`` hashes the extractor name, its params and the
  SHA-256 of any weights file. Changing a param therefore writes to a new folder and never
  mixes features. Each cache file is a safetensors file whose metadata records the extractor,
  the source fingerprints, the media facts (``info``: fps, frame count, ...), the versions of
  the libraries that made it, and one SHA-256 over the tensors *and* all of that metadata
  (``content_sha256``), so an edited ``num_frames`` is caught like a flipped tensor byte. A
  file is *valid* when it reads, its content hash matches and its sources are unchanged.
  Otherwise it is *stale* (a source changed, or an older cache format) or *corrupt*.
  ``manifest.json`` summarises a folder for people and tools; the per-file metadata is what is
  checked.
* **Jobs.** :func:`run_jobs` runs picklable jobs in worker processes with a progress bar. A
  job writes its cache file through an atomic rename, so an interrupted pass leaves only
  complete files and the next pass resumes where it stopped. Workers end themselves when
  the process that started them dies (even by ``kill -9``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors import SafetensorError, safe_open

from fusionkit.plugin import (
    DataError,
    ExtractReport,
    FusionkitError,
    TaskProgress,
    atomic_write_json,
    available_cores,
    die_with_parent,
    non_finite_tensor,
    save_tensors,
)

__all__ = [
    "CACHE_FORMAT",
    "CacheFolder",
    "CacheProblem",
    "CacheStatus",
    "Job",
    "config_key",
    "file_sha256",
    "fingerprint",
    "fingerprint_changed",
    "library_versions",
    "plan",
    "run_jobs",
]

#: Version of the cache-file layout; bump it to make every existing cache file stale (it is
#: then recomputed in place, with the reason listed). 2: the content hash covers the metadata.
CACHE_FORMAT = 2
#: Version of the folder naming (``<extractor>-<key>``); kept apart from :data:`CACHE_FORMAT`
#: so that a format change refreshes files in their folder instead of orphaning the folder.
_FOLDER_KEY_VERSION = 1
_FORMAT_CHANGES = {1: "its content hash does not cover the metadata"}
_MIB = 1 << 20
_META_KEY = "fusionkit_cache"


# --------------------------------------------------------------------------- fingerprints


def _head_tail_sha256(path: Path, size: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as fh:
        h.update(fh.read(_MIB))
        if size > 2 * _MIB:
            fh.seek(size - _MIB)
        h.update(fh.read(_MIB))
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Full SHA-256 of a file (used for weights files, which define an extractor)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(8 * _MIB), b""):
            h.update(block)
    return h.hexdigest()


def _dir_listing(path: Path) -> tuple[int, str, str]:
    """Files of a folder: their number, the SHA-256 of the sorted ``name, size`` list and the
    SHA-256 of the sorted ``name, modification time`` list."""
    entries = sorted(
        (e.name, e.stat().st_size, e.stat().st_mtime_ns)
        for e in os.scandir(path)
        if e.is_file() and e.name[0] != "."
    )
    sizes, times = hashlib.sha256(), hashlib.sha256()
    for name, size, mtime in entries:
        sizes.update(f"{name}\t{size}\n".encode())
        times.update(f"{name}\t{mtime}\n".encode())
    return len(entries), sizes.hexdigest(), times.hexdigest()


def _dir_content(path: Path) -> str:
    """SHA-256 over the names and full contents of a folder's files, in name order."""
    h = hashlib.sha256()
    for name in sorted(e.name for e in os.scandir(path) if e.is_file() and e.name[0] != "."):
        h.update(f"{name}\n".encode())
        with (path / name).open("rb") as fh:
            for block in iter(lambda: fh.read(8 * _MIB), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint(path: str | Path) -> dict[str, Any]:
    """Fingerprint of a source file or folder (see the module docstring).

    Raises:
        DataError: naming the path when it does not exist or cannot be read.
    """
    p = Path(path)
    try:
        if p.is_dir():
            files, digest, times = _dir_listing(p)
            return {
                "path": str(p),
                "kind": "dir",
                "files": files,
                "sha256": digest,
                "mtimes_sha256": times,
                "files_sha256": _dir_content(p),
            }
        st = p.stat()
        return {
            "path": str(p),
            "kind": "file",
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256_head_tail": _head_tail_sha256(p, st.st_size),
        }
    except OSError as exc:
        raise DataError(f"cannot read {p}: {exc.strerror or exc}") from None


def fingerprint_changed(saved: dict[str, Any], path: str | Path) -> str | None:
    """``None`` if ``path`` still matches ``saved``, else a short reason naming the path."""
    p = Path(path)
    if not p.exists():
        return f"{p} no longer exists"
    try:
        if saved.get("kind") == "dir":
            if not p.is_dir():
                return f"{p} is no longer a folder"
            files, digest, times = _dir_listing(p)
            if files != saved.get("files"):
                return f"{p} now has {files} files (was {saved.get('files')})"
            if digest != saved.get("sha256"):
                return f"{p}: file names or sizes changed"
            if "files_sha256" not in saved or times == saved.get("mtimes_sha256"):
                return None
            if _dir_content(p) == saved["files_sha256"]:
                return None  # touched or copied, the same files
            return f"{p}: the content of files changed (same names and sizes)"
        st = p.stat()
        if st.st_size != saved.get("size"):
            return f"{p} changed size ({saved.get('size')} -> {st.st_size} bytes)"
        if st.st_mtime_ns == saved.get("mtime_ns"):
            return None
        if _head_tail_sha256(p, st.st_size) == saved.get("sha256_head_tail"):
            return None
        return f"{p} changed content"
    except OSError as exc:
        return f"{p} cannot be read ({exc.strerror or exc})"


def config_key(config: Any, length: int = 12) -> str:
    """A short stable hash of a JSON-serialisable configuration."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def library_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions of python, torch, fusionkit and the named distributions (``"absent"`` if none)."""
    import fusionkit

    out = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "fusionkit": fusionkit.__version__,
        "torch": torch.__version__,
    }
    for dist in extra:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "absent"
    return out


def _content_sha256(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes) and the metadata (canonical
    JSON, without the ``content_sha256`` entry itself)."""
    h = hashlib.sha256()
    covered = {k: v for k, v in meta.items() if k != "content_sha256"}
    text = json.dumps(covered, sort_keys=True, separators=(",", ":"), default=str)
    h.update(f"meta|{len(text)}\n{text}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- cache folders


@dataclass(frozen=True)
class CacheStatus:
    """State of one cache file: ``valid``, ``missing``, ``stale`` or ``corrupt``, and why."""

    state: str
    reason: str = ""

    @property
    def valid(self) -> bool:
        return self.state == "valid"


class CacheFolder:
    """One extractor configuration's folder of per-item safetensors caches.

    Args:
        root: the cache root (e.g. ``<dataset>/fusionkit_cache``).
        kind: a sub-folder per kind of feature, e.g. ``"audio"``.
        extractor: JSON-serialisable identity of the extractor: name, params, weights hash.
            Its hash names the folder.
        versions: library versions recorded in every file and in the manifest.
    """

    def __init__(
        self,
        root: str | Path,
        kind: str,
        extractor: dict[str, Any],
        versions: dict[str, str] | None = None,
    ) -> None:
        self.extractor = extractor
        self.key = config_key({"format": _FOLDER_KEY_VERSION, **extractor})
        name = str(extractor.get("name", "features"))
        self.path = Path(root) / kind / f"{name}-{self.key}"
        self.kind = kind
        self.versions = versions or library_versions()

    def file(self, item: str) -> Path:
        """The cache file of one item (a video or media name)."""
        return self.path / f"{item}.safetensors"

    # ------------------------------------------------------------------ writing

    def write(
        self,
        item: str,
        tensors: dict[str, torch.Tensor],
        sources: dict[str, str | Path],
        info: dict[str, Any] | None = None,
    ) -> Path:
        """Atomically write one item's tensors with its source fingerprints and ``info``; the
        recorded ``content_sha256`` covers the tensors and every metadata entry. Tensors with
        a NaN or an infinity are refused: nothing is cached, and the job fails naming them."""
        bad = non_finite_tensor(tensors)
        if bad is not None:
            raise DataError(
                f"{self.kind} features of {item!r} from {self.extractor!r} hold {bad}; the "
                "backbone's weights or the media are faulty: nothing was cached for it (check "
                "the weights file, or the media of that item)"
            )
        meta: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "item": item,
            "kind": self.kind,
            "extractor": self.extractor,
            "extractor_key": self.key,
            "sources": {role: fingerprint(p) for role, p in sources.items()},
            "info": info or {},
            "versions": self.versions,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        meta = json.loads(json.dumps(meta, default=str))  # exactly what a reader will see
        meta["content_sha256"] = _content_sha256(tensors, meta)
        path = self.file(item)
        save_tensors(path, tensors, {_META_KEY: json.dumps(meta, default=str)})
        return path

    # ------------------------------------------------------------------ reading

    def _read_meta(self, path: Path) -> dict[str, Any]:
        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(_META_KEY)
        except (SafetensorError, OSError, ValueError) as exc:
            raise _Corrupt(f"not a readable safetensors file ({exc})") from None
        if raw is None:
            raise _Corrupt("no fusionkit cache metadata")
        try:
            meta = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # not JSON, or nested too deep
            raise _Corrupt(f"metadata is not JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise _Corrupt("metadata is not a JSON object")
        fmt = meta.get("format")
        if fmt != CACHE_FORMAT:
            why = _FORMAT_CHANGES.get(fmt) if isinstance(fmt, int) else None
            raise _Stale(
                f"cache format {fmt} (current {CACHE_FORMAT}): "
                f"{why or 'written by another fusionkit version'}"
            )
        if meta.get("extractor_key") != self.key:
            raise _Stale("made by a different extractor configuration")
        return meta

    def _check_sources(self, meta: dict[str, Any], sources: dict[str, str | Path]) -> None:
        saved = meta.get("sources", {})
        for role, p in sources.items():
            if role not in saved:
                raise _Stale(f"records no source {role!r}")
            why = fingerprint_changed(saved[role], p)
            if why is not None:
                raise _Stale(f"source {why}")

    def status(self, item: str, sources: dict[str, str | Path]) -> CacheStatus:
        """Whether ``item``'s cache can be used as is (reads and hashes the file)."""
        try:
            self.load(item, sources)
        except _Missing:
            return CacheStatus("missing")
        except _Stale as exc:
            return CacheStatus("stale", str(exc))
        except _Corrupt as exc:
            return CacheStatus("corrupt", str(exc))
        return CacheStatus("valid")

    def load(
        self, item: str, sources: dict[str, str | Path] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Read one item's tensors and its metadata, verifying integrity (tensors and metadata
        against the recorded SHA-256) and then (if given) that the ``sources`` are unchanged.

        Raises:
            CacheProblem: subclasses say whether the file is missing, stale or corrupt; the
                message names the file.
        """
        path = self.file(item)
        if not path.is_file():
            raise _Missing(f"no cache file {path}")
        meta = self._read_meta(path)
        try:
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _Corrupt(f"tensors cannot be read ({exc})") from None
        if _content_sha256(tensors, meta) != meta.get("content_sha256"):
            raise _Corrupt(
                "tensors or metadata (info, sources, ...) do not match the recorded SHA-256 "
                "(the file was altered)"
            )
        if sources is not None:
            self._check_sources(meta, sources)
        return tensors, meta

    def load_or_raise(
        self, item: str, sources: dict[str, str | Path] | None, fix: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """:meth:`load`, turning a problem into a :class:`DataError` naming the file and
        ending with ``fix`` (e.g. the command that rebuilds the cache)."""
        try:
            return self.load(item, sources)
        except _Missing:
            raise DataError(f"missing feature cache {self.file(item)}; {fix}") from None
        except _Stale as exc:
            raise DataError(f"stale feature cache {self.file(item)}: {exc}; {fix}") from None
        except _Corrupt as exc:
            raise DataError(f"corrupt feature cache {self.file(item)}: {exc}; {fix}") from None

    def info(self, item: str) -> dict[str, Any] | None:
        """An item's recorded metadata without any check (``None`` if it cannot be read)."""
        path = self.file(item)
        if not path.is_file():
            return None
        try:
            return self._read_meta(path)
        except CacheProblem:
            return None

    def write_manifest(self, items: Iterable[str]) -> Path:
        """Write ``manifest.json``: the extractor, versions and each valid item's record."""
        entries = {}
        for item in sorted(items):
            path = self.file(item)
            if not path.is_file():
                continue
            try:
                meta = self._read_meta(path)
            except CacheProblem:
                continue
            entries[item] = {
                "file": path.name,
                "bytes": path.stat().st_size,
                "sources": meta.get("sources", {}),
                "content_sha256": meta.get("content_sha256"),
                "info": meta.get("info", {}),
                "created": meta.get("created"),
                "versions": meta.get("versions", {}),
            }
        manifest = {
            "format": CACHE_FORMAT,
            "kind": self.kind,
            "key": self.key,
            "extractor": self.extractor,
            "versions": self.versions,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "items": entries,
        }
        out = self.path / "manifest.json"
        atomic_write_json(out, manifest)
        return out


class CacheProblem(DataError):
    """Base of the internal missing/stale/corrupt signals (a :class:`DataError`)."""


class _Missing(CacheProblem):
    pass


class _Stale(CacheProblem):
    pass


class _Corrupt(CacheProblem):
    pass


# --------------------------------------------------------------------------- job runner


@dataclass(frozen=True)
class Job:
    """One unit of extraction work.

    Attributes:
        label: what the progress display and error report call it (e.g. the video name).
        payload: a picklable argument for the job function.
    """

    label: str
    payload: Any


def _worker_init(threads: int) -> None:
    # A worker must not outlive the pass: after a kill -9 of the parent it would finish its
    # job and then wait forever for the next one, holding (GPU) memory.
    die_with_parent()
    torch.set_num_threads(max(1, threads))


def _call(fn: Callable[[Any], Any], payload: Any) -> str | None:
    """Run one job; return ``None`` or an error message (never raise across processes)."""
    try:
        fn(payload)
    except FusionkitError as exc:
        return str(exc)
    except Exception as exc:  # a bug or an unexpected library error: keep its type
        return f"{type(exc).__name__}: {exc}"
    return None


def run_jobs(
    jobs: Sequence[Job],
    fn: Callable[[Any], Any],
    *,
    workers: int = 1,
    description: str = "extract",
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, str]:
    """Run ``fn(job.payload)`` for every job and return ``{label: error}`` of the failures.

    With ``workers > 1`` the jobs run in that many ``spawn`` worker processes, each limited to
    ``cores // workers`` torch threads. ``fn`` must be a module-level function. A failing job
    does not stop the others. Ctrl-C stops the pass; finished cache files are kept.
    """
    failures: dict[str, str] = {}
    if not jobs:
        return failures
    shown = (console or Console(stderr=True)) if progress else None
    with TaskProgress(description, len(jobs), shown) as bar:
        if workers <= 1:
            for job in jobs:
                err = _call(fn, job.payload)
                if err is not None:
                    failures[job.label] = err
                bar.advance(job.label)
            return failures
        threads = max(1, available_cores() // workers)
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=get_context("spawn"),
            initializer=_worker_init,
            initargs=(threads,),
        ) as pool:
            pending: dict[Future[str | None], Job] = {}
            queue = list(jobs)
            try:
                while queue or pending:
                    while queue and len(pending) < 2 * workers:
                        job = queue.pop(0)
                        pending[pool.submit(_call, fn, job.payload)] = job
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        job = pending.pop(fut)
                        try:
                            err = fut.result()
                        except Exception as exc:  # the worker process died
                            err = f"worker failed: {type(exc).__name__}: {exc}"
                        if err is not None:
                            failures[job.label] = err
                        bar.advance(job.label)
            except KeyboardInterrupt:
                for fut in pending:
                    fut.cancel()
                raise
    return failures


def plan(
    folder: CacheFolder,
    items: Sequence[tuple[str, dict[str, str | Path], Any]],
) -> tuple[list[Job], ExtractReport]:
    """Split ``(item, sources, payload)`` triples into jobs to run and a report of the rest.

    Valid caches are skipped; missing ones are counted as ``computed`` and stale or corrupt
    ones as ``refreshed`` (with the reason), assuming their jobs succeed.
    """
    jobs: list[Job] = []
    report = ExtractReport(total=len(items), cache_dirs=[str(folder.path)])
    for item, sources, payload in items:
        st = folder.status(item, sources)
        if st.valid:
            report.skipped += 1
            continue
        if st.state == "missing":
            report.computed += 1
        else:
            report.refreshed[item] = f"{st.state}: {st.reason}"
        jobs.append(Job(item, payload))
    return jobs, report
