"""The generic ``features`` dataset: per-video feature arrays made by any extractor plus label
files in the Aff-Wild2 text format (``valence,arousal`` header, one row per frame, ``-5``).

Arrays are ``.npy`` (read without pickle) or ``.safetensors`` (the tensor ``features``, or
the only tensor), shaped ``(frames, dim)``, in either layout:

* ``by_modality``: ``<features_dir>/<modality>/<video>.npy``
* ``by_video``: ``<features_dir>/<video>/<modality>.npy``

With ``rows: all_frames`` row ``k`` is frame ``k``; an array at most :data:`ROW_TOLERANCE`
rows shorter or longer than the labels is padded with its last row or cut, with a warning
(further apart is an error). With
``rows: labelled_frames`` (the released compacted format) the array has one row per label row
that is not ``-5``, and the rows are put back on their frames (zeros elsewhere). Rows that
contain NaN count as missing: zeros, and ``present[<modality>]`` False. Every array of one
modality must have the same width.

With ``shared_media: true`` a ``<video>_left`` / ``_right`` trial without its own array of an
audio modality (a name starting with ``audio``) uses ``<video>``'s: the trials share the raw
video and its sound. Other modalities (faces) belong to one person and never fall back.
"""

from __future__ import annotations

import warnings
from collections import Counter
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fusionkit.plugin import DataError, Video, first_few
from fusionkit_affwild2.dataset import fit_rows
from fusionkit_affwild2.layout import (
    AnnotationSets,
    Labels,
    find_annotation_sets,
    fold_split,
    label_files,
    media_name,
    partition_labels,
    read_labels,
    read_submission_template,
    read_test_list,
    require_submission_template,
    template_rows,
    warn_shared_media,
)
from fusionkit_affwild2.params import FeaturesParams

__all__ = ["ROW_TOLERANCE", "FeaturesDataset", "read_array"]

_SUFFIXES = (".npy", ".safetensors")
#: ``rows: all_frames``: the most rows an array may differ from its trial's frames by (it is
#: then padded with its last row or cut, with a warning); further apart is an error.
ROW_TOLERANCE = 5


def shares_media(modality: str) -> bool:
    """Whether ``_left`` / ``_right`` trials share ``modality`` with their un-suffixed trial
    (audio: one raw video, one sound track); faces belong to one person each."""
    return modality.lower().startswith("audio")


def read_array(path: Path) -> Tensor:
    """A ``(frames, dim)`` float32 tensor from ``.npy`` or ``.safetensors`` (no pickle)."""
    try:
        if path.suffix == ".npy":
            x = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        else:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
                key = "features" if "features" in keys else keys[0] if len(keys) == 1 else None
                if key is None:
                    raise DataError(
                        f"{path} holds tensors {first_few(keys)}; "
                        "name the feature tensor 'features'"
                    )
                x = fh.get_tensor(key).float()
    except (OSError, ValueError, SafetensorError) as exc:
        raise DataError(f"cannot read feature file {path}: {exc}") from None
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise DataError(f"feature file {path} has shape {tuple(x.shape)}; expected (frames, dim)")
    return x


def _array_dim(path: Path) -> int:
    """The width of an array, from its header only."""
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read feature file {path}: {exc}") from None
        return 1 if arr.ndim == 1 else int(arr.shape[1])
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            if "features" in keys or len(keys) == 1:
                shape = fh.get_slice("features" if "features" in keys else keys[0]).get_shape()
                if len(shape) in (1, 2):
                    return 1 if len(shape) == 1 else int(shape[1])
    except (OSError, ValueError, SafetensorError) as exc:
        raise DataError(f"cannot read feature file {path}: {exc}") from None
    return int(read_array(path).shape[1])  # raises the error that names the problem


