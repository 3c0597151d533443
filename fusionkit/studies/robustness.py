"""Evaluation sweeps over a perturbation axis on trained checkpoints (no retraining), and the
inference throughput of a run.

A sweep (:class:`fusionkit.core.recipe.RobustnessSpec`) evaluates a run's best weights
(``model.safetensors``) on perturbed copies of a split, once per value of one perturbation
param, and writes ``robustness/<name>.json`` in the run directory::

    {"name": "shift_audio", "perturbation": "shift", "params": {"modality": "audio"},
     "axis": "k", "seed": 0, "checkpoint_sha256": "...",
     "results": {"test": {"-30": {"value": -30, "params": {"modality": "audio", "k": -30},
                                  "metrics": {"ccc_valence": ..., ...}, "seconds": 0.4}, ...}}}

The file is rewritten atomically after every value, so an interrupted sweep resumes where it
stopped; values already computed for the same perturbation, params, seed and checkpoint are
skipped. A changed checkpoint or spec starts the file afresh.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fusionkit.core.errors import FusionkitError
from fusionkit.core.recipe import Recipe, RobustnessSpec
from fusionkit.core.registry import Registry
from fusionkit.engine.data import AbsentModalityWarning
from fusionkit.engine.evaluate import evaluate, predict
from fusionkit.engine.files import atomic_write_json, file_sha256, read_json
from fusionkit.engine.perturb import PerturbedDataset, build_perturbation, perturbation_revision
from fusionkit.engine.runs import BEST_FILE, RunDir
from fusionkit.engine.session import Session, data_as_evaluated, load_run, set_threads

__all__ = [
    "measure_throughput",
    "missing_by_sweep",
    "missing_values",
    "robustness_complete",
    "run_recipe_robustness",
    "run_sweep",
]

ROBUSTNESS_DIR = "robustness"
THROUGHPUT_FILE = "throughput.json"


def value_key(value: Any) -> str:
    """JSON key of an axis value (``-30`` -> ``"-30"``, ``0.5`` -> ``"0.5"``)."""
    return json.dumps(value)


def results_path(run_dir: Path, spec: RobustnessSpec) -> Path:
    return Path(run_dir) / ROBUSTNESS_DIR / f"{spec.label}.json"


def _header(
    spec: RobustnessSpec, checkpoint_sha: str, registry: Registry | None = None
) -> dict[str, Any]:
    header = {
        "name": spec.label,
        "perturbation": spec.perturbation,
        "params": spec.params,
        "axis": spec.axis,
        "seed": spec.seed,
        "checkpoint_sha256": checkpoint_sha,
    }
    revision = perturbation_revision(spec.perturbation, registry)
    if revision != 1:  # files of perturbations never revised keep their header
        header["revision"] = revision
    return header


def _stored(path: Path) -> dict[str, Any] | None:
    """The record in a results file, or None when there is none or it is damaged."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        return None
    return stored if isinstance(stored, dict) else None


