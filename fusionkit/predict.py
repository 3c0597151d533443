"""Per-frame predictions of trained runs written as one submission file.

``fusionkit predict RUN_DIR [RUN_DIR ...] --out FILE`` rebuilds each run's model from its
``recipe.yaml`` (data params optionally overridden, e.g. the dataset root or a test list),
loads ``model.safetensors``, predicts every frame of a split with the run's own windows
(:func:`fusionkit.evaluate.predict`) and writes::

    image_location,valence,arousal
    <row name>,<v>,<a>

with one line per row the dataset lists (:class:`~fusionkit.interfaces.SubmissionFrames`).
A row whose frame lies past a video's last frame gets that video's last prediction;
frames the list omits are not written. Targets come from the runs together: one model per
dimension is common, so a valence run and an arousal run fill one file. The columns follow the
dataset's target order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.checkpoint import atomic_write_text, load_weights
from fusionkit.errors import CheckpointError, DataError
from fusionkit.evaluate import predict as predict_frames
from fusionkit.interfaces import SubmissionFrames
from fusionkit.recipe import apply_overrides, validate_recipe
from fusionkit.registry import Registry, get_registry
from fusionkit.runs import load_run_recipe

__all__ = ["RunPredictions", "predict_run", "submission_rows", "write_submission"]


@dataclass
class RunPredictions:
    """One run's predictions of a split.

    Attributes:
        run_dir: the run.
        targets: the targets it predicts, e.g. ``("valence",)``.
        dataset_targets: every label column of its dataset, in order.
        per_video: video -> ``(frame_ids (N,), pred (N, len(targets)))``.
        rows: video -> ``(row name, frame index)`` list of the official file.
    """

    run_dir: Path
    targets: tuple[str, ...]
    dataset_targets: tuple[str, ...]
    per_video: dict[str, tuple[Tensor, Tensor]]
    rows: dict[str, list[tuple[str, int]]]


def _with_data_overrides(recipe_raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    items = [o if o.startswith("data.") else f"data.params.{o}" for o in overrides]
    return apply_overrides(recipe_raw, items)


def predict_run(
    run_dir: Path,
    split: str,
    data_overrides: list[str] | None = None,
    registry: Registry | None = None,
    device: str = "auto",
) -> RunPredictions:
    """Predict every frame of ``split`` with the best weights of ``run_dir``.

    Args:
        data_overrides: ``key=value`` items; a key without a ``data.`` prefix is a dataset
            param (``root=/data/aw2`` is ``data.params.root=/data/aw2``).
    """
    from fusionkit.model import build_model
    from fusionkit.train import BEST_FILE, build_dataset, make_store

    registry = registry or get_registry()
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir, registry)
    if data_overrides:
        raw = _with_data_overrides(recipe.model_dump(mode="json"), data_overrides)
        recipe = validate_recipe(raw, f"{run_dir / 'recipe.yaml'} + --data", registry)
    dataset = build_dataset(recipe, registry)
    if not isinstance(dataset, SubmissionFrames):
        raise DataError(
            f"dataset {recipe.data.name!r} does not list submission rows (it implements no "
            "submission_frames); predictions stay in the run's predictions/ folder"
        )
    model = build_model(recipe, dataset.feature_dims, registry)
    weights = run_dir / BEST_FILE
    if not weights.is_file():
        raise CheckpointError(f"{run_dir} has no {BEST_FILE}: the run did not finish an epoch")
    load_weights(weights, model)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    model.to(dev)
    store = make_store(recipe, dataset, split, dev)
    preds = predict_frames(model, store, recipe.evaluation.batch_size)
    videos = {v.name: v for v in dataset.videos(split)}
    per_video = {}
    for i, name in enumerate(store.names):
        sl = store.video_slice(i)
        v = videos[name]
        ids = v.frame_ids if v.frame_ids is not None else torch.arange(v.num_frames)
        per_video[name] = (ids.long(), preds.pred[sl])
    return RunPredictions(
        run_dir=run_dir,
        targets=tuple(recipe.model.targets),
        dataset_targets=tuple(dataset.targets),
        per_video=per_video,
        rows=dataset.submission_frames(split),
    )


def submission_rows(frame_ids: Tensor, pred: Tensor, frames: list[int]) -> Tensor:
    """Predictions at the listed frames: the row with the last ``frame_id <= frame``,
    clamped to the video (a frame past the end gets the last prediction)."""
    wanted = torch.as_tensor(frames, dtype=torch.long)
    pos = torch.searchsorted(frame_ids.contiguous(), wanted, right=True) - 1
    return pred[pos.clamp(0, pred.shape[0] - 1)]


def write_submission(
    runs: list[RunPredictions],
    out: Path,
    missing_value: float | None = None,
) -> dict[str, Any]:
    """Merge the runs' targets and write the submission file atomically.

    Returns a summary: rows written, videos, and the videos padded or truncated.

    Raises:
        DataError: when a target is predicted by two runs, none predicts a target (unless
            ``missing_value`` fills it), or a listed video has no prediction.
    """
    if not runs:
        raise DataError("no run given")
    columns = runs[0].dataset_targets
    source: dict[str, tuple[RunPredictions, int]] = {}
    for run in runs:
        if run.dataset_targets != columns:
            raise DataError(
                f"{run.run_dir} predicts on a dataset with labels {run.dataset_targets}, "
                f"{runs[0].run_dir} on {columns}"
            )
        for j, t in enumerate(run.targets):
            if t in source:
                raise DataError(
                    f"target {t!r} is predicted by both {source[t][0].run_dir} and "
                    f"{run.run_dir}; pass one run per target"
                )
            source[t] = (run, j)
    missing = [t for t in columns if t not in source]
    if missing and missing_value is None:
        raise DataError(
            f"no run predicts {', '.join(missing)}; also pass a run trained on it (one model "
            "per dimension: train it with model.targets set to it) or fill the column with "
            "--missing-value"
        )
    rows = runs[0].rows
    lines = ["image_location," + ",".join(columns)]
    padded, truncated = [], []
    for video, listed in rows.items():
        frames = [k for _, k in listed]
        cols = []
        for t in columns:
            if t not in source:
                cols.append(torch.full((len(frames),), float(missing_value or 0.0)))
                continue
            run, j = source[t]
            if video not in run.per_video:
                raise DataError(f"{run.run_dir} has no prediction for video {video!r}")
            ids, pred = run.per_video[video]
            cols.append(submission_rows(ids, pred[:, j], frames))
            last = int(ids[-1]) if len(ids) else -1
            if frames and max(frames) > last and video not in padded:
                padded.append(video)
            if len(ids) and last > (max(frames) if frames else -1) and video not in truncated:
                truncated.append(video)
        values = torch.stack(cols, 1) if cols else torch.zeros(len(frames), 0)
        for (name, _), row in zip(listed, values.tolist(), strict=True):
            if not all(math.isfinite(x) for x in row):
                raise DataError(f"non-finite prediction for {name}")
            lines.append(name + "," + ",".join(f"{x:.6f}" for x in row))
    atomic_write_text(out, "\n".join(lines) + "\n")
    return {
        "rows": len(lines) - 1,
        "videos": len(rows),
        "padded": padded,
        "truncated": truncated,
        "columns": list(columns),
        "missing": missing,
    }
