"""Windowing of videos into fixed-length training/evaluation windows.

All frames of a split are concatenated once into ``(N_total, F_m)`` tensors (kept on the
training device); a window is an ``(offset, start)`` pair into them, and a batch is gathered
with one indexing operation, so no per-frame or per-window Python work happens per step.

Everything a dataset delivers passes through :class:`FrameStore`, so this is where data is
checked once: non-finite features or labels are an error naming the video and modality, and
a video in which a modality is never present is reported with a :class:`DataWarning`.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fusionkit.core.errors import DataError
from fusionkit.core.interfaces import Video
from fusionkit.core.params import first_few

__all__ = [
    "AbsentModalityWarning",
    "Batch",
    "DataWarning",
    "FrameStore",
    "Normalizer",
    "features_sha256",
    "labels_fingerprint",
    "window_starts",
]

#: how many bytes of features one hashing slice copies at most (bounded memory on GPUs)
_HASH_SLICE_BYTES = 64 * 2**20
#: metadata key of normalization.safetensors that records how absent frames are normalised
ABSENT_KEY = "absent_rows"


def _hash_rows(h: Any, x: Tensor) -> None:
    """Feed ``x``'s values to ``h`` in slices of bounded size (bounded copies off a GPU)."""
    rows = max(1, _HASH_SLICE_BYTES // max(1, x[:1].numel() * x.element_size()))
    for i in range(0, x.shape[0], rows):
        h.update(x[i : i + rows].cpu().contiguous().numpy().tobytes())


def features_sha256(videos: Sequence[Video], modalities: Sequence[str]) -> str:
    """SHA-256 of a split's model inputs as the dataset delivers them: each video's name and,
    per modality, its features (as float32) and presence mask. Taken before z-scoring, so it
    is the same on every device; features extracted anew change it, labels do not
    (:func:`labels_fingerprint` holds those)."""
    h = hashlib.sha256()
    for v in videos:
        h.update(f"{v.name}\t{v.num_frames}\n".encode())
        for m in sorted(modalities):
            x = v.features[m].float()
            h.update(f"{m}\t{tuple(x.shape)}\n".encode())
            _hash_rows(h, x)
            present = v.present.get(m)
            if present is not None:
                h.update(present.bool().cpu().numpy().tobytes())
    return h.hexdigest()


def labels_fingerprint(videos: Sequence[Video], target_columns: Sequence[int]) -> str:
    """SHA-256 of what evaluation on a split compares against: video names and lengths, which
    frames are labelled and their targets (the ``target_columns`` of the labels, as float32;
    unlabelled frames count as 0). Features do not enter (:func:`features_sha256` holds them),
    so runs of other encoders or extractors on the same annotations compare."""
    h = hashlib.sha256()
    for v in videos:
        h.update(f"{v.name}\t{v.num_frames}\n".encode())
    for v in videos:
        h.update(v.label_mask.bool().cpu().numpy().tobytes())
    cols = list(target_columns)
    for v in videos:
        y = torch.where(v.label_mask.bool()[:, None], v.labels[:, cols].float(), 0.0)
        h.update(y.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class DataWarning(UserWarning):
    """Data that trains but probably not as intended (e.g. a modality absent from a video)."""


class AbsentModalityWarning(DataWarning):
    """Videos in which a modality is never present (expected where a perturbation removes
    it: robustness sweeps do not show it)."""


def _check_finite(v: Video, what: str, x: Tensor, where: str) -> None:
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).reshape(x.shape[0], -1).any(dim=1).nonzero()
    raise DataError(
        f"{where}: video {v.name!r} has non-finite {what} ({int((~finite).sum())} values, first "
        f"at frame {int(bad[0])}); fix the data, or the perturbation that produced it"
    )


@dataclass
class Normalizer:
    """Per-modality z-scoring: ``(x - mean) / std`` per feature dimension, with statistics of
    the training split only (frames where a modality is present), applied identically to
    every split, to predictions and to streaming input. In a split (:class:`FrameStore`),
    absent frames filled with zeros (no face, a missing row) stay zero.

    Attributes:
        mean, std: modality -> ``(F_m,)``. A dimension that is constant on the training
            split (std below ``eps``) gets std 1: it is only centred, so a small value in
            another split is not multiplied by ``1/eps``.
    """

    mean: dict[str, Tensor]
    std: dict[str, Tensor]
    eps: float = 1e-6
    #: absent zero-filled frames stay zero (False: they are z-scored like any frame, as runs
    #: of versions before this rule do, whose statistics files lack :data:`ABSENT_KEY`)
    absent_stay_zero: bool = True

    @classmethod
    def fit(cls, videos: Sequence[Video], modalities: Sequence[str]) -> Normalizer:
        """Statistics over every present frame of ``videos``, checked by :func:`check_video`
        (float64 sums: exact enough for any split size)."""
        mean, std = {}, {}
        for m in modalities:
            total, sq, n = None, None, 0
            for v in videos:
                x = v.features[m].double()
                present = v.present.get(m)
                if present is not None:  # bool (N,): see check_video
                    x = x[present]
                total = x.sum(0) if total is None else total + x.sum(0)
                sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
                n += x.shape[0]
            if n == 0 or total is None or sq is None:
                raise DataError(f"feature normalisation: no frame of the training split has {m}")
            mu = total / n
            sd = (sq / n - mu * mu).clamp(min=0.0).sqrt()
            constant = sd < cls.eps
            if bool(constant.any()):
                dims = constant.nonzero().flatten().tolist()
                warnings.warn(
                    f"feature normalisation: {len(dims)} of {sd.numel()} {m} dimension(s) are "
                    f"constant on the training split (e.g. {', '.join(map(str, dims[:5]))}); "
                    "they are centred, not scaled",
                    DataWarning,
                    stacklevel=2,
                )
            mean[m], std[m] = mu.float(), torch.where(constant, 1.0, sd).float()
        return cls(mean, std)

    def apply(self, modality: str, x: Tensor, present: Tensor | None = None) -> Tensor:
        """``(x - mean) / std`` over the last axis. With ``present`` (``x.shape[:-1]`` bool),
        absent frames whose features are all zero (how datasets fill a missing face or row;
        the statistics leave them out) stay zero, the neutral value after z-scoring, instead
        of becoming a large ``-mean / std`` row. Absent frames filled otherwise (the previous
        face) and present frames, zeros included, are z-scored like any other."""
        mean = self.mean[modality].to(x.device)
        std = self.std[modality].to(x.device).clamp(min=self.eps)
        z = (x - mean) / std
        if present is None or not self.absent_stay_zero:
            return z
        keep = ~present.to(x.device).bool() & (x == 0).all(dim=-1)
        return torch.where(keep[..., None], torch.zeros_like(z), z)

    def tensors(self) -> dict[str, Tensor]:
        out = {f"mean/{m}": t for m, t in self.mean.items()}
        out.update({f"std/{m}": t for m, t in self.std.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, str]) -> Normalizer:
        """Statistics saved by :meth:`tensors` and :meth:`metadata`."""
        mean = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("mean/")}
        std = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("std/")}
        if not mean or set(mean) != set(std):
            raise DataError("feature normalisation statistics are incomplete")
        return cls(mean, std, absent_stay_zero=meta.get(ABSENT_KEY) == "zero")

    def metadata(self) -> dict[str, str]:
        return {ABSENT_KEY: "zero" if self.absent_stay_zero else "normalised"}