class FeaturesDataset:
    """Ready-made per-frame features with Aff-Wild2-format labels; see the module docstring."""

    targets: tuple[str, ...] = ("valence", "arousal")

    def __init__(self, params: FeaturesParams) -> None:
        self.params = params
        self.dir = params.features_dir.expanduser()
        if not self.dir.is_dir():
            raise DataError(
                f"data.params.features_dir: {self.dir} does not exist or is not a folder; set "
                "data.params.features_dir to the folder of per-video feature arrays"
            )
        labels = params.labels.expanduser()
        if not labels.is_dir():
            raise DataError(
                f"data.params.labels: {labels} does not exist or is not a folder; set "
                "data.params.labels to the folder holding Train_Set (or Training_Set) and "
                "Validation_Set, or to a root holding them"
            )
        self.modalities = params.modalities or self._discover()
        if not self.modalities:
            raise DataError(f"no feature arrays (.npy/.safetensors) found in {self.dir}")
        #: modality -> {file: width} of every array found (headers only).
        self._widths: dict[str, dict[Path, int]] = {}
        self.feature_dims: dict[str, int] = {m: self._dim(m) for m in self.modalities}
        self._videos: dict[str, list[Video]] = {}
        # folder listings and the test list only: `recipe validate` refuses what `run` would
        _ = self.label_paths, self.test_trials
        if params.submission_template is not None:
            path = params.submission_template.expanduser()
            require_submission_template(path, "from the folder the command runs in")
        if params.split.fold:
            self.trials("train")  # a fold the train trials cannot fill

    @cached_property
    def test_trials(self) -> list[str]:
        """The names of ``test_list`` (none without one); none may have an annotation file."""
        if self.params.test_list is None:
            return []
        path = self.params.test_list.expanduser()
        return read_test_list(path, self.label_paths, self.annotation_sets, "data.params.test_list")

    # ------------------------------------------------------------------ layout

    def _discover(self) -> list[str]:
        if self.params.layout == "by_modality":
            return sorted(
                d.name
                for d in self.dir.iterdir()
                if d.is_dir() and any(p.suffix in _SUFFIXES for p in d.iterdir())
            )
        names: set[str] = set()
        for d in self.dir.iterdir():
            if d.is_dir():
                names |= {p.stem for p in d.iterdir() if p.suffix in _SUFFIXES}
        return sorted(names)

    def _dim(self, modality: str) -> int:
        if self.params.layout == "by_modality":
            files = sorted(p for p in (self.dir / modality).glob("*") if p.suffix in _SUFFIXES)
        else:
            files = sorted(p for p in self.dir.glob(f"*/{modality}.*") if p.suffix in _SUFFIXES)
        if not files:
            raise DataError(f"no {modality!r} feature arrays found under {self.dir}")
        widths: dict[Path, int] = {}
        for f in files:  # headers only; an unreadable file is reported when it is loaded
            try:
                widths[f] = _array_dim(f)
            except DataError:
                continue
        if not widths:
            return _array_dim(files[0])  # raises the first file's error
        self._widths[modality] = widths
        # the most common width (the first file's on a tie): one odd file is the one named
        counts = Counter(widths.values())
        best = max(counts.values())
        return next(w for w in widths.values() if counts[w] == best)

    def _check_width(self, modality: str, path: Path, x: Tensor) -> None:
        dim = self.feature_dims[modality]
        if x.shape[1] == dim:
            return
        same = [p for p, w in self._widths.get(modality, {}).items() if w == dim]
        example = f" (e.g. {same[0]})" if same else ""
        raise DataError(
            f"feature file {path} has {x.shape[1]} columns; the other {len(same)} "
            f"{modality!r} file(s) have {dim}{example}: every array of a modality must have "
            "the same width; re-extract this file with the same extractor, or remove it and "
            "its trial"
        )

    def _file(self, video: str, modality: str) -> Path:
        names = [video]
        base = media_name(video)
        fallback = self.params.shared_media and base != video
        if fallback and shares_media(modality):
            names.append(base)
        tried = []
        for name in names:
            for suffix in _SUFFIXES:
                if self.params.layout == "by_modality":
                    p = self.dir / modality / f"{name}{suffix}"
                else:
                    p = self.dir / name / f"{modality}{suffix}"
                if p.is_file():
                    return p
                tried.append(str(p))
        listed = self.label_paths.get(video)
        drop = f", or remove its annotation file {listed}" if listed is not None else ""
        if fallback and not shares_media(modality):
            raise DataError(
                f"no {modality!r} features for trial {video!r}: expected {tried[0]} (or "
                f".safetensors); shared_media falls back to {base!r}'s array only for audio "
                "modalities (names starting with 'audio'), since "
                f"{base!r}'s {modality!r} features (e.g. a face) may be another person's: add "
                f"the trial's own file (a copy of {base!r}'s if it is the same person's){drop}"
            )
        raise DataError(
            f"no {modality!r} features for video {video!r}; looked for {tried[0]}{drop}"
        )

    @cached_property
    def annotation_sets(self) -> AnnotationSets:
        labels = self.params.labels.expanduser()
        try:  # explicit as an absolute path: a relative one would be read under its parent
            return find_annotation_sets(labels.parent, labels.absolute())
        except DataError:
            pass
        try:
            return find_annotation_sets(labels)
        except DataError as exc:
            if str(exc).startswith("several"):  # the affwild2 wording names its own param
                text = str(exc).replace("data.params.annotations", "data.params.labels")
                raise DataError(f"data.params.labels: {text}") from None
        raise DataError(
            f"data.params.labels: {labels} holds no Train_Set (or Training_Set) and "
            "Validation_Set folders, and none are found under it (in */VA_Estimation_Challenge "
            "or annotations/VA_Set); set data.params.labels to the folder that holds them"
        )

    @cached_property
    def label_paths(self) -> dict[str, Path]:
        """Trial -> annotation file, over the train and validation folders."""
        return partition_labels(self.annotation_sets)

    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "test") if self.params.test_list is not None else ("train", "val")

    def trials(self, split: str) -> list[str]:
        if split == "test" and self.params.test_list is not None:
            return self.test_trials
        if split in ("train", "val"):
            sets = self.annotation_sets
            train, val = fold_split(
                sorted(label_files(sets.train)),
                sorted(label_files(sets.val)),
                self.params.split.fold,
                self.params.split.chunks,
            )
            return train if split == "train" else val
        raise DataError(f"features dataset has no split {split!r}; splits: {self.splits()}")

    # ------------------------------------------------------------------ loading

    def _load(self, video: str, mismatches: list[str], compacted: list[str]) -> Video:
        labelled = video in self.label_paths
        lab = read_labels(self.label_paths[video]) if labelled else None
        paths = {m: self._file(video, m) for m in self.modalities}
        arrays = {m: read_array(p) for m, p in paths.items()}
        for m, x in arrays.items():
            self._check_width(m, paths[m], x)
        if lab is not None:
            n = lab.rows
        else:
            n = max(x.shape[0] for x in arrays.values())
        feats, present_by = {}, {}
        for m, x in arrays.items():
            path = paths[m]
            if self.params.rows == "labelled_frames" and lab is not None:
                keep = torch.from_numpy(lab.mask)
                if x.shape[0] != int(keep.sum()):
                    raise DataError(
                        f"{path} has {x.shape[0]} rows but {self.label_paths[video]} has "
                        f"{int(keep.sum())} labelled rows (rows: labelled_frames)"
                    )
                full = torch.full((n, x.shape[1]), float("nan"))
                full[keep] = x
                x = full
            elif x.shape[0] != n:
                short = self._check_rows(video, m, path, x.shape[0], n, lab)
                name = self._short_name(path)
                mismatches.append(f"{name} ({x.shape[0]} rows, {n} frames)")
                if short:
                    compacted.append(name)
                x = fit_rows(x, n, "edge")
            present = ~torch.isnan(x).any(dim=1)
            feats[m] = torch.where(present[:, None], x, torch.zeros(()))
            present_by[m] = present
        if lab is not None:
            labels, mask = torch.from_numpy(lab.values.copy()), torch.from_numpy(lab.mask.copy())
        else:
            labels, mask = torch.zeros(n, 2), torch.zeros(n, dtype=torch.bool)
        return Video(
            name=video,
            features=feats,
            labels=labels,
            label_mask=mask,
            frame_ids=torch.arange(n, dtype=torch.int64),
            present=present_by,
        )

    def _short_name(self, path: Path) -> str:
        """``<modality>/<video>.npy`` (or ``<video>/<modality>.npy``): the file and its
        modality, for messages."""
        try:
            return str(path.relative_to(self.dir))
        except ValueError:
            return str(path)

    def _check_rows(
        self, video: str, modality: str, path: Path, rows: int, n: int, lab: Labels | None
    ) -> bool:
        """Refuse an all_frames array more than :data:`ROW_TOLERANCE` rows off its trial's
        frames; returns whether it is short by exactly the number of ``-5`` label rows (the
        sign of a labelled_frames array)."""
        unlabelled = int((~lab.mask).sum()) if lab is not None else 0
        compacted = unlabelled > 0 and n - rows == unlabelled
        if abs(rows - n) <= ROW_TOLERANCE:
            return compacted
        against = (
            f"{lab.path} has {n} label rows"
            if lab is not None
            else f"trial {video!r} has {n} frames (its longest array)"
        )
        if compacted:
            fix = (
                f"it is short by exactly the {unlabelled} -5 rows of the labels, so it likely "
                "holds one row per labelled frame: set data.params.rows=labelled_frames"
            )
        else:
            fix = f"re-extract it with one row per frame ({n}), or remove the trial"
        raise DataError(
            f"{modality!r} feature file {path} has {rows} rows but {against}: more than "
            f"{ROW_TOLERANCE} rows apart (rows: all_frames pads or cuts up to {ROW_TOLERANCE} "
            f"rows), so its rows cannot be matched to frames; {fix}"
        )

    def videos(self, split: str) -> list[Video]:
        if split not in self._videos:
            mismatches: list[str] = []
            compacted: list[str] = []
            names = self.trials(split)
            self._videos[split] = [self._load(v, mismatches, compacted) for v in names]
            if split == "val":
                warn_shared_media("features", self.trials("train"), names, split, stacklevel=2)
            if mismatches:
                hint = ""
                if compacted:
                    hint = (
                        f"; {first_few(compacted, 8)} are short by exactly their number of -5 "
                        "label rows: if they hold one row per labelled frame, set "
                        "data.params.rows=labelled_frames"
                    )
                warnings.warn(
                    f"features: {len(mismatches)} array(s) differ in length from their labels "
                    f"by at most {ROW_TOLERANCE} rows (padded with the last row or cut): "
                    f"{first_few(mismatches, 8, '; ')}{hint}. Rows are matched to frames by index, "
                    "so an array must be at its video's frame rate: at another rate (e.g. 30 "
                    "against 29.97 fps) its rows drift from the labels, here by up to the "
                    "difference at the end; resample such arrays to the video's frames first",
                    stacklevel=2,
                )
        return list(self._videos[split])

    def submission_frames(self, split: str) -> dict[str, list[tuple[str, int]]]:
        """ABAW rows ``<video>/%05d.jpg``: with ``submission_template``, exactly the template's
        rows in its order (for ``test``, and for any split whose videos it names), checked
        against the split's videos; else one per frame of each video."""
        source = self.params.submission_template
        template = None if source is None else read_submission_template(source.expanduser())
        tests = self.params.test_list
        rows = template_rows(
            template,
            None if source is None else source.expanduser(),
            split,
            self.trials(split),
            None if tests is None else tests.expanduser(),
        )
        if rows is not None:
            return {video: list(r) for video, r in rows.items()}
        return {
            v.name: [(f"{v.name}/{k + 1:05d}.jpg", k) for k in range(v.num_frames)]
            for v in self.videos(split)
        }
