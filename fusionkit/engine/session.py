"""A recipe made concrete: its dataset and model on a device, and the one way every command
reloads a trained run (:func:`load_run`).

:func:`check_recipe` builds the same things on the ``meta`` device without reading any data,
so that ``fusionkit recipe validate`` and ``fusionkit run`` (before it creates a run
directory) report every build-time error the same way.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusionkit.core.errors import (
    CheckpointError,
    DataError,
    FusionkitError,
    PluginError,
    RecipeError,
    ShapeError,
    one_line,
)
from fusionkit.core.interfaces import Dataset, FeatureIdentity, Video, ZScoreDefault
from fusionkit.core.overrides import apply_overrides, parse_overrides
from fusionkit.core.params import first_few, short_repr
from fusionkit.core.recipe import PerturbationSpec, Recipe, validate_recipe
from fusionkit.core.registry import Registry, get_registry
from fusionkit.engine.checkpoint import WeightsMismatch, load_weights
from fusionkit.engine.data import (
    FrameStore,
    Normalizer,
    check_video,
    features_sha256,
    labels_fingerprint,
)
from fusionkit.engine.files import load_tensors, save_tensors
from fusionkit.engine.model import FusionModel, build_model
from fusionkit.engine.perturb import AppliedPerturbation, PerturbedDataset, build_perturbation
from fusionkit.engine.runs import (
    BEST_FILE,
    MARKER_FILE,
    METRICS_FILE,
    NORMALIZATION_FILE,
    RunDir,
    RunMarker,
    check_unchanged,
    recorded_metrics,
    resume_command,
)

__all__ = [
    "DEVICE_CHOICES",
    "LoadedRun",
    "Session",
    "available_cores",
    "bf16_pays",
    "build_session",
    "check_recipe",
    "feature_identity",
    "load_run",
    "resolve_device",
    "set_run_threads",
    "set_threads",
]


def available_cores() -> int:
    """CPU cores this process may run on, not the machine's total: its affinity (taskset, a
    batch scheduler's CPU set), capped by a cgroup CPU quota (a container's ``--cpus``)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota is not None else cores)


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs a cgroup quota allows this process (rounded up), or None without a quota."""
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 means none
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, -(-quota_us // period_us)) if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def _omp_threads() -> int | None:
    """``OMP_NUM_THREADS`` when it is set to a positive number, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def set_threads(requested: int | None, share: int = 1) -> int:
    """Set torch's CPU threads: ``requested``, capped at the available cores, or (``None``)
    the available cores divided among ``share`` parallel workers, and no more than
    ``OMP_NUM_THREADS`` when that is set. Returns the number set.

    Two threads per core (oversubscription) can make CPU training many times slower, so a
    request above the available cores is capped, with a warning.
    """
    cores = available_cores()
    if requested is None:
        n = max(1, cores // max(1, share))
        env = _omp_threads()
        n = min(n, env) if env is not None else n
    elif requested > cores:
        warnings.warn(
            f"training.num_threads={requested} exceeds the {cores} cores available to this "
            f"process; using {cores}",
            stacklevel=2,
        )
        n = cores
    else:
        n = requested
        if share > 1 and n * share > cores:
            warnings.warn(
                f"training.num_threads={n} in each of the {share} processes on this machine is "
                f"{n * share} threads on {cores} cores, which can run many times slower; set "
                f"training.num_threads={max(1, cores // share)} or leave it unset",
                stacklevel=2,
            )
    torch.set_num_threads(n)
    return n


def set_run_threads(run: RunDir, asked: int | None) -> tuple[int, str]:
    """Set torch's CPU threads to re-run the forward passes of a trained ``run``: ``asked``
    (its ``training.num_threads``) when set, else the count its metrics were computed with
    (``cpu_threads`` in ``metrics.json``, capped at the available cores with a warning), else
    the available cores. Another count changes the order of float sums, so the last digits.
    Returns the number set and where it came from, for messages."""
    if asked:
        return set_threads(asked), f"(training.num_threads={asked})"
    recorded = recorded_metrics(run.path).get("cpu_threads")
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded < 1:
        return set_threads(None), "(the available cores)"
    cores = available_cores()
    if recorded > cores:
        warnings.warn(
            f"{run.path} was evaluated with {recorded} CPU threads and this process has "
            f"{cores} cores: the last digits of its metrics may differ",
            stacklevel=2,
        )
        return set_threads(None), f"({recorded} recorded, capped at {cores})"
    return set_threads(recorded), "(as the run was evaluated)"


def evaluated_device(run: RunDir) -> str:
    """The ``--device`` that re-runs ``run`` as its metrics were computed: ``cpu`` for a run
    evaluated on the CPU (also on a machine with CUDA, whose sums differ), ``cuda`` for one
    evaluated on CUDA when this machine has it, else ``auto``."""
    recorded = str(recorded_metrics(run.path).get("device", "")).split(":")[0]
    if recorded == "cpu" or (recorded == "cuda" and torch.cuda.is_available()):
        return recorded
    return "auto"


#: What ``--device`` and ``training.device`` accept (``cuda:N``: CUDA device ``N``).
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(
    spec: str, what: str = "training.device", source: str = "<recipe>"
) -> torch.device:
    """The device ``spec`` names: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.

    Args:
        what: where ``spec`` comes from, named in the error: a recipe key (the error is a
            :class:`RecipeError` of ``source``) or a command-line option such as ``--device``
            (starts with ``-``; the error is a :class:`FusionkitError` naming the option).

    Raises:
        FusionkitError: an unknown device, or a CUDA device this machine does not have.
    """
    option = what.startswith("-")

    def fail(problem: str, fix: str) -> FusionkitError:
        if option:
            return FusionkitError(f"{what} {spec}: {problem}; {fix}")
        return RecipeError([f"{what}: {spec!r}: {problem}; {fix}"], source)

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d{1,4}))?", spec)
    if m is None:
        raise fail("unknown device", f"use {DEVICE_CHOICES} (e.g. cuda:0)")
    cpu_fix = f"use {what} cpu" if option else f"set {what} to cpu or auto"
    if not torch.cuda.is_available():
        raise fail("no CUDA device is available on this machine", cpu_fix)
    if m.group(1) is not None:
        n = torch.cuda.device_count()
        if int(m.group(1)) >= n:
            have = ", ".join(f"cuda:{i}" for i in range(n))
            raise fail(
                f"this machine has {n} CUDA device(s) ({have})",
                f"use one of them, or {cpu_fix.removeprefix('use ')}",
            )
    return torch.device(spec)