def window_starts(num_frames: int, window: int, hop: int) -> list[int]:
    """Start frames of the windows covering ``num_frames``: ``0, hop, ...`` and a last window
    aligned to the end (as released). A video shorter than ``window`` gets one padded window.

    >>> window_starts(700, 300, 200)
    [0, 200, 400]
    >>> window_starts(750, 300, 200)
    [0, 200, 400, 450]
    """
    if num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window + 1, hop))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


@dataclass
class Batch:
    """A batch of windows.

    Attributes:
        inputs: modality -> ``(B, T, F_m)``.
        mask: ``(B, T)`` bool, True on real (non-padded) frames.
        targets: ``(B, T, n_targets)``.
        target_mask: ``(B, T)`` bool, True where a label exists (and the frame is real).
        frame_index: ``(B, T)`` long index into the store's concatenated frames (-1 on padding).
    """

    inputs: dict[str, Tensor]
    mask: Tensor
    targets: Tensor
    target_mask: Tensor
    frame_index: Tensor


def _check_present(v: Video, m: str, present: Tensor, where: str) -> None:
    """Refuse a presence mask that is not bool ``(N,)``."""
    if present.dtype != torch.bool or tuple(present.shape) != (v.num_frames,):
        raise DataError(
            f"{where}: video {v.name!r}: present[{m!r}] is {present.dtype} "
            f"{tuple(present.shape)}, expected bool ({v.num_frames},)"
        )