def _load(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The stored results if they were made with the same header, else an empty record."""
    fresh = {**header, "results": {}}
    stored = _stored(path)
    if stored is None or any(stored.get(k) != v for k, v in header.items()):
        return fresh
    stored.setdefault("results", {})
    return stored


def missing_by_sweep(
    run_dir: Path, specs: Sequence[RobustnessSpec], registry: Registry | None = None
) -> list[list[tuple[str, Any]]]:
    """For each of ``specs``, the ``(split, value)`` pairs not yet computed for the run's
    checkpoint (with the installed revision of the perturbation); the checkpoint is hashed
    once for all of them."""
    ckpt = Path(run_dir) / BEST_FILE
    sha = file_sha256(ckpt) if specs and ckpt.is_file() else None
    out = []
    for spec in specs:
        done: dict[str, Any] = {}
        if sha is not None:
            done = _load(results_path(run_dir, spec), _header(spec, sha, registry))["results"]
        out.append(
            [
                (s, v)
                for s in spec.splits
                for v in spec.values
                if value_key(v) not in done.get(s, {})
            ]
        )
    return out


def missing_values(
    run_dir: Path, spec: RobustnessSpec, registry: Registry | None = None
) -> list[tuple[str, Any]]:
    """``(split, value)`` pairs of ``spec`` not yet computed (:func:`missing_by_sweep`)."""
    return missing_by_sweep(run_dir, [spec], registry)[0]


def robustness_complete(run_dir: Path, recipe: Recipe) -> bool:
    """Whether every robustness sweep of ``recipe`` has all its values in ``run_dir``."""
    return not any(missing_by_sweep(run_dir, recipe.evaluation.robustness))


def run_sweep(
    session: Session,
    run: RunDir,
    spec: RobustnessSpec,
    on_value: Callable[[str, Any, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the session's model (weights as loaded) under every value of ``spec``.

    Writes (and returns) the run's ``robustness/<name>.json``; values already there for the
    same checkpoint and spec are skipped.
    """
    path = results_path(run.path, spec)
    record = _load(path, _header(spec, file_sha256(run / BEST_FILE), session.registry))
    rc = session.recipe
    for split in spec.splits:
        done = record["results"].setdefault(split, {})
        if all(value_key(v) in done for v in spec.values):
            continue
        hashes = data_as_evaluated(run, session, split)
        made_on = [record.setdefault(key, {}) for key in ("features_sha256", "data_fingerprints")]
        if any(m.get(split) != h for m, h in zip(made_on, hashes, strict=True)):
            # values of other data, or of data a file from before these records cannot name:
            # computed again, since a curve holds values of one feature and label set only
            done.clear()
        for m, h in zip(made_on, hashes, strict=True):
            m[split] = h
        for j, value in enumerate(spec.values):
            key = value_key(value)
            if key in done:
                continue
            t0 = time.perf_counter()
            pert = build_perturbation(spec.point(j), session.registry)
            data = PerturbedDataset(session.dataset, [pert], splits=[split])
            with warnings.catch_warnings():  # removing a modality is the sweep's point
                warnings.simplefilter("ignore", AbsentModalityWarning)
                store = session.store(split, data)
            metrics, _ = evaluate(
                session.model, store, session.targets, rc.evaluation.batch_size, session.bf16
            )
            done[key] = {
                "value": value,
                "params": pert.record()["params"],
                "metrics": metrics,
                "seconds": time.perf_counter() - t0,
            }
            atomic_write_json(path, record)
            if on_value is not None:
                on_value(split, value, metrics)
    atomic_write_json(path, record)
    return record


def run_recipe_robustness(
    run: RunDir,
    specs: list[RobustnessSpec] | None = None,
    *,
    session: Session | None = None,
    registry: Registry | None = None,
    on_value: Callable[[str, Any, dict[str, Any]], None] | None = None,
    keep_others: bool = False,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Run ``specs`` (default: the run recipe's ``evaluation.robustness``) on a run's best
    weights, loading the run only if some value is missing. ``session``, when given, must hold
    the run's best weights already (the end of training). With ``keep_others`` (a sweep given
    on the command line), a stored sweep of the same name but another perturbation, params,
    axis or seed is refused rather than replaced. ``device``: where a run loaded here runs."""
    if specs is None:
        recipe = session.recipe if session else run.recipe(registry)
        specs = recipe.evaluation.robustness
    if keep_others:
        for spec in specs:
            _refuse_replacing(run.path, spec)
    todo = [s for s, miss in zip(specs, missing_by_sweep(run.path, specs, registry), strict=True)
            if miss]  # fmt: skip
    if todo and session is None:
        session = load_run(run, device=device, registry=registry).session
    records = []
    for spec in specs:
        if spec in todo:
            assert session is not None
            records.append(run_sweep(session, run, spec, on_value))
        else:
            records.append(read_json(results_path(run.path, spec), "robustness results"))
    run.record_robustness(list(specs), registry or (session.registry if session else None))
    return records


def _refuse_replacing(run_dir: Path, spec: RobustnessSpec) -> None:
    """Refuse a sweep whose results file holds another sweep of the same name."""
    path = results_path(run_dir, spec)
    stored = _stored(path)
    if stored is None:  # none, or damaged: nothing to keep
        return
    new = _header(spec, "")
    keys = ("perturbation", "params", "axis", "seed")
    differ = [k for k in keys if stored.get(k) != new[k]]
    if differ:
        held = ", ".join(f"{k}={json.dumps(stored.get(k), sort_keys=True)}" for k in differ)
        raise FusionkitError(
            f"{path} holds another sweep of the name {spec.label!r} ({held}); give this sweep "
            "its own --name, or delete that file to replace it"
        )


def read_throughput(path: Path, split: str) -> tuple[dict[str, Any] | None, str]:
    """The throughput record in ``path`` when it is whole and was measured on ``split``, else
    None and why not (no file, damaged, or measured on another split)."""
    if not path.is_file():
        return None, f"{path} does not exist"
    try:
        rec = read_json(path, "throughput record")
    except FusionkitError as exc:
        return None, f"{path} is damaged ({exc})"
    if not isinstance(rec, dict):
        return None, f"{path} is damaged (not a JSON object)"
    fps, threads, device = rec.get("frames_per_second"), rec.get("threads"), rec.get("device")
    whole = (
        isinstance(fps, int | float)
        and not isinstance(fps, bool)
        and math.isfinite(fps)
        and fps > 0
        and isinstance(threads, int)
        and not isinstance(threads, bool)
        and threads >= 1
        and isinstance(device, str)
        and bool(device)
    )
    if not whole:
        return None, (
            f"{path} is damaged (frames_per_second must be a positive number, threads a "
            "positive integer and device a name)"
        )
    if rec.get("split") != split:
        return None, f"{path} was measured on split {rec.get('split')!r}, not {split!r}"
    return rec, ""


def _cached_throughput(path: Path, split: str) -> dict[str, Any] | None:
    """The record in ``path`` if it was measured as :func:`measure_throughput` would measure
    now (same split, device and thread count), else None (missing, damaged or different)."""
    from fusionkit.engine.session import resolve_device

    rec, _ = read_throughput(path, split)
    if rec is None:
        return None  # measured again and rewritten
    device = resolve_device("auto")  # as load_run picks it
    threads = 1 if device.type == "cpu" else torch.get_num_threads()
    if rec["threads"] != threads or rec["device"].split(":")[0] != device.type:
        return None
    return rec


@torch.no_grad()
def measure_throughput(
    run_dir: Path,
    split: str = "test",
    min_seconds: float = 1.0,
    min_passes: int = 5,
    registry: Registry | None = None,
    refresh: bool = False,
) -> dict[str, Any]:
    """Inference speed of a run's model, measured now and cached in ``throughput.json``.

    The whole ``split`` is predicted as evaluation does (windows of ``data.window`` with hop
    ``data.hop``, ``evaluation.batch_size`` windows per batch, overlapping predictions
    averaged): one warm-up pass, then at least ``min_passes`` timed passes and at least
    ``min_seconds`` in all. The rate is taken from the **fastest** pass, the estimate least
    disturbed by other work on a shared machine. On CPU the model runs on one thread
    (multi-threaded kernels are erratic when other processes share the cores). Reported:
    frames of the split per second and windows per second, with the device, thread count
    and every pass time.

    The cache is used only when it was measured on the same split, device and thread count
    as asked for now; otherwise the speed is measured again and the cache replaced. The
    record names its ``split``.
    """
    from fusionkit.core.errors import DataError

    path = Path(run_dir) / THROUGHPUT_FILE
    if not refresh:
        cached = _cached_throughput(path, split)
        if cached is not None:
            return cached
    loaded = load_run(run_dir, registry=registry)
    session = loaded.session
    rc = session.recipe
    have = session.dataset.splits()
    if split not in have:
        raise DataError(
            f"cannot measure the throughput of {run_dir} on split {split!r}: its dataset has "
            f"{', '.join(map(repr, have))} (choose one with --split)"
        )
    store = session.store(split)
    bs = rc.evaluation.batch_size

    def once() -> None:
        predict(session.model, store, bs, session.bf16)
        if session.device.type == "cuda":
            torch.cuda.synchronize(session.device)

    saved_threads = torch.get_num_threads()
    if session.device.type == "cpu":
        set_threads(1)
    try:
        threads = torch.get_num_threads()
        once()  # warm-up
        times: list[float] = []
        while len(times) < min_passes or sum(times) < min_seconds:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved_threads)
    best = min(times)
    out = {
        "split": split,
        "frames_per_second": store.num_frames / best,
        "windows_per_second": store.num_windows / best,
        "frames": store.num_frames,
        "windows": store.num_windows,
        "passes": len(times),
        "pass_seconds": times,
        "estimator": "fastest pass",
        "batch_size": bs,
        "device": str(session.device),
        "threads": threads,
        "precision": "bf16" if session.bf16 else "fp32",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with RunDir.open(run_dir):  # the run's lock while writing into it
        atomic_write_json(path, out)
    return out