def check_cuda_graphs(recipe: Recipe, device: torch.device, world_size: int = 1) -> None:
    """Refuse ``training.cuda_graphs`` where training cannot replay graphs: off CUDA, or in a
    job of several processes (each step's gradient all-reduce is not captured)."""
    if not recipe.training.cuda_graphs:
        return
    if device.type != "cuda":
        raise RecipeError(
            [
                f"training.cuda_graphs: true needs a CUDA device, and this run trains on "
                f"{device.type}; set training.cuda_graphs to false (or train on a GPU)"
            ],
            recipe.source,
        )
    if world_size > 1:
        raise RecipeError(
            [
                f"training.cuda_graphs: true trains in one process, and this job has "
                f"{world_size}; set training.cuda_graphs to false for torchrun jobs"
            ],
            recipe.source,
        )


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def bf16_pays(device: torch.device) -> bool:
    """Whether bf16 autocast can be expected to train faster than float32 here: on the CPU only
    with AMX tiles. On a CPU with AVX512-BF16 but no AMX, bf16 matrix products measured at about
    half the speed of float32 ones, and the released TAGF step 1.4x slower than in float32
    (docs/benchmarks.md); without AVX512-BF16 PyTorch emulates them. True on other devices and
    when the check is unavailable."""
    if device.type != "cpu":
        return True
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is None:
        return True
    try:
        return bool(probe())
    except RuntimeError:
        return True


def _target_columns(recipe: Recipe, dataset: Dataset) -> list[int]:
    missing = [t for t in recipe.model.targets if t not in dataset.targets]
    if missing:
        raise RecipeError(
            [
                f"model.targets: {missing[0]!r} is not a label of dataset {recipe.data.name!r} "
                f"(labels: {', '.join(dataset.targets)})"
            ],
            recipe.source,
        )
    return [dataset.targets.index(t) for t in recipe.model.targets]


