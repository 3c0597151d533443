"""The ``affwild2`` dataset: an Aff-Wild2 copy read exactly as distributed.

Time is the video's own frame index everywhere: label row ``k`` (after the header), crop
``%05d.jpg`` of ``k + 1``, the audio patch starting at ``k / fps`` (``fps`` from the
container; for waveform backbones the window of frame ``k``, see
:mod:`~fusionkit_affwild2.waveform`) and feature row ``k`` all belong to frame ``k``. Rows
marked ``-5`` stay in place with ``label_mask`` False; time is never compacted.

Features come from the caches ``fusionkit extract`` writes; :meth:`AffWild2Dataset.videos`
only reads them. Each :class:`~fusionkit.plugin.Video` has ``features`` ``audio`` and
``video``, and ``present`` ``audio`` / ``video`` (bool per frame: the audio patch overlaps the
recording / a face crop exists). Frames without a face have zero video
features (or the previous face's with ``missing_face: previous``).

Nothing is dropped silently: face-crop folders and raw videos that belong to no split (no
annotation file, not in ``test_list``) and raw videos without audio are warned about, with a
count and names, by ``extract`` and when the videos are loaded.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fusionkit.plugin import (
    DataError,
    ExtractReport,
    Video,
    first_few,
    run_or_grid_holding,
)
from fusionkit_affwild2.backbones import check_weights_file
from fusionkit_affwild2.cache import CacheFolder, Job, library_versions, plan, run_jobs
from fusionkit_affwild2.extraction import (
    AudioJob,
    VisualJob,
    backbone_dims,
    backbone_identity,
    backbone_info,
    execute,
    random_init,
    resolve_device,
)
from fusionkit_affwild2.layout import (
    ZERO_CROP,
    AnnotationSets,
    Labels,
    find_annotation_sets,
    find_media,
    fold_split,
    index_media,
    label_files,
    media_name,
    partition_labels,
    read_labels,
    read_submission_template,
    read_test_list,
    require_submission_template,
    template_rows,
    warn_shared_media,
    zero_based_crops_error,
)
from fusionkit_affwild2.params import AffWild2Params

__all__ = ["AffWild2Dataset", "fit_rows"]

_FIX = "run `fusionkit extract RECIPE` with the same data.params first"
#: label rows and decoded frames this far apart (or 2 % of the rows, if more) are not the usual
#: few-frame difference: the video file is probably truncated or another video's
FAR_FRAMES = 5
#: label rows more than this many times the decoded frames (and FAR_FRAMES more) are refused:
#: nearly every frame trained on would have no video behind it
MAX_LABELS_PER_FRAME = 10


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
        held = run_or_grid_holding(self.cache_root)
        if held is not None:
            folder, kind, _ = held
            raise DataError(
                f"data.params.cache_dir: {self.cache_root} is or is inside the fusionkit {kind} "
                f"directory {folder}; feature caches are never written into runs or grids: "
                "choose a folder outside them"
            )
        a_dim, _ = backbone_dims(params.audio.backbone)
        v_dim, v_size = backbone_dims(params.video.backbone)
        if v_size is not None and v_size > params.video.resize:
            raise DataError(
                f"data.params.video.resize={params.video.resize} is smaller than the visual "
                f"backbone's input size {v_size}; set data.params.video.resize={v_size} (or more)"
            )
        self.feature_dims: dict[str, int] = {"audio": a_dim, "video": v_dim}
        self._videos: dict[str, list[Video]] = {}
        self._labels: dict[str, Labels] = {}
        self._unused_warned = False
        self._check_layout()

    def _check_layout(self) -> None:
        """The checks that read no media, run when the dataset is built (so ``fusionkit recipe
        validate`` reports them, as ``run`` and ``extract`` would): the root exists, the
        annotation folders are found and no trial is in both train and val, the test list
        reads and names no annotated trial, the submission template and the backbone weights
        files exist. Costs a few directory listings and reading the test list."""
        if not self.root.is_dir():
            raise DataError(
                f"dataset root {self.root} does not exist or is not a folder; set "
                "data.params.root (or data.root) to the folder of your Aff-Wild2 copy"
            )
        _ = self.label_paths  # finds the annotation folders, refuses a train/val overlap
        _ = self.test_trials  # reads the test list, refuses annotated test trials
        if self.params.split.fold:
            self.trials("train")  # a fold the train trials cannot fill
        if self.params.submission_template is not None:
            path = self._path(self.params.submission_template)
            require_submission_template(path, f"under {self.root}")
        for modality, spec in (
            ("audio", self.params.audio.backbone),
            ("video", self.params.video.backbone),
        ):
            weights = getattr(spec.params, "weights", None)
            if weights is not None:  # once here, not in every extraction job
                check_weights_file(weights, f"data.params.{modality}.backbone.params.weights")

    # ------------------------------------------------------------------ layout

    @cached_property
    def annotation_sets(self) -> AnnotationSets:
        return find_annotation_sets(self.root, self.params.annotations)

    @cached_property
    def label_paths(self) -> dict[str, Path]:
        """Trial -> annotation file, over the official train and validation folders."""
        return partition_labels(self.annotation_sets)

    @cached_property
    def official(self) -> dict[str, list[str]]:
        sets = self.annotation_sets
        return {
            "train": sorted(label_files(sets.train)),
            "val": sorted(label_files(sets.val)),
        }

    @cached_property
    def test_trials(self) -> list[str]:
        """The names of ``test_list``; none may have an annotation file (a test trial with
        labels would be scored as "test" on training or validation data)."""
        if self.params.test_list is None:
            return []
        return read_test_list(
            self._path(self.params.test_list),
            self.label_paths,
            self.annotation_sets,
            "data.params.test_list",
        )

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
        """The raw video of ``trial``: ``X.mp4`` for ``X``, ``X_left`` and ``X_right``, or the
        trial's own ``X_left.mp4`` when there is no ``X.mp4``."""
        return find_media(trial, self.media_index, self.root, self.params.video_dirs)

    def media_key(self, trial: str) -> str:
        """The name of the audio cache of ``trial``: the stem of the raw video it reads (one
        cache per distinct file). ``X_left`` and ``X_right`` share ``X.mp4``, key ``X``;
        trials with files of their own (``X_left.mp4``, ``X_right.mp4``) get their own."""
        return self._trial_media(trial).stem

    def crops_path(self, trial: str) -> Path:
        return self.root / self.params.crops_dir / trial

    def _origin(self, trial: str) -> str:
        """Where a trial comes from and how to drop it, for messages: its annotation file or
        the test list."""
        fix = "add the missing data or remove"
        if trial in self.label_paths:
            return f"listed by annotation file {self.label_paths[trial]}: {fix} that file"
        if self.params.test_list is not None:
            return f"listed in test list {self._path(self.params.test_list)}: {fix} the name"
        return "not listed by any annotation file"

    def _trial_media(self, trial: str) -> Path:
        """:meth:`media_path`, its error naming the annotation file that lists the trial."""
        try:
            return self.media_path(trial)
        except DataError as exc:
            raise DataError(f"{exc} (trial {self._origin(trial)})") from None

    def unused_sources(self) -> tuple[list[str], list[str]]:
        """Face-crop folders and raw videos that no split uses: their trial has no annotation
        file and is not in ``test_list`` (e.g. a deleted annotation file). Returns the crop
        folder names and the raw video paths (relative to the root when under it)."""
        trials = set(self.all_trials())
        crops_root = self.root / self.params.crops_dir
        crops = []
        if crops_root.is_dir():
            crops = sorted(
                e.name
                for e in os.scandir(crops_root)
                if e.is_dir() and not e.name.startswith(".") and e.name not in trials
            )
        used = trials | {media_name(t) for t in trials}
        videos = sorted(self._shown(p) for stem, p in self.media_index.items() if stem not in used)
        return crops, videos

    def _shown(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def _warn_shadowed(self, stacklevel: int) -> None:
        """Warn about raw videos named after a ``_left`` / ``_right`` trial that the trial does
        not read, because the un-suffixed video of the same name exists and wins."""
        index = self.media_index
        shadowed = [
            f"{self._shown(index[t])} (trial {t} reads {self._shown(index[media_name(t)])})"
            for t in self.all_trials()
            if t in index and media_name(t) != t and media_name(t) in index
        ]
        if shadowed:
            warnings.warn(
                f"affwild2: {len(shadowed)} raw video(s) named after a _left/_right trial are "
                f"not used, because the un-suffixed video exists and _left/_right trials read "
                f"it: {first_few(shadowed)}; remove or rename one of the two files",
                stacklevel=stacklevel,
            )

    def _warn_unused(self, stacklevel: int) -> None:
        self._warn_shadowed(stacklevel + 1)
        crops, videos = self.unused_sources()
        if not crops and not videos:
            return
        parts = []
        if crops:
            parts.append(
                f"{len(crops)} face-crop folder(s) under {self.root / self.params.crops_dir} "
                f"({first_few(crops)})"
            )
        if videos:
            parts.append(f"{len(videos)} raw video(s) ({first_few(videos)})")
        sets = self.annotation_sets
        test = (
            f"not in test_list {self._path(self.params.test_list)}"
            if self.params.test_list is not None
            else "no data.params.test_list set"
        )
        warnings.warn(
            f"affwild2: {' and '.join(parts)} belong to no split (no annotation file in "
            f"{sets.train} or {sets.val}; {test}), so they are not used; if an annotation "
            "file was deleted, restore it (test videos need data.params.test_list)",
            stacklevel=stacklevel,
        )

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
    def audio_input(self) -> str:
        """What the audio backbone reads: ``"logmel"`` or ``"waveform"``."""
        return backbone_info(self.params.audio.backbone).input

    @cached_property
    def audio_cache(self) -> CacheFolder:
        a = self.params.audio
        identity: dict[str, Any] = {
            "name": a.backbone.name,
            "backbone": backbone_identity(a.backbone),
        }
        if self.audio_input == "waveform":  # the log-mel settings play no part
            identity |= {"input": "waveform", "waveform": a.waveform.model_dump(mode="json")}
        else:  # unchanged since format 1, so existing log-mel caches stay valid
            identity["logmel"] = a.logmel.model_dump(mode="json")
        identity |= {"anchor": a.anchor, "sync": a.sync, "frame_count": self.params.frame_count}
        if a.sync == "container":
            # frames before a late audio start are absent (caches made before counted the
            # silence put there as audio: they are recomputed into a new folder)
            identity["lead"] = "absent"
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

    def feature_identity(self) -> dict[str, str]:
        """Each modality's feature cache folder (its extractor, settings and weights' SHA-256):
        a run refuses to be reloaded on features of another."""
        return {"audio": self.audio_cache.path.name, "video": self.video_cache.path.name}

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
            waveform=a.waveform.model_dump(mode="json"),
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

    def _extractable(
        self, trials: Sequence[str]
    ) -> tuple[dict[str, Path], list[str], dict[str, str]]:
        """Raw video per audio cache (:meth:`media_key`), the trials that can be extracted, and
        ``trial -> problem`` for those whose raw video or face-crop folder does not exist or
        whose crops are numbered from 0 (``strict``: raise the first problem instead)."""
        media: dict[str, Path] = {}
        usable: list[str] = []
        problems: dict[str, str] = {}
        for t in trials:
            try:
                path = self._trial_media(t)
                crops = self.crops_path(t)
                if not crops.is_dir():
                    raise DataError(
                        f"face-crop folder {crops} of trial {t!r} does not exist (trial "
                        f"{self._origin(t)})"
                    )
                if (crops / ZERO_CROP).exists():
                    raise zero_based_crops_error(crops)
            except DataError as exc:
                if self.params.strict:
                    raise DataError(
                        f"{exc}; data.params.strict is true: set it to false to extract the "
                        "other trials and report this one as failed"
                    ) from None
                problems[t] = str(exc)
                continue
            media.setdefault(path.stem, path)  # the stem names one file (see index_media)
            usable.append(t)
        return media, usable, problems

    def extract(self, *, workers: int = 1, progress: bool = True) -> ExtractReport:
        """Compute the audio cache of every raw video and the visual cache of every trial
        (train, val and test) that is missing, stale or corrupt; valid caches are skipped.

        A trial whose raw video or face-crop folder does not exist is reported in
        ``failed`` (``trial <name>``, naming its annotation file) and the others are
        extracted; with ``strict: true`` it stops the pass before any job. Warnings name the
        crop folders and raw videos no split uses and the raw videos without audio.
        """
        t0 = time.perf_counter()
        device = resolve_device(self.params.device)
        self._warn_unused(stacklevel=3)
        self._warn_random_init()
        media, trials, problems = self._extractable(self.all_trials())
        audio_items = [
            (m, {"media": p}, self._audio_job(m, p, device)) for m, p in sorted(media.items())
        ]
        video_items = [
            (t, {"crops": self.crops_path(t)}, self._visual_job(t, device)) for t in trials
        ]
        a_jobs, a_report = plan(self.audio_cache, audio_items)
        v_jobs, v_report = plan(self.video_cache, video_items)
        planned = [("audio", j, a_report) for j in a_jobs] + [
            ("video", j, v_report) for j in v_jobs
        ]
        jobs = [Job(f"{kind} {j.label}", j.payload) for kind, j, _ in planned]
        try:
            failed = run_jobs(
                jobs,
                execute,
                workers=workers,
                description=f"affwild2 extract ({device})",
                progress=progress,
            )
        finally:
            self.audio_cache.write_manifest(media)
            self.video_cache.write_manifest(trials)
        report = ExtractReport(
            total=a_report.total + v_report.total + len(problems),
            skipped=a_report.skipped + v_report.skipped,
            cache_dirs=[str(self.audio_cache.path), str(self.video_cache.path)],
        )
        report.failed.update({f"trial {t}": why for t, why in problems.items()})
        for kind, j, sub in planned:
            label = f"{kind} {j.label}"
            if label in failed:
                report.failed[label] = failed[label]
            elif j.label in sub.refreshed:
                report.refreshed[label] = sub.refreshed[j.label]
            else:
                report.computed += 1
        report.seconds = time.perf_counter() - t0
        self._warn_no_audio(media, trials)
        if not failed:
            self._check_lengths(trials)
        return report

    def _warn_random_init(self) -> None:
        """One warning naming the backbones that get random weights (features without
        meaning): no weights file and not pretrained."""
        named = [
            f"{modality} backbone '{spec.name}'"
            for modality, spec in (
                ("audio", self.params.audio.backbone),
                ("video", self.params.video.backbone),
            )
            if random_init(spec)
        ]
        if named:
            warnings.warn(
                f"affwild2: the {' and '.join(named)} {'have' if len(named) > 1 else 'has'} "
                "random weights (no weights file, not pretrained), so their features carry no "
                "learned meaning; set "
                "data.params.<audio|video>.backbone.params.weights=FILE.safetensors (or "
                "pretrained: true on a foundation backbone)",
                stacklevel=3,
            )

    def _warn_no_audio(self, media: dict[str, Path], trials: Sequence[str]) -> None:
        """Warn about raw videos whose audio cache records no audio at all (no audio track,
        or one without samples): their trials would train on constant audio features."""
        silent: dict[str, str] = {}
        for m in sorted(media):
            meta = self.audio_cache.info(m)
            info = (meta or {}).get("info") or {}
            frames = info.get("logmel_frames", info.get("encoder_frames", 1))
            if meta is not None and frames == 0:
                window = "log-mel" if "logmel_frames" in info else "encoder"
                what = (
                    "no audio track"
                    if not info.get("channels")
                    else f"audio shorter than one {window} window"
                )
                silent[m] = f"{media[m].name} ({what})"
        if not silent:
            return
        users = sorted(t for t in trials if self.media_key(t) in silent)
        warnings.warn(
            f"affwild2: {len(silent)} raw video(s) have no audio: "
            f"{first_few(list(silent.values()))}; "
            f"their {len(users)} trial(s) ({first_few(users)}) train on constant audio features "
            "(present['audio'] False on every frame); replace the files if they should have "
            "sound",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ loading

    def labels(self, trial: str) -> Labels:
        if trial not in self._labels:
            self._labels[trial] = read_labels(self.label_paths[trial])
        return self._labels[trial]

    def _length(self, trial: str, frames: int, crops: int) -> int:
        """Rows of a trial: its label rows (labels define the frames), else the frames decoded
        from its video or up to its last face crop, whichever is more (test trials: the
        organisers' crops come from their own decode, and a face is not dropped because a
        local decode came out shorter)."""
        if trial in self.label_paths:
            return self.labels(trial).rows
        return max(frames, crops)

    def _check_lengths(self, trials: Sequence[str]) -> None:
        """Warn about trials whose decoded video is shorter or longer than their labels, or
        (unlabelled trials) shorter than their face crops; refuse label files many times
        longer than their video."""
        diffs, far, absurd = [], [], []
        for t in trials:
            info = self.audio_cache.info(self.media_key(t))
            if info is None:
                continue
            frames = int(info["info"]["num_frames"])
            if t in self.label_paths:
                rows, what = self.labels(t).rows, "label rows"
                if rows > MAX_LABELS_PER_FRAME * frames and rows - frames > FAR_FRAMES:
                    absurd.append(f"{self.label_paths[t]} ({rows} rows, {frames} video frames)")
            else:  # fewer crops than frames is usual: the last frames without a face
                crops = self.video_cache.info(t)
                rows, what = int((crops or {}).get("info", {}).get("max_frame", 0)), "face crops"
                if rows <= frames:
                    continue
            if frames != rows:
                text = f"{t} ({rows} {what}, {frames} video frames)"
                # a few frames apart is usual; far more means a truncated or wrong file
                (far if abs(frames - rows) > max(FAR_FRAMES, 0.02 * rows) else diffs).append(text)
        if absurd:
            raise DataError(
                f"affwild2: {len(absurd)} annotation file(s) hold more than "
                f"{MAX_LABELS_PER_FRAME} times as many rows as their video has frames: "
                f"{first_few(absurd, 4, '; ')}. Such a file is another video's labels or a "
                "damaged one (training would run on frames with no video behind them): fix or "
                "remove it"
            )
        if far:
            warnings.warn(
                f"affwild2: {len(far)} trial(s) differ from their labels or face crops by far "
                f"more than a few frames: {first_few(far, 8, '; ')}. The video file may be "
                "truncated or another video's: check it (decode it, or download it again), then "
                "extract again; until then the frames it lacks repeat the last audio row.",
                stacklevel=3,
            )
        if diffs:
            warnings.warn(
                f"affwild2: {len(diffs)} trial(s) have label rows (or face crops) != decoded "
                f"video frames: {first_few(diffs, 8, '; ')}. Labels define the frames (without "
                "labels, the longer of video and crops); frames past the video's end repeat the "
                "last audio row and have a face only where a crop exists.",
                stacklevel=3,
            )

    def _load_trial(self, trial: str, audio_memo: dict[str, Any]) -> Video:
        verify = self.params.verify_sources
        path = self._trial_media(trial)
        m = path.stem  # the audio cache of this file (media_key), verified once per file
        fix = _FIX
        if trial not in self.label_paths:  # a test trial: extracted only with a test list
            fix = (
                "run `fusionkit extract RECIPE data.params.test_list="
                f"{self.params.test_list}` with the same data.params first (extract reads the "
                "test trials from the test list)"
            )
        if m not in audio_memo:
            audio_memo[m] = self.audio_cache.load_or_raise(
                m, {"media": path} if verify else None, fix
            )
        a_tensors, a_meta = audio_memo[m]
        crops = self.crops_path(trial)
        if (crops / ZERO_CROP).exists():  # a cache made from it would be one frame off
            raise zero_based_crops_error(crops)
        v_tensors, _ = self.video_cache.load_or_raise(
            trial, {"crops": crops} if verify else None, fix
        )
        info = a_meta["info"]
        n = self._length(trial, int(info["num_frames"]), int(v_tensors["present"].shape[0]))
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
            DataError: naming the cache file when it is missing, stale or corrupt, or the
                submission template when it does not list the split's trials (checked
                before any cache is read, so ``predict`` stops before predicting).
        """
        if split not in self._videos:
            names = self.trials(split)
            self._template_rows(split, names)
            memo: dict[str, Any] = {}
            self._videos[split] = [self._load_trial(t, memo) for t in names]
            self._check_lengths(names)
            if split == "val":
                warn_shared_media("affwild2", self.trials("train"), names, split, stacklevel=2)
            if not self._unused_warned:
                self._unused_warned = True
                self._warn_unused(stacklevel=3)
        return list(self._videos[split])

    def submission_frames(self, split: str) -> dict[str, list[tuple[str, int]]]:
        """ABAW rows ``<trial>/%05d.jpg`` per trial: with ``submission_template``, exactly the
        template's rows in its order (for ``test``, and for any split whose trials it names),
        else one per frame of each trial.

        Raises:
            DataError: naming the template when its videos and the split's trials differ
                (template videos without a trial, trials the template does not list).
        """
        names = self.trials(split)
        template = self._template_rows(split, names)
        if template is not None:
            return {video: list(rows) for video, rows in template.items()}
        return {
            v.name: [(f"{v.name}/{k + 1:05d}.jpg", k) for k in range(v.num_frames)]
            for v in self.videos(split)
        }

    def _template_rows(
        self, split: str, names: Sequence[str]
    ) -> dict[str, list[tuple[str, int]]] | None:
        """The template's rows when they define ``split``'s rows, checked against ``names``
        (:func:`~fusionkit_affwild2.layout.template_rows`); else None."""
        source, tests = self.params.submission_template, self.params.test_list
        return template_rows(
            self.template,
            None if source is None else self._path(source),
            split,
            names,
            None if tests is None else self._path(tests),
        )