def check_video(
    v: Video,
    modalities: Sequence[str],
    target_columns: Sequence[int],
    where: str,
    dims: Mapping[str, int] | None = None,
) -> None:
    """Refuse a video whose labels, features (of the widths in ``dims``, when given),
    presence masks, frame rate or flags a store cannot use, naming the video and what is
    wrong."""
    labels, keep = v.labels, v.label_mask
    if labels.dim() != 2 or labels.shape[1] <= max(target_columns, default=-1):
        raise DataError(
            f"{where}: video {v.name!r}: labels are {tuple(labels.shape)}, expected (N, "
            f"{max(target_columns, default=-1) + 1} or more): one row per frame, one column per "
            "target of the dataset"
        )
    if keep.dtype != torch.bool or tuple(keep.shape) != (v.num_frames,):
        raise DataError(
            f"{where}: video {v.name!r}: label_mask is {keep.dtype} {tuple(keep.shape)}, "
            f"expected bool ({v.num_frames},)"
        )
    if not (isinstance(v.fps, int | float) and math.isfinite(v.fps) and v.fps > 0):
        raise DataError(f"{where}: video {v.name!r}: fps is {v.fps!r}, expected a number > 0")
    for m in modalities:
        if m not in v.features:
            raise DataError(
                f"video {v.name!r} has no {m!r} features (has: {sorted(v.features)}); "
                "the recipe's model.encoders must name modalities the dataset provides"
            )
        x = v.features[m]
        width = None if dims is None else dims.get(m)
        if x.dim() != 2 or x.shape[0] != v.num_frames or width not in (None, x.shape[1]):
            want = "F" if width is None else f"{width}, the dataset's feature_dims[{m!r}]"
            raise DataError(
                f"{where}: video {v.name!r}: {m} features are {tuple(x.shape)}, "
                f"expected ({v.num_frames}, {want}): one row per labelled frame"
            )
        _check_finite(v, f"{m} features", x, where)
        present = v.present.get(m)
        if present is not None:
            _check_present(v, m, present, where)
    labels = labels[:, list(target_columns)]
    # unlabelled frames may hold anything (they are never read); labelled ones must be finite,
    # and are named by their frame, not their index among the labelled frames
    _check_finite(v, "labels", torch.where(v.label_mask.bool()[:, None], labels, 0.0), where)
    for flag, on in v.flags.items():
        if not isinstance(flag, str) or not flag or "/" in flag or len(flag) > 64:
            raise DataError(
                f"{where}: video {v.name!r}: flag name {flag!r} must be 1-64 characters without '/'"
            )
        if on.dtype != torch.bool or tuple(on.shape) != (v.num_frames,):
            raise DataError(
                f"{where}: video {v.name!r}: flags[{flag!r}] is {on.dtype} "
                f"{tuple(on.shape)}, expected bool ({v.num_frames},)"
            )