def _check_splits(recipe: Recipe, dataset: Dataset) -> None:
    have = tuple(dataset.splits())
    wanted = [
        ("data.train_split", recipe.data.train_split),
        ("data.val_split", recipe.data.val_split),
    ]
    wanted += [(f"evaluation.splits.{i}", s) for i, s in enumerate(recipe.evaluation.splits)]
    for i, r in enumerate(recipe.evaluation.robustness):
        wanted += [(f"evaluation.robustness.{i}.splits", s) for s in r.splits]
    problems = [
        f"{path}: dataset {recipe.data.name!r} has no split {split!r} (splits: {', '.join(have)})"
        for path, split in wanted
        if split not in have
    ]
    if problems:
        raise RecipeError(problems, recipe.source)


#: The last dataset built in this process, by (registry, name, params): grid points that share
#: their data (seeds, models) reuse it instead of reading or generating it again. Datasets
#: hand out their videos read-only (perturbations work on copies).
_last_dataset: dict[tuple[int, str, str], Dataset] = {}


def build_dataset(recipe: Recipe, registry: Registry) -> Dataset:
    """The recipe's dataset (clean: without training perturbations)."""
    key = (id(registry), recipe.data.name, recipe.data.params.model_dump_json())
    if key in _last_dataset:
        return _last_dataset[key]
    try:
        dataset = registry.build("dataset", recipe.data.name, recipe.data.params, where="data")
    except RecipeError as exc:
        raise RecipeError(exc.problems, recipe.source) from None
    _last_dataset.clear()
    _last_dataset[key] = dataset
    return dataset


