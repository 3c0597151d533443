"""Per-frame predictions of trained runs written as one file.

``fusionkit predict RUN_DIR [RUN_DIR ...] --out FILE`` reloads each run (:func:`load_run`, data
params optionally overridden, e.g. the dataset root or a test list), predicts every frame of a
split with the run's own windows (:func:`fusionkit.engine.evaluate.predict`) and writes one CSV.

For a dataset that lists the official rows of a submission
(:class:`~fusionkit.core.interfaces.SubmissionFrames`, e.g. Aff-Wild2) the file is in the
ABAW layout::

    image_location,valence,arousal
    <row name>,<v>,<a>

with one line per listed row; a row whose frame lies past a video's last frame gets that
video's last prediction, frames the list omits are not written. For any other dataset it has
one line per frame: ``video,frame,<target>,...``. Targets come from the runs together: one
model per dimension is common, so a valence run and an arousal run fill one file. The columns
follow the dataset's target order.

Runs are merged only when they predicted the same data: the same videos with the same frames
(and, where the split is labelled, the same labels); runs trained on differently generated or
differently cut data are refused rather than paired video by video.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.core.errors import DataError
from fusionkit.core.interfaces import SubmissionFrames
from fusionkit.core.params import first_few
from fusionkit.core.registry import Registry
from fusionkit.engine.data import labels_fingerprint
from fusionkit.engine.evaluate import predict as predict_frames
from fusionkit.engine.files import atomic_write_text
from fusionkit.engine.runs import recorded_metrics
from fusionkit.engine.session import data_as_evaluated, load_run, set_run_threads

__all__ = [
    "RunPredictions",
    "check_missing_value",
    "predict_run",
    "submission_rows",
    "write_submission",
]

#: listed rows and predicted frames this far apart (or 2 % of the rows, if more) are not the
#: usual few-frame difference between two decoders of one video
FAR_ROWS = 5


@dataclass
class RunPredictions:
    """One run's predictions of a split.

    Attributes:
        run_dir: the run.
        targets: the targets it predicts, e.g. ``("valence",)``.
        dataset_targets: every label column of its dataset, in order.
        per_video: video -> ``(frame_ids (N,), pred (N, len(targets)))``.
        rows: video -> ``(row name, frame index)`` list of the official file, or ``None`` when
            the dataset lists no submission rows (then every frame is written).
        labels: video -> SHA-256 of which frames are labelled and their labels (every label
            column of the dataset; a split without labels hashes its empty mask), or ``None``
            when unknown. With the video names and frame ids, it tells whether two runs
            predicted the same data.
    """

    run_dir: Path
    targets: tuple[str, ...]
    dataset_targets: tuple[str, ...]
    per_video: dict[str, tuple[Tensor, Tensor]]
    rows: dict[str, list[tuple[str, int]]] | None
    labels: dict[str, str] | None = None


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
    loaded = load_run(run_dir, device=device, data_overrides=data_overrides, registry=registry)
    session = loaded.session
    # the run's threads, as `eval` sets them: another count changes the order of float
    # sums, so the last digits of the predictions
    set_run_threads(loaded.run_dir, session.recipe.training.num_threads)
    dataset = session.dataset
    if data_overrides and split in (recorded_metrics(loaded.run_dir.path).get("splits") or {}):
        try:  # other --data settings may deliver another split under the same name
            data_as_evaluated(loaded.run_dir, session, split)
        except DataError as exc:
            warnings.warn(
                f"the --data settings change split {split!r}: {exc}. Its predictions are not "
                "of the data the run's metrics are (another fold may even hold videos the run "
                "trained on)",
                stacklevel=2,
            )
    store = session.store(split)
    preds = predict_frames(session.model, store, session.recipe.evaluation.batch_size, session.bf16)
    videos = {v.name: v for v in dataset.videos(split)}
    per_video, labels = {}, {}
    for i, name in enumerate(store.names):
        sl = store.video_slice(i)
        v = videos[name]
        ids = v.frame_ids if v.frame_ids is not None else torch.arange(v.num_frames)
        per_video[name] = (ids.long(), preds.pred[sl])
        labels[name] = labels_fingerprint([v], range(v.labels.shape[1]))  # every column
    rows = dataset.submission_frames(split) if isinstance(dataset, SubmissionFrames) else None
    return RunPredictions(
        run_dir=Path(run_dir),
        targets=tuple(session.recipe.model.targets),
        dataset_targets=tuple(dataset.targets),
        per_video=per_video,
        rows=rows,
        labels=labels,
    )


def _check_same_data(first: RunPredictions, run: RunPredictions) -> None:
    """Refuse to merge two runs that predicted different data (videos, frames or labels)."""

    def refuse(what: str) -> DataError:
        return DataError(
            f"{first.run_dir} and {run.run_dir} predicted different data: {what}; merging "
            "them would pair predictions of different videos. Merge only runs whose recipes "
            "read the same data (data.params, e.g. the dataset seed or max_frames; pass the "
            "same --data to all of them)"
        )

    names_a, names_b = set(first.per_video), set(run.per_video)
    if names_a != names_b:
        only_a, only_b = sorted(names_a - names_b), sorted(names_b - names_a)
        parts = [f"only {first.run_dir} has {first_few(only_a, 3)}"] if only_a else []
        parts += [f"only {run.run_dir} has {first_few(only_b, 3)}"] if only_b else []
        raise refuse(f"the videos differ ({'; '.join(parts)})")
    for video, (ids_a, _) in first.per_video.items():
        ids_b = run.per_video[video][0]
        if len(ids_a) != len(ids_b):
            raise refuse(
                f"video {video!r} has {len(ids_a)} frames in {first.run_dir}, {len(ids_b)} in "
                f"{run.run_dir}"
            )
        if not torch.equal(ids_a, ids_b):
            raise refuse(f"video {video!r} has other frame numbers in each")
        if first.labels is not None and run.labels is not None:
            if first.labels.get(video) != run.labels.get(video):
                raise refuse(f"video {video!r} has other labels in each")


def _check_same_rows(first: RunPredictions, run: RunPredictions) -> None:
    """Refuse to merge two runs whose datasets list other submission rows (another template
    file, or none): the file would follow the first run's list and the other's would be lost."""
    if first.rows == run.rows:
        return
    if first.rows is None or run.rows is None:
        listed, unlisted = (first, run) if run.rows is None else (run, first)
        what = f"{listed.run_dir} lists submission rows, {unlisted.run_dir} lists none"
    else:
        differ = sorted(set(first.rows) ^ set(run.rows)) or sorted(
            v for v in first.rows if first.rows[v] != run.rows[v]
        )
        what = f"their listed rows differ (videos {first_few(differ, 3)})"
    raise DataError(
        f"{first.run_dir} and {run.run_dir} name different submission rows: {what}. Give both "
        "the same row list (the dataset's submission template; pass the same --data to all "
        "of them)"
    )


def submission_rows(frame_ids: Tensor, pred: Tensor, frames: list[int]) -> Tensor:
    """Predictions at the listed frames: the row with the last ``frame_id <= frame``,
    clamped to the video (a frame past the end gets the last prediction)."""
    wanted = torch.as_tensor(frames, dtype=torch.long)
    pos = torch.searchsorted(frame_ids.contiguous(), wanted, right=True) - 1
    return pred[pos.clamp(0, pred.shape[0] - 1)]


def _far(n: int, of: int) -> bool:
    """More than a few rows: over ``FAR_ROWS`` and over 2 % of ``of``."""
    return n > max(FAR_ROWS, 0.02 * of)


def _warn_far(padded: dict[str, tuple[int, int]], truncated: dict[str, tuple[int, int]]) -> None:
    """Warn about the videos whose listed rows and predicted frames differ by far more than the
    usual few frames of two decoders: the video file is probably truncated or another one."""
    far = [f"{v} ({n} of {of} rows padded)" for v, (n, of) in padded.items() if _far(n, of)]
    far += [f"{v} ({n} of {of} frames cut)" for v, (n, of) in truncated.items() if _far(n, of)]
    if far:
        warnings.warn(
            f"submission: {len(far)} video(s) differ from the listed rows by far more than a "
            f"few frames: {first_few(far)}; their data are probably not the organisers' (a "
            "truncated or other video file, or features at another frame rate): check them",
            stacklevel=2,
        )


def check_missing_value(value: float | None) -> None:
    """Refuse a ``--missing-value`` that is not a finite float32 number (the file would hold
    NaN, inf, or a value the predictions' float32 cannot represent)."""
    if value is None:
        return
    limit = float(torch.finfo(torch.float32).max)
    if not (math.isfinite(value) and abs(value) <= limit):
        raise DataError(
            f"--missing-value {value}: give a finite value in float32 range (|x| <= "
            f"{limit!r}), e.g. 0"
        )


def write_submission(
    runs: list[RunPredictions],
    out: Path,
    missing_value: float | None = None,
) -> dict[str, Any]:
    """Merge the runs' targets and write the submission file atomically.

    Returns a summary: rows written, videos, and the videos padded or truncated.

    Raises:
        DataError: when a target is predicted by two runs, none predicts a target (unless
            ``missing_value`` fills it), the runs predicted different data (videos, frames or
            labels), or a listed video has no prediction.
    """
    check_missing_value(missing_value)
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
        if run is not runs[0]:
            _check_same_data(runs[0], run)
            _check_same_rows(runs[0], run)
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
    rows: dict[str, list[tuple[Any, int]]] | None = runs[0].rows
    if rows is None:  # no official rows: one line per frame of every video
        first = runs[0]
        rows = {
            video: [((video, int(f)), int(f)) for f in ids.tolist()]
            for video, (ids, _) in first.per_video.items()
        }
        lines: list[list[Any]] = [["video", "frame", *columns]]
    else:
        lines = [["image_location", *columns]]
    padded: dict[str, tuple[int, int]] = {}  # video -> (rows padded, rows listed)
    truncated: dict[str, tuple[int, int]] = {}  # video -> (frames cut, frames predicted)
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
            pad = sum(k > last for k in frames)
            if pad:
                padded[video] = max(padded.get(video, (0, 0)), (pad, len(frames)))
            cut = last - max(frames, default=-1)
            if len(ids) and cut > 0:
                truncated[video] = max(truncated.get(video, (0, 0)), (cut, last + 1))
        values = torch.stack(cols, 1) if cols else torch.zeros(len(frames), 0)
        for (name, _), row in zip(listed, values.tolist(), strict=True):
            if not all(math.isfinite(x) for x in row):
                raise DataError(f"non-finite prediction for {name}")
            lead = list(name) if isinstance(name, tuple) else [name]
            lines.append([*lead, *(f"{x:.6f}" for x in row)])
    text = io.StringIO()  # quoted where a name holds a comma, a quote or a line break
    csv.writer(text, lineterminator="\n").writerows(lines)
    atomic_write_text(out, text.getvalue())
    _warn_far(padded, truncated)
    return {
        "rows": len(lines) - 1,
        "videos": len(rows),
        "padded": padded,
        "truncated": truncated,
        "columns": list(columns),
        "missing": missing,
    }