#: the range of valence and arousal annotations; labels beyond it are warned about
LABEL_RANGE = (-1.0, 1.0)


def _warn_out_of_range(labelled: Tensor, columns: list[int], where: str) -> None:
    """Warn when labelled frames (``(N, C)``) hold values outside :data:`LABEL_RANGE`: most
    often a dataset's "no annotation" marker (Aff-Wild2 writes -5) left unmasked, which the
    model would then be trained and scored on."""
    lo, hi = LABEL_RANGE
    outside = (labelled < lo) | (labelled > hi)
    if not bool(outside.any()):
        return
    counts = outside.sum(0).tolist()
    parts = [
        f"column {c}: {k} frame(s), from {labelled[:, j].min().item():g} to "
        f"{labelled[:, j].max().item():g}"
        for j, (c, k) in enumerate(zip(columns, counts, strict=True))
        if k
    ]
    warnings.warn(
        f"{where}: labelled frames hold values outside [{lo:g}, {hi:g}] ({'; '.join(parts)}); "
        "valence and arousal lie in that range, so these are probably an unannotated-frame "
        "marker (Aff-Wild2 writes -5) the dataset did not mask (label_mask False), or labels "
        "on another scale: check the dataset, since training and CCC use these values as given",
        DataWarning,
        stacklevel=3,
    )