@dataclass
class Session:
    """Dataset and model of one recipe on one device.

    Attributes:
        dataset: the clean dataset (evaluation, predictions, robustness sweeps use it).
        train_dataset: the dataset training reads (``training.perturbations`` applied to the
            training split), or ``dataset`` itself.
        model: the built model, on ``device``.
        bf16: whether forward passes run under bf16 autocast.
    """

    recipe: Recipe
    dataset: Dataset
    train_dataset: Dataset
    model: FusionModel
    device: torch.device
    bf16: bool
    registry: Registry
    target_columns: list[int] = field(default_factory=list)
    normalizer: Normalizer | None = None
    #: split -> (features_sha256, labels_fingerprint) of the split, computed once per session
    _hashes: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    #: split -> the names of its videos, for every split read in this session
    _names: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)

    def data_hashes(self, split: str) -> tuple[str, str]:
        """``(features_sha256, labels_fingerprint)`` of ``split`` of the clean dataset
        (:mod:`fusionkit.engine.data`), hashed once per session: the end of training records
        them, eval and each robustness sweep compare them with the record."""
        if split not in self._hashes:
            self.check_split(split, self.dataset)
            videos = self.dataset.videos(split)
            modalities = sorted(self.recipe.model.encoders)
            self._hashes[split] = (
                features_sha256(videos, modalities),
                labels_fingerprint(videos, self.target_columns),
            )
        return self._hashes[split]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.recipe.model.targets)

    @property
    def zscore(self) -> bool:
        """Whether features are z-scored (``data.normalize``, or the dataset's default)."""
        mode = self.recipe.data.normalize
        if mode == "auto":
            return (
                self.dataset.zscore_by_default if isinstance(self.dataset, ZScoreDefault) else True
            )
        return mode == "zscore"

    def fit_normalizer(self) -> Normalizer | None:
        """Fit the z-scoring statistics on the training split (as training reads it)."""
        if self.zscore:
            split = self.recipe.data.train_split
            videos = self.train_dataset.videos(split)
            modalities = sorted(self.recipe.model.encoders)
            where = f"dataset {self.recipe.data.name!r} split {split!r}"
            for v in videos:  # what the statistics read must be whole
                check_video(v, modalities, self.target_columns, where, self.dataset.feature_dims)
            self.normalizer = Normalizer.fit(videos, modalities)
        return self.normalizer

    def save_normalizer(self, run: RunDir) -> None:
        if self.normalizer is not None:
            save_tensors(
                run / NORMALIZATION_FILE, self.normalizer.tensors(), self.normalizer.metadata()
            )

    def load_normalizer(self, run: RunDir) -> None:
        """The statistics a run was trained with; an error when the run should have them."""
        path = run / NORMALIZATION_FILE
        if not self.zscore:
            self.normalizer = None
            return
        if not path.exists():
            raise CheckpointError(
                f"{run} z-scores its features but has no {NORMALIZATION_FILE}; the run's files "
                "are incomplete: start a new run"
            )
        self.normalizer = Normalizer.from_tensors(*load_tensors(path))

    def check_split(self, split: str, data: Dataset) -> None:
        """Refuse a split ``data`` does not have. The splits a recipe names are checked when
        the session is built, so an unknown one was asked for with ``--split`` (or is the
        option's default, ``test`` for robustness sweeps)."""
        if split not in data.splits():
            raise FusionkitError(
                f"split {split!r}: dataset {self.recipe.data.name!r} has no such split "
                f"(splits: {', '.join(data.splits())}); choose one with --split"
            )

    def store(self, split: str, dataset: Dataset | None = None) -> FrameStore:
        """The windows of ``split`` (of ``dataset``, default: the clean one) on the device."""
        data = dataset if dataset is not None else self.dataset
        self.check_split(split, data)
        videos = data.videos(split)
        self._check_disjoint(split, frozenset(v.name for v in videos))
        return FrameStore(
            videos,
            sorted(self.recipe.model.encoders),
            self.target_columns,
            self.recipe.data.window,
            self.recipe.data.hop,
            self.device,
            where=f"dataset {self.recipe.data.name!r} split {split!r}",
            normalizer=self.normalizer,
            dims=data.feature_dims,
        )

    def _check_disjoint(self, split: str, names: frozenset[str]) -> None:
        """Refuse a split that shares videos with another split read in this session (a
        dataset handing back its validation videos as ``test`` would report validation
        scores as test scores, or training ones)."""
        for other, seen in self._names.items():
            shared = sorted(names & seen)
            if other != split and shared:
                raise DataError(
                    f"dataset {self.recipe.data.name!r}: splits {other!r} and {split!r} hold "
                    f"the same videos ({first_few(shared, 3)}; {len(shared)} of {len(names)}), "
                    "so the scores of one would be reported as the other's: fix the dataset's "
                    "splits (data.params), or leave the split out of evaluation.splits"
                )
        self._names[split] = names


#: frames of the zero video every perturbation of a recipe is tried on before a run starts
PROBE_FRAMES = 300


def _probe_video(recipe: Recipe, dataset: Dataset) -> Video:
    """A video of zeros with the dataset's modalities and feature sizes (no data is read)."""
    n, targets = PROBE_FRAMES, len(tuple(dataset.targets))
    return Video(
        name=f"any video of {recipe.data.name}",
        features={m: torch.zeros(n, d) for m, d in dataset.feature_dims.items()},
        labels=torch.zeros(n, targets),
        label_mask=torch.ones(n, dtype=torch.bool),
    )


def _checked_perturbation(
    spec: PerturbationSpec, registry: Registry, where: str, recipe: Recipe, probe: Video
) -> AppliedPerturbation:
    """Build a perturbation and try it on ``probe``, so that what it refuses for every video
    of the dataset (a modality the dataset lacks, a wrong feature size) is a recipe error
    naming the file and key, before any data is read or run folder is made. Only fusionkit
    errors count: other exceptions on a zero video are left to the real data."""
    try:
        fn = build_perturbation(spec, registry, where=where)
    except RecipeError as exc:
        raise RecipeError(exc.problems, recipe.source) from None
    try:
        fn(probe)
    except FusionkitError as exc:
        raise RecipeError([f"{where}: {exc}"], recipe.source) from None
    except Exception:  # a probe of zeros: the real videos decide
        pass
    return fn


