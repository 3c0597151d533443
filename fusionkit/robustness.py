"""Evaluation sweeps over a perturbation axis on trained checkpoints (no retraining), and the
inference throughput of a run.

A sweep (:class:`fusionkit.recipe.RobustnessSpec`) evaluates a run's best weights
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

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fusionkit.checkpoint import atomic_write_json
from fusionkit.errors import CheckpointError, FusionkitError
from fusionkit.evaluate import evaluate, predict
from fusionkit.perturb import PerturbedDataset, build_perturbation
from fusionkit.recipe import Recipe, RobustnessSpec
from fusionkit.registry import Registry, get_registry

if TYPE_CHECKING:
    from fusionkit.train import Trainer

__all__ = [
    "load_trained",
    "measure_throughput",
    "read_robustness",
    "resolve_spec",
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


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _header(spec: RobustnessSpec, checkpoint_sha: str) -> dict[str, Any]:
    return {
        "name": spec.label,
        "perturbation": spec.perturbation,
        "params": spec.params,
        "axis": spec.axis,
        "seed": spec.seed,
        "checkpoint_sha256": checkpoint_sha,
    }


def resolve_spec(spec: RobustnessSpec, registry: Registry | None = None) -> RobustnessSpec:
    """Validate a sweep built outside a recipe (e.g. on the command line)."""
    from fusionkit.recipe import _check_robustness

    problems: list[str] = []
    out = _check_robustness(registry or get_registry(), spec, "sweep", problems)
    if problems:
        raise FusionkitError("invalid robustness sweep: " + "; ".join(problems))
    return out


def _checkpoint(run_dir: Path) -> Path:
    from fusionkit.train import BEST_FILE

    return Path(run_dir) / BEST_FILE


def _load(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    """The stored results if they were made with the same header, else an empty record."""
    fresh = {**header, "results": {}}
    if not path.is_file():
        return fresh
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return fresh
    if any(stored.get(k) != v for k, v in header.items()):
        return fresh
    stored.setdefault("results", {})
    return stored


def missing_values(run_dir: Path, spec: RobustnessSpec) -> list[tuple[str, Any]]:
    """``(split, value)`` pairs of ``spec`` not yet computed for the run's checkpoint."""
    ckpt = _checkpoint(run_dir)
    if not ckpt.is_file():
        return [(s, v) for s in spec.splits for v in spec.values]
    stored = _load(results_path(run_dir, spec), _header(spec, file_sha256(ckpt)))
    return [
        (s, v)
        for s in spec.splits
        for v in spec.values
        if value_key(v) not in stored["results"].get(s, {})
    ]


def robustness_complete(run_dir: Path, recipe: Recipe) -> bool:
    """Whether every robustness sweep of ``recipe`` has all its values in ``run_dir``."""
    return not any(missing_values(run_dir, spec) for spec in recipe.evaluation.robustness)


