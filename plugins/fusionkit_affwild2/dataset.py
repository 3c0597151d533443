"""The ``affwild2`` dataset: an Aff-Wild2 copy read exactly as distributed.

Time is the video's own frame index everywhere: label row ``k`` (after the header), crop
``%05d.jpg`` of ``k + 1``, the audio patch starting at ``k / fps`` (``fps`` from the
container) and feature row ``k`` all belong to frame ``k``. Rows marked ``-5`` stay in place
with ``label_mask`` False; time is never compacted.

Features come from the caches ``fusionkit extract`` writes; :meth:`AffWild2Dataset.videos`
only reads them. Each :class:`~fusionkit.plugin.Video` has ``features`` ``audio`` and
``video``, and ``present`` ``audio`` / ``video`` (bool per frame: the audio patch overlaps the
recording / a face crop exists). Frames without a face have zero video
features (or the previous face's with ``missing_face: previous``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.plugin import DataError, ExtractReport, Video
from fusionkit_affwild2.cache import CacheFolder, Job, library_versions, plan, run_jobs
from fusionkit_affwild2.extraction import (
    AudioJob,
    VisualJob,
    backbone_dims,
    backbone_identity,
    execute,
    resolve_device,
)
from fusionkit_affwild2.layout import (
    AnnotationSets,
    Labels,
    find_annotation_sets,
    find_media,
    fold_split,
    index_media,
    label_files,
    media_name,
    read_labels,
    read_name_list,
    read_submission_template,
)
from fusionkit_affwild2.params import AffWild2Params

__all__ = ["AffWild2Dataset", "fit_rows"]

_FIX = "run `fusionkit extract RECIPE` with the same data.params first"


def fit_rows(x: Tensor, n: int, fill: str) -> Tensor:
    """``x`` cut or padded to ``n`` rows: ``fill="edge"`` repeats the last row (zeros if
    ``x`` is empty), ``fill="zero"`` pads with zeros / False."""
    if x.shape[0] >= n:
        return x[:n]
    pad_shape = (n - x.shape[0], *x.shape[1:])
    if fill == "edge" and x.shape[0] > 0:
        pad = x[-1:].expand(pad_shape)
    else:
        pad = torch.zeros(pad_shape, dtype=x.dtype)
    return torch.cat([x, pad])


def forward_fill(feats: Tensor, present: Tensor) -> Tensor:
    """Rows without ``present`` take the last present row's value (zeros before the first)."""
    idx = torch.where(
        present, torch.arange(len(present)), torch.full_like(present, -1, dtype=torch.long)
    )
    last = torch.cummax(idx, 0).values
    out = feats[last.clamp_min(0)]
    return torch.where((last >= 0)[:, None], out, torch.zeros((), dtype=feats.dtype))