def _assemble(
    recipe: Recipe,
    registry: Registry,
    device: torch.device,
    dataset: Dataset | None = None,
    seed: int | None = None,
) -> tuple[Dataset, Dataset, FusionModel, list[int]]:
    dataset = dataset if dataset is not None else build_dataset(recipe, registry)
    _check_splits(recipe, dataset)
    cols = _target_columns(recipe, dataset)
    train_data: Dataset = dataset
    probe = _probe_video(recipe, dataset)
    if recipe.training.perturbations:  # training-time perturbations: the train split only
        perts = [
            _checked_perturbation(p, registry, f"training.perturbations.{i}", recipe, probe)
            for i, p in enumerate(recipe.training.perturbations)
        ]
        train_data = PerturbedDataset(dataset, perts, [recipe.data.train_split])
    for i, r in enumerate(recipe.evaluation.robustness):
        for j, value in enumerate(r.values):
            where = f"evaluation.robustness.{i} ({r.label}, {r.axis}={value})"
            _checked_perturbation(r.point(j), registry, where, recipe, probe)
    if seed is not None:
        torch.manual_seed(seed)  # the initial weights depend on the training seed only
    with torch.device(device):
        model = build_model(recipe, dict(dataset.feature_dims), registry)
    return dataset, train_data, model, cols


def check_recipe(recipe: Recipe, registry: Registry | None = None) -> FusionModel:
    """Raise every error that building ``recipe`` would raise, without reading any data or
    allocating weights: the device is resolved, the dataset is constructed, the model is
    built on the meta device (and returned: its structure and parameter count are known, its
    weights are not)."""
    registry = registry or get_registry()
    check_cuda_graphs(recipe, resolve_device(recipe.training.device, source=recipe.source))
    dataset, _, model, _ = _assemble(recipe, registry, torch.device("meta"))
    _check_shapes(recipe, model, dict(dataset.feature_dims))
    return model


def _check_shapes(recipe: Recipe, model: FusionModel, feature_dims: dict[str, int]) -> None:
    """One forward pass on the meta device (shapes only, no data, no memory): a component
    whose output breaks its declared sizes is refused before a run starts. A component that
    cannot run on the meta device (it reads tensor values) is checked at the first step."""
    t = recipe.data.window
    inputs = {m: torch.empty(2, t, feature_dims[m], device="meta") for m in model.modalities}
    mask = torch.ones(2, t, dtype=torch.bool, device="meta")
    try:
        with torch.no_grad():
            model.eval()(inputs, mask)
    except ShapeError as exc:
        raise RecipeError([str(exc)], recipe.source) from None
    except Exception:
        return


def build_session(
    recipe: Recipe,
    registry: Registry | None = None,
    *,
    device: torch.device | None = None,
    dataset: Dataset | None = None,
) -> Session:
    """Build dataset and model of ``recipe`` (weights seeded by ``training.seed``)."""
    registry = registry or get_registry()
    tr = recipe.training
    device = device or resolve_device(tr.device, source=recipe.source)
    dataset, train_data, model, cols = _assemble(
        recipe, registry, torch.device("cpu"), dataset, seed=tr.seed
    )
    model.to(device)
    return Session(
        recipe=recipe,
        dataset=dataset,
        train_dataset=train_data,
        model=model,
        device=device,
        bf16=use_bf16(tr.precision, device),
        registry=registry,
        target_columns=cols,
    )


@dataclass
class LoadedRun:
    """A trained run: its directory and its session with the best weights loaded (eval mode)."""

    run_dir: RunDir
    session: Session


#: what the model was trained to see: ``--data`` changes which data is read, never these
_HOW_THE_MODEL_SEES = ("normalize", "window", "hop")


def _with_data_overrides(recipe: Recipe, overrides: list[str], registry: Registry) -> Recipe:
    items = [o if o.startswith("data.") else f"data.params.{o}" for o in overrides]
    source = f"{recipe.source} + --data"
    parsed = parse_overrides(items, "--data")
    raw = apply_overrides(recipe.model_dump(mode="json"), parsed, source=source)
    new = validate_recipe(raw, source, registry)
    changed = [k for k in _HOW_THE_MODEL_SEES if getattr(new.data, k) != getattr(recipe.data, k)]
    if changed:
        raise RecipeError(
            [
                f"data.{k}: the run was trained with {getattr(recipe.data, k)!r}; --data changes "
                "which data is read, not how the model sees it (its windows and z-scoring): "
                f"leave data.{k} out of --data"
                for k in changed
            ],
            source,
        )
    return new