class FrameStore:
    """The frames of one split, concatenated, plus the window table over them."""

    def __init__(
        self,
        videos: Sequence[Video],
        modalities: Sequence[str],
        target_columns: Sequence[int],
        window: int,
        hop: int,
        device: torch.device | str = "cpu",
        where: str = "dataset",
        normalizer: Normalizer | None = None,
        dims: Mapping[str, int] | None = None,
    ) -> None:
        if not videos:
            raise DataError(f"{where} has no videos")
        repeated = sorted(n for n, k in Counter(v.name for v in videos).items() if k > 1)
        if repeated:
            raise DataError(
                f"{where}: video names must be unique within a split (predictions and reports "
                f"are kept per name); repeated: {first_few(repeated)}"
            )
        #: what the split is, for messages (e.g. ``dataset 'x' split 'val'``)
        self.where = where
        self.names = [v.name for v in videos]
        self.lengths = torch.tensor([v.num_frames for v in videos], dtype=torch.long)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.window = window
        feats: dict[str, list[Tensor]] = {m: [] for m in modalities}
        shown: dict[str, list[Tensor]] = {m: [] for m in modalities}  # present frames
        absent: dict[str, list[str]] = {}
        for v in videos:
            check_video(v, modalities, target_columns, where, dims)
            for m in modalities:
                present = v.present.get(m)
                if present is not None and not bool(present.any()):
                    absent.setdefault(m, []).append(v.name)
                feats[m].append(v.features[m].float())
                shown[m].append(
                    torch.ones(v.num_frames, dtype=torch.bool) if present is None else present
                )
        for m, names in absent.items():
            warnings.warn(
                f"{where}: {len(names)} of {len(videos)} videos have no {m} at all (e.g. "
                f"{', '.join(names[:3])}); the model sees only constant {m} features there",
                AbsentModalityWarning,
                stacklevel=2,
            )
        self.features = {m: torch.cat(xs).to(device) for m, xs in feats.items()}
        if normalizer is not None:
            self.features = {
                m: normalizer.apply(m, x, torch.cat(shown[m])) for m, x in self.features.items()
            }
        cols = list(target_columns)
        self.target_mask = torch.cat([v.label_mask.bool() for v in videos]).to(device)
        # unlabelled rows may hold anything (NaN for "no annotation"): stored as 0, so that no
        # masked product (NaN * 0 = NaN) reaches a loss, a metric or a predictions file
        targets = torch.cat([v.labels[:, cols].float() for v in videos]).to(device)
        self.targets = torch.where(self.target_mask[:, None], targets, 0.0)
        labelled = self.targets[self.target_mask]
        if labelled.shape[0] > 1:  # a constant target: CCC is only a distance, PCC undefined
            spread = (labelled.amax(0) - labelled.amin(0)).tolist()
            flat = [j for j, s in enumerate(spread) if s == 0]
            if flat:
                warnings.warn(
                    f"{where}: label column(s) {[cols[j] for j in flat]} hold one value on "
                    f"every labelled frame ({labelled.shape[0]} frames): CCC there measures "
                    "only how far the predictions are from it, and PCC is undefined (reported "
                    "as 0); check the labels of this split",
                    stacklevel=2,
                )
        _warn_out_of_range(labelled, cols, where)
        self._fingerprint = labels_fingerprint(videos, cols)
        names = sorted({f for v in videos for f in v.flags})
        #: flag name -> (total frames,) bool on the CPU (False on videos without the flag)
        self.flags = {
            f: torch.cat(
                [v.flags.get(f, torch.zeros(v.num_frames, dtype=torch.bool)) for v in videos]
            )
            for f in names
        }
        starts, vids = [], []
        for i, v in enumerate(videos):
            s = window_starts(v.num_frames, window, hop)
            starts.extend(s)
            vids.extend([i] * len(s))
        self.win_video = torch.tensor(vids, dtype=torch.long)
        self.win_start = torch.tensor(starts, dtype=torch.long)
        self.device = torch.device(device)
        self._arange = torch.arange(window, device=self.device)
        # Index tables on the device too, so that gathering a batch is device-side only.
        self._dev = {
            "video": self.win_video.to(self.device),
            "start": self.win_start.to(self.device),
            "length": self.lengths.to(self.device),
            "offset": self.offsets.to(self.device),
        }

    def fingerprint(self) -> str:
        """:func:`labels_fingerprint` of the split: two runs evaluated on stores with equal
        fingerprints can be compared video by video."""
        return self._fingerprint

    def content_sha256(self) -> str:
        """SHA-256 of everything training reads from this split: :meth:`fingerprint` plus every
        (normalised) feature value, hashed in slices of bounded size. A resumed run compares it
        with the one its first epochs were trained on."""
        h = hashlib.sha256(self.fingerprint().encode())
        for m, x in sorted(self.features.items()):
            h.update(f"{m}\t{tuple(x.shape)}\t{x.dtype}\n".encode())
            _hash_rows(h, x)
        return h.hexdigest()

    @property
    def num_windows(self) -> int:
        return int(self.win_video.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.targets.shape[0])

    def video_slice(self, i: int) -> slice:
        off = int(self.offsets[i])
        return slice(off, off + int(self.lengths[i]))

    def batch(self, windows: Tensor) -> Batch:
        """Gather windows (indices into the window table) into a padded :class:`Batch`.

        ``windows`` may live on the CPU or, to avoid a host-to-device copy per step, on the
        store's device.
        """
        windows = windows.to(self.device, non_blocking=True)
        vid = self._dev["video"][windows]
        start = self._dev["start"][windows]
        length = self._dev["length"][vid]
        offset = self._dev["offset"][vid]
        pos = start[:, None] + self._arange[None, :]
        mask = pos < length[:, None]
        flat = torch.where(mask, offset[:, None] + pos, torch.zeros_like(pos))
        inputs = {
            m: torch.where(
                mask[..., None], x[flat], torch.zeros((), dtype=x.dtype, device=x.device)
            )
            for m, x in self.features.items()
        }
        targets = torch.where(
            mask[..., None], self.targets[flat], torch.zeros((), device=self.device)
        )
        target_mask = mask & self.target_mask[flat]
        frame_index = torch.where(mask, flat, torch.full_like(flat, -1))
        return Batch(inputs, mask, targets, target_mask, frame_index)
