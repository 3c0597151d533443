"""The generic ``features`` dataset: per-video feature arrays made by any extractor plus label
files in the Aff-Wild2 text format (``valence,arousal`` header, one row per frame, ``-5``).

Arrays are ``.npy`` (read without pickle) or ``.safetensors`` (the tensor ``features``, or
the only tensor), shaped ``(frames, dim)``, in either layout:

* ``by_modality``: ``<features_dir>/<modality>/<video>.npy``
* ``by_video``: ``<features_dir>/<video>/<modality>.npy``

With ``rows: all_frames`` row ``k`` is frame ``k``; an array a few rows shorter or longer
than the labels is padded with its last row or cut, with a warning. With
``rows: labelled_frames`` (the released compacted format) the array has one row per label row
that is not ``-5``, and the rows are put back on their frames (zeros elsewhere). Rows that
contain NaN count as missing: zeros, and ``present[<modality>]`` False.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from fusionkit.plugin import DataError, Video
from fusionkit_affwild2.dataset import fit_rows
from fusionkit_affwild2.layout import (
    AnnotationSets,
    find_annotation_sets,
    fold_split,
    label_files,
    media_name,
    read_labels,
    read_name_list,
)
from fusionkit_affwild2.params import FeaturesParams

__all__ = ["FeaturesDataset", "read_array"]

_SUFFIXES = (".npy", ".safetensors")


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
                        f"{path} holds tensors {keys[:5]}; name the feature tensor 'features'"
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
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read feature file {path}: {exc}") from None
        return 1 if arr.ndim == 1 else int(arr.shape[1])
    return int(read_array(path).shape[1])


class FeaturesDataset:
    """Ready-made per-frame features with Aff-Wild2-format labels; see the module docstring."""

    targets: tuple[str, ...] = ("valence", "arousal")

    def __init__(self, params: FeaturesParams) -> None:
        self.params = params
        self.dir = params.features_dir.expanduser()
        if not self.dir.is_dir():
            raise DataError(f"features_dir {self.dir} does not exist or is not a folder")
        self.modalities = params.modalities or self._discover()
        if not self.modalities:
            raise DataError(f"no feature arrays (.npy/.safetensors) found in {self.dir}")
        self.feature_dims: dict[str, int] = {m: self._dim(m) for m in self.modalities}
        self._videos: dict[str, list[Video]] = {}

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
        return _array_dim(files[0])

    def _file(self, video: str, modality: str) -> Path:
        names = [video]
        if self.params.shared_media and media_name(video) != video:
            names.append(media_name(video))
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
        raise DataError(f"no {modality!r} features for video {video!r}; looked for {tried[0]}")

    @cached_property
    def annotation_sets(self) -> AnnotationSets:
        labels = self.params.labels.expanduser()
        try:
            return find_annotation_sets(labels.parent, labels)
        except DataError:
            return find_annotation_sets(labels)

    @cached_property
    def label_paths(self) -> dict[str, Path]:
        sets = self.annotation_sets
        return {**label_files(sets.train), **label_files(sets.val)}

    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "test") if self.params.test_list is not None else ("train", "val")

    def trials(self, split: str) -> list[str]:
        if split == "test" and self.params.test_list is not None:
            return read_name_list(self.params.test_list.expanduser())
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

    def _load(self, video: str, mismatches: list[str]) -> Video:
        labelled = video in self.label_paths
        lab = read_labels(self.label_paths[video]) if labelled else None
        paths = {m: self._file(video, m) for m in self.modalities}
        arrays = {m: read_array(p) for m, p in paths.items()}
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
                mismatches.append(f"{path.name} ({x.shape[0]} rows, {n} frames)")
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

    def videos(self, split: str) -> list[Video]:
        if split not in self._videos:
            mismatches: list[str] = []
            self._videos[split] = [self._load(v, mismatches) for v in self.trials(split)]
            if mismatches:
                warnings.warn(
                    f"features: {len(mismatches)} array(s) differ in length from their labels "
                    f"(padded with the last row or cut): {'; '.join(mismatches[:8])}",
                    stacklevel=2,
                )
        return list(self._videos[split])

    def submission_frames(self, split: str) -> dict[str, list[tuple[str, int]]]:
        return {
            v.name: [(f"{v.name}/{k + 1:05d}.jpg", k) for k in range(v.num_frames)]
            for v in self.videos(split)
        }