def _used_precision(run: RunDir) -> str | None:
    """``"bf16"`` or ``"fp32"``: what ``metrics.json`` says the run's forward passes used
    (None when it does not say)."""
    used = recorded_metrics(run.path).get("precision")
    return used if used in ("bf16", "fp32") else None


def _require_complete(run: RunDir) -> RunMarker:
    """The marker of ``run`` if it finished; else an error saying how to finish it."""
    marker = run.marker()
    if marker.status == "complete":
        return marker
    try:
        holder = run.holder()
    except OSError:
        holder = None
    if holder is not None:
        raise CheckpointError(
            f"{run} is still training (in use by {holder}); its weights are not final: wait "
            "for it to finish, then try again"
        )
    raise CheckpointError(
        f"{run} did not finish (it was interrupted or failed: run.json says "
        f"{marker.status!r}), so its weights are not final; finish it with "
        f"`{resume_command(run.path)}`, then try again"
    )


def _check_components(run: RunDir, marker: RunMarker, registry: Registry) -> None:
    """Compare the plugins ``run.json`` says built the run with those installed: a component
    no installed plugin provides is refused naming the distribution to install; another
    version of one is warned about (its numbers may differ: ``fusionkit eval`` compares)."""
    missing = run.uninstalled_component(registry, marker)
    if missing is not None:
        raise CheckpointError(missing)
    changed = run.changed_versions(registry, marker)
    if changed:
        warnings.warn(
            f"{run} was built with other plugin versions: {'; '.join(changed)}; its numbers may "
            "differ from the run's (fusionkit eval compares them exactly)",
            stacklevel=3,
        )


def _check_unchanged(run: RunDir, marker: RunMarker, name: str, required: bool) -> None:
    """Refuse ``name`` if it differs from the SHA-256 ``run.json`` recorded at completion
    (or, when ``required``, if ``run.json`` records none)."""
    if required and name not in marker.files:
        raise CheckpointError(
            f"{run / MARKER_FILE} records no SHA-256 of {name} although the run is "
            "complete; run.json was edited or damaged, so the weights cannot be trusted: "
            "train a new run"
        )
    check_unchanged(run.path, marker.files, name)


def data_as_evaluated(
    run: RunDir, session: Session, split: str, metrics: dict[str, Any] | None = None
) -> tuple[str, str]:
    """``(features_sha256, labels_fingerprint)`` of ``split`` as the session's dataset
    delivers it now, checked against the run's ``metrics`` (default: read from the run).

    Raises:
        DataError: ``metrics.json`` records other features (extracted anew or changed on
            disk) or other labels (annotations changed, videos added or cut) for ``split``
            than the run was evaluated on: numbers computed from them would not belong with
            the run's metrics. What a run does not record is not checked.
    """
    now = session.data_hashes(split)
    metrics = recorded_metrics(run.path) if metrics is None else metrics
    checks = (
        ("features", "features_sha256", "extracted anew or changed on disk"),
        ("labels", "data_fingerprints", "annotations changed, or videos added or cut"),
    )
    for (what, key, how), digest in zip(checks, now, strict=True):
        recorded = metrics.get(key)
        was = recorded.get(split) if isinstance(recorded, dict) else None
        if isinstance(was, str) and was != digest:
            raise DataError(
                f"{run}: the {split} {what} are not those the run was evaluated on "
                f"({METRICS_FILE} records {key} {was[:12]}..., they give {digest[:12]}... now: "
                f"{how}), so numbers computed from them would not belong with the run's "
                f"metrics; restore the {what} it was evaluated on, or train a new run on these"
            )
    return now