class AffWild2Dataset:
    """Aff-Wild2 (ABAW valence-arousal track) from its official tree; see ``docs/data.md``.

    Splits: ``train`` and ``val`` (official, or a cross-validation fold), plus ``test`` when
    ``test_list`` is given.
    """

    targets: tuple[str, ...] = ("valence", "arousal")

    def __init__(self, params: AffWild2Params) -> None:
        self.params = params
        self.root = params.root.expanduser()
        self.cache_root = (params.cache_dir or self.root / "fusionkit_cache").expanduser()
        a_dim, _ = backbone_dims(params.audio.backbone)
        v_dim, v_size = backbone_dims(params.video.backbone)
        if v_size is not None and v_size > params.video.resize:
            raise DataError(
                f"data.params.video.resize={params.video.resize} is smaller than the visual "
                f"backbone's input size {v_size}"
            )
        self.feature_dims: dict[str, int] = {"audio": a_dim, "video": v_dim}
        self._videos: dict[str, list[Video]] = {}
        self._labels: dict[str, Labels] = {}

    # ------------------------------------------------------------------ layout

    @cached_property
    def annotation_sets(self) -> AnnotationSets:
        return find_annotation_sets(self.root, self.params.annotations)

    @cached_property
    def label_paths(self) -> dict[str, Path]:
        """Trial -> annotation file, over the official train and validation folders."""
        sets = self.annotation_sets
        train, val = label_files(sets.train), label_files(sets.val)
        both = sorted(set(train) & set(val))
        if both:
            raise DataError(
                f"trial(s) {', '.join(both[:5])} appear in both {sets.train} and {sets.val}"
            )
        return {**train, **val}

    @cached_property
    def official(self) -> dict[str, list[str]]:
        sets = self.annotation_sets
        return {
            "train": sorted(label_files(sets.train)),
            "val": sorted(label_files(sets.val)),
        }

    @cached_property
    def test_trials(self) -> list[str]:
        if self.params.test_list is None:
            return []
        return read_name_list(self._path(self.params.test_list))

    @cached_property
    def template(self) -> dict[str, list[tuple[str, int]]] | None:
        if self.params.submission_template is None:
            return None
        return read_submission_template(self._path(self.params.submission_template))

    @cached_property
    def media_index(self) -> dict[str, Path]:
        return index_media(self.root, self.params.video_dirs)

    def _path(self, p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else self.root / p

    def media_path(self, trial: str) -> Path:
        return find_media(trial, self.media_index, self.root, self.params.video_dirs)

    def crops_path(self, trial: str) -> Path:
        return self.root / self.params.crops_dir / trial

    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "test") if self.params.test_list is not None else ("train", "val")

    def trials(self, split: str) -> list[str]:
        """Trial names of ``split`` (fold applied to train / val)."""
        if split == "test" and self.params.test_list is not None:
            return list(self.test_trials)
        if split in ("train", "val"):
            off = self.official
            sp = self.params.split
            train, val = fold_split(off["train"], off["val"], sp.fold, sp.chunks)
            return train if split == "train" else val
        raise DataError(
            f"affwild2 has no split {split!r}; splits: {', '.join(self.splits())}"
            + ("" if split != "test" else " (set data.params.test_list to enable 'test')")
        )

    def all_trials(self) -> list[str]:
        names = self.official["train"] + self.official["val"] + list(self.test_trials)
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ caches

    @cached_property
    def _versions(self) -> dict[str, str]:
        return library_versions(["torchaudio", "av"])

    @cached_property
    def audio_cache(self) -> CacheFolder:
        a = self.params.audio
        identity = {
            "name": a.backbone.name,
            "backbone": backbone_identity(a.backbone),
            "logmel": a.logmel.model_dump(mode="json"),
            "anchor": a.anchor,
            "sync": a.sync,
            "frame_count": self.params.frame_count,
        }
        return CacheFolder(self.cache_root, "audio", identity, self._versions)

    @cached_property
    def video_cache(self) -> CacheFolder:
        v = self.params.video
        identity = {
            "name": v.backbone.name,
            "backbone": backbone_identity(v.backbone),
            "resize": v.resize,
        }
        return CacheFolder(self.cache_root, "video", identity, self._versions)

    def _audio_job(self, media: str, path: Path, device: str) -> AudioJob:
        a = self.params.audio
        return AudioJob(
            item=media,
            media=str(path),
            cache_root=str(self.cache_root),
            extractor=self.audio_cache.extractor,
            versions=self._versions,
            backbone=a.backbone,
            logmel=a.logmel.model_dump(mode="json"),
            anchor=a.anchor,
            sync=a.sync,
            frame_count=self.params.frame_count,
            batch_size=a.batch_size,
            device=device,
        )

    def _visual_job(self, trial: str, device: str) -> VisualJob:
        v = self.params.video
        return VisualJob(
            item=trial,
            crops=str(self.crops_path(trial)),
            cache_root=str(self.cache_root),
            extractor=self.video_cache.extractor,
            versions=self._versions,
            backbone=v.backbone,
            resize=v.resize,
            batch_size=v.batch_size,
            device=device,
        )

    def extract(self, *, workers: int = 1, progress: bool = True) -> ExtractReport:
        """Compute the audio cache of every raw video and the visual cache of every trial
        (train, val and test) that is missing, stale or corrupt; valid caches are skipped."""
        t0 = time.perf_counter()
        device = resolve_device(self.params.device)
        trials = self.all_trials()
        media: dict[str, Path] = {}
        for t in trials:
            media.setdefault(media_name(t), self.media_path(t))
        audio_items = [
            (m, {"media": p}, self._audio_job(m, p, device)) for m, p in sorted(media.items())
        ]
        video_items = []
        for t in trials:
            crops = self.crops_path(t)
            if not crops.is_dir():
                raise DataError(f"face-crop folder {crops} of trial {t!r} does not exist")
            video_items.append((t, {"crops": crops}, self._visual_job(t, device)))
        a_jobs, a_report = plan(self.audio_cache, audio_items)
        v_jobs, v_report = plan(self.video_cache, video_items)
        planned = [("audio", j, a_report) for j in a_jobs] + [
            ("video", j, v_report) for j in v_jobs
        ]
        jobs = [Job(f"{kind} {j.label}", j.payload) for kind, j, _ in planned]
        try:
            failed = run_jobs(
                jobs, execute, workers=workers, description="affwild2 extract", progress=progress
            )
        finally:
            self.audio_cache.write_manifest(media)
            self.video_cache.write_manifest(trials)
        report = ExtractReport(
            total=a_report.total + v_report.total,
            skipped=a_report.skipped + v_report.skipped,
            cache_dirs=[str(self.audio_cache.path), str(self.video_cache.path)],
        )
        for kind, j, sub in planned:
            label = f"{kind} {j.label}"
            if label in failed:
                report.failed[label] = failed[label]
            elif j.label in sub.refreshed:
                report.refreshed[label] = sub.refreshed[j.label]
            else:
                report.computed += 1
        report.seconds = time.perf_counter() - t0
        if not failed:
            self._warn_lengths(trials)
        return report

    # ------------------------------------------------------------------ loading

    def labels(self, trial: str) -> Labels:
        if trial not in self._labels:
            self._labels[trial] = read_labels(self.label_paths[trial])
        return self._labels[trial]

    def _length(self, trial: str, frames: int) -> int:
        """Rows of a trial: its label rows (labels define the frames), else the number of
        frames decoded from its video (test trials)."""
        if trial in self.label_paths:
            return self.labels(trial).rows
        return frames

    def _warn_lengths(self, trials: Sequence[str]) -> None:
        diffs = []
        for t in trials:
            if t not in self.label_paths:
                continue
            info = self.audio_cache.info(media_name(t))
            if info is None:
                continue
            frames, rows = int(info["info"]["num_frames"]), self.labels(t).rows
            if frames != rows:
                diffs.append(f"{t} ({rows} label rows, {frames} video frames)")
        if diffs:
            warnings.warn(
                f"affwild2: {len(diffs)} trial(s) have label rows != decoded video frames: "
                f"{'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}. Labels define the "
                "frames; missing feature rows repeat the last audio row and have no face.",
                stacklevel=3,
            )

    def _load_trial(self, trial: str, audio_memo: dict[str, Any]) -> Video:
        verify = self.params.verify_sources
        m = media_name(trial)
        if m not in audio_memo:
            path = self.media_path(trial)
            audio_memo[m] = self.audio_cache.load_or_raise(
                m, {"media": path} if verify else None, _FIX
            )
        a_tensors, a_meta = audio_memo[m]
        crops = self.crops_path(trial)
        v_tensors, _ = self.video_cache.load_or_raise(
            trial, {"crops": crops} if verify else None, _FIX
        )
        info = a_meta["info"]
        n = self._length(trial, int(info["num_frames"]))
        audio = fit_rows(a_tensors["features"].float(), n, "edge")
        a_present = fit_rows(a_tensors["present"].bool(), n, "zero")
        v_present = fit_rows(v_tensors["present"].bool(), n, "zero")
        video = fit_rows(v_tensors["features"].float(), n, "zero")
        if self.params.missing_face == "previous":
            video = forward_fill(video, v_present)
        if trial in self.label_paths:
            lab = self.labels(trial)
            labels = torch.from_numpy(lab.values.copy())
            mask = torch.from_numpy(lab.mask.copy())
        else:
            labels = torch.zeros(n, 2)
            mask = torch.zeros(n, dtype=torch.bool)
        return Video(
            name=trial,
            features={"audio": audio.contiguous(), "video": video.contiguous()},
            labels=labels,
            label_mask=mask,
            fps=float(info["fps"]),
            frame_ids=torch.arange(n, dtype=torch.int64),
            present={"audio": a_present, "video": v_present},
        )

    def videos(self, split: str) -> list[Video]:
        """The trials of ``split`` read from the feature caches (loaded once per split).

        Raises:
            DataError: naming the cache file when it is missing, stale or corrupt.
        """
        if split not in self._videos:
            names = self.trials(split)
            memo: dict[str, Any] = {}
            self._videos[split] = [self._load_trial(t, memo) for t in names]
            self._warn_lengths(names)
        return list(self._videos[split])

    def submission_frames(self, split: str) -> dict[str, list[tuple[str, int]]]:
        """ABAW rows ``<trial>/%05d.jpg`` per trial: the template's rows when one is given,
        else one per frame of the trial."""
        out = {}
        for v in self.videos(split):
            if self.template is not None and v.name in self.template:
                out[v.name] = list(self.template[v.name])
            else:
                out[v.name] = [(f"{v.name}/{k + 1:05d}.jpg", k) for k in range(v.num_frames)]
        return out