def run_sweep(
    trainer: Trainer,
    spec: RobustnessSpec,
    on_value: Callable[[str, Any, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``trainer.model`` (weights as loaded) under every value of ``spec``.

    Writes (and returns) the run's ``robustness/<name>.json``; values already there for the
    same checkpoint and spec are skipped.
    """
    from fusionkit.train import make_store

    run_dir = trainer.run_dir
    path = results_path(run_dir, spec)
    record = _load(path, _header(spec, file_sha256(_checkpoint(run_dir))))
    base = trainer.dataset
    base = base.base if isinstance(base, PerturbedDataset) else base  # clean data
    rc = trainer.recipe
    for split in spec.splits:
        done = record["results"].setdefault(split, {})
        for value in spec.values:
            key = value_key(value)
            if key in done:
                continue
            t0 = time.perf_counter()
            pert = build_perturbation(
                spec.perturbation,
                {**spec.params, spec.axis: value},
                spec.seed,
                trainer.registry,
            )
            data = PerturbedDataset(base, [pert], splits=[split])
            store = make_store(rc, data, split, trainer.device)
            metrics, _ = evaluate(
                trainer.model, store, trainer.targets, rc.evaluation.batch_size, trainer.bf16
            )
            done[key] = {
                "value": value,
                "params": pert.params,
                "metrics": metrics,
                "seconds": time.perf_counter() - t0,
            }
            atomic_write_json(path, record)
            if on_value is not None:
                on_value(split, value, metrics)
    atomic_write_json(path, record)
    return record


def load_trained(run_dir: Path, registry: Registry | None = None) -> Trainer:
    """Rebuild a finished run's model from its ``recipe.yaml`` and load its best weights."""
    from fusionkit.checkpoint import load_weights
    from fusionkit.runs import load_run_recipe
    from fusionkit.train import Trainer

    rc = load_run_recipe(run_dir, registry)
    ckpt = _checkpoint(run_dir)
    if not ckpt.is_file():
        raise CheckpointError(f"{run_dir} has no {ckpt.name}: train it first (fusionkit run)")
    trainer = Trainer(rc, Path(run_dir), console=None, registry=registry)
    load_weights(ckpt, trainer.model)
    return trainer


def run_recipe_robustness(
    run_dir: Path,
    specs: list[RobustnessSpec] | None = None,
    registry: Registry | None = None,
    trainer: Trainer | None = None,
    on_value: Callable[[str, Any, dict[str, float]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``specs`` (default: the run recipe's ``evaluation.robustness``) on a run's
    checkpoint, loading it only if some value is missing."""
    from fusionkit.runs import load_run_recipe

    if specs is None:
        specs = (
            trainer.recipe if trainer else load_run_recipe(run_dir, registry)
        ).evaluation.robustness
    todo = [s for s in specs if missing_values(run_dir, s)]
    if todo and trainer is None:
        trainer = load_trained(run_dir, registry)
    records = []
    for spec in specs:
        if spec in todo:
            assert trainer is not None
            records.append(run_sweep(trainer, spec, on_value))
        else:
            records.append(json.loads(results_path(run_dir, spec).read_text()))
    return records


def read_robustness(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``robustness/*.json`` record of a run (sorted by name)."""
    folder = Path(run_dir) / ROBUSTNESS_DIR
    if not folder.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


@torch.no_grad()
def measure_throughput(
    run_dir: Path,
    split: str = "test",
    min_seconds: float = 1.0,
    min_passes: int = 5,
    registry: Registry | None = None,
    refresh: bool = False,
    cpu_threads: int | None = 1,
) -> dict[str, Any]:
    """Inference speed of a run's model, measured now and cached in ``throughput.json``.

    The whole ``split`` is predicted as evaluation does (windows of ``data.window`` with hop
    ``data.hop``, ``evaluation.batch_size`` windows per batch, overlapping predictions
    averaged): one warm-up pass, then at least ``min_passes`` timed passes and at least
    ``min_seconds`` in all. The rate is taken from the **fastest** pass, the estimate least
    disturbed by other work on a shared machine. On CPU the model runs on ``cpu_threads``
    threads (default 1: multi-threaded kernels are erratic when other processes share the
    cores; ``None`` keeps torch's setting). Reported: frames of the split per second and
    windows per second, with the device, thread count and every pass time.
    """
    from fusionkit.train import make_store

    path = Path(run_dir) / THROUGHPUT_FILE
    if path.is_file() and not refresh:
        return json.loads(path.read_text())
    trainer = load_trained(run_dir, registry)
    rc = trainer.recipe
    if split not in rc.evaluation.splits and split not in trainer.dataset.splits():
        split = rc.evaluation.splits[0]
    store = make_store(rc, trainer.dataset, split, trainer.device)
    bs = rc.evaluation.batch_size

    def once() -> None:
        predict(trainer.model, store, bs, trainer.bf16)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)

    saved_threads = torch.get_num_threads()
    if trainer.device.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
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
        "device": str(trainer.device),
        "threads": threads,
        "precision": "bf16" if trainer.bf16 else "fp32",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(path, out)
    return out