def feature_identity(dataset: object) -> dict[str, str] | None:
    """The dataset's :class:`~fusionkit.core.interfaces.FeatureIdentity` (None when it has
    none), checked to be ``{modality: text}``.

    Raises:
        PluginError: ``feature_identity()`` failed or returned something else (a bug in the
            dataset plugin), in one line.
    """
    if not isinstance(dataset, FeatureIdentity):
        return None
    try:
        identity = dataset.feature_identity()
    except FusionkitError:
        raise
    except Exception as exc:
        raise PluginError(
            f"dataset {type(dataset).__name__}.feature_identity() raised "
            f"{type(exc).__name__}: {one_line(exc)} (a bug in the dataset plugin, or a file "
            "it reads is missing)"
        ) from None
    if not isinstance(identity, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in identity.items()
    ):
        raise PluginError(
            f"dataset {type(dataset).__name__}.feature_identity() must return "
            f"{{modality: text}}; got {short_repr(identity)}"
        )
    return identity


def _check_feature_identity(run: RunDir, dataset: object) -> None:
    """Refuse data whose :class:`~fusionkit.core.interfaces.FeatureIdentity` differs from the
    one the run recorded when it finished (what it does not record is not checked)."""
    recorded = recorded_metrics(run.path).get("feature_identity")
    if not isinstance(recorded, dict):
        return
    now = feature_identity(dataset)
    if now is None:
        return
    changed = sorted(m for m, was in recorded.items() if now.get(m) != was)
    if changed:
        m = changed[0]
        gives = f"gives {now[m]} now" if m in now else "no longer names where they come from"
        raise DataError(
            f"{run}: its {m} features came from {recorded[m]}, and the data {gives} (the "
            "extractor's settings or its weights file changed since training), so the run's "
            "model would read features it was not trained on; restore what it was trained "
            "with (e.g. the weights file), or train a new run on these features"
        )


def load_run(
    run_dir: str | Path | RunDir,
    *,
    device: str = "auto",
    data_overrides: list[str] | None = None,
    registry: Registry | None = None,
) -> LoadedRun:
    """Rebuild a run's model from its ``recipe.yaml`` and load its best weights: the one way
    ``eval``, ``predict``, ``stream``, robustness sweeps and reports reload a run.

    Only a complete run is loaded, and only with the files it completed with: the weights
    (and z-scoring statistics) are checked against the SHA-256 recorded in ``run.json``.

    Args:
        device: the ``--device`` value: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or
            ``cuda:N``.
        data_overrides: ``key=value`` items; a key without a ``data.`` prefix is a dataset
            param (``root=/data/aw2`` is ``data.params.root=/data/aw2``).

    Raises:
        CheckpointError: the run did not finish, a file it loads is missing or changed, or
            its ``recipe.yaml`` no longer trains what ``run.json`` recorded.
    """
    registry = registry or get_registry()
    torch_device = resolve_device(device, what="--device")
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    marker = _require_complete(run)
    _check_components(run, marker, registry)
    recipe = run.checked_recipe(registry)
    if data_overrides:
        recipe = _with_data_overrides(recipe, data_overrides, registry)
    weights = run / BEST_FILE
    if not weights.exists():
        raise CheckpointError(
            f"{run} has no {BEST_FILE} although run.json says it is complete; the run's files "
            "were removed: restore them or train a new run"
        )
    session = build_session(recipe, registry, device=torch_device)
    # the precision the run was evaluated in (`precision: auto` is bf16 on CUDA only: a run
    # trained on a CPU is predicted in fp32 on a GPU too), so that its numbers reproduce
    used = _used_precision(run)
    if used is not None:
        session.bf16 = used == "bf16"
    session.load_normalizer(run)
    try:
        load_weights(weights, session.model)
    except WeightsMismatch as exc:
        if not data_overrides:
            raise
        _check_unchanged(run, marker, BEST_FILE, required=True)  # the run's own weights
        widths = ", ".join(f"{m} {d}" for m, d in sorted(session.dataset.feature_dims.items()))
        raise DataError(
            f"the data given with --data ({' '.join(data_overrides)}) has features of "
            f"widths {widths}, which the run's model does not take ({exc}); give features of "
            "the widths the run was trained on"
        ) from None
    # after loading: a damaged file is named by what is wrong in it, a readable one that is
    # not the run's by its hash
    _check_unchanged(run, marker, BEST_FILE, required=True)
    _check_unchanged(run, marker, NORMALIZATION_FILE, required=False)
    _check_feature_identity(run, session.dataset)
    session.model.eval()
    return LoadedRun(run, session)
