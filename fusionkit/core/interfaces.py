"""Interfaces of the component kinds fusionkit composes.

A model is ``encoders -> fusion -> gate -> head``:

* **encoder** (one per modality): ``(B, T, F_m) -> (B, T, D_m)``.
* **fusion**: ``{modality: (B, T, D_m)} -> {stream: (B, T, S, D_s)}``, a *stack* of ``S``
  per-step features for each output stream. A fusion that produces one fused sequence returns
  one stream with ``S = 1``; a recursive fusion returns ``[X0, X1, ..., XN]`` (``S = N + 1``)
  per modality so that a gate can choose among the steps.
* **gate**: ``{stream: (B, T, S, D_s)} -> (B, T, D)`` plus the per-frame step weights
  ``{stream: (B, T, S)}`` it used (so they can be saved and plotted).
* **head**: ``(B, T, D) -> (B, T, n_targets)``.
* **dataset**: yields :class:`Video` records (per-frame features and labels).

``mask`` arguments are ``(B, T)`` boolean tensors, ``True`` on real frames and ``False`` on
padding. Components must not let padded frames change the output on real frames beyond
what their receptive field implies (padding sits at the end of a window).

Components are ``torch.nn.Module`` objects that also satisfy the protocols below; they are
built by the ``build`` function a plugin registers (see :mod:`fusionkit.core.registry`) with the
keyword arguments documented on each ``*Build`` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import Tensor

__all__ = [
    "CausalEncoder",
    "Dataset",
    "DatasetBuild",
    "Encoder",
    "EncoderBuild",
    "ExtractReport",
    "Extractable",
    "FeatureIdentity",
    "FrameLocal",
    "Fusion",
    "FusionBuild",
    "Gate",
    "GateBuild",
    "GateOutput",
    "Head",
    "HeadBuild",
    "MediaFeatures",
    "Perturbation",
    "PerturbationBuild",
    "StreamingEncoder",
    "SubmissionFrames",
    "Video",
    "ZScoreDefault",
]


@dataclass
class Video:
    """One video (trial) as a dataset delivers it.

    Attributes:
        name: unique id within the dataset (e.g. ``"118-30-640x480_left"``).
        features: modality -> ``(N, F_m)`` float tensor, row ``i`` is video frame ``i``.
        labels: ``(N, n_targets)`` float tensor (valence, arousal in [-1, 1]).
        label_mask: ``(N,)`` bool, ``False`` where a frame carries no label (never trained
            or scored on).
        fps: frames per second of this video.
        frame_ids: optional ``(N,)`` int tensor of the original frame numbers.
        present: modality -> ``(N,)`` bool, ``False`` on frames where the modality was not
            observed (no face crop, no audio track); a modality not listed is present on every
            frame. fusionkit warns about videos in which a modality is never present.
        flags: name -> ``(N,)`` bool, ``True`` on frames in a condition the dataset knows of
            (e.g. ``"audio unreliable"``). Not a model input: fusionkit saves the flags with
            the predictions and ``fusionkit report`` shades the flagged frames in its gate
            plots. Names are short plain text without ``/``.
    """

    name: str
    features: dict[str, Tensor]
    labels: Tensor
    label_mask: Tensor
    fps: float = 30.0
    frame_ids: Tensor | None = None
    present: dict[str, Tensor] = field(default_factory=dict)
    flags: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.labels.shape[0])


@runtime_checkable
class Dataset(Protocol):
    """A source of videos split into named partitions.

    Attributes:
        feature_dims: modality -> per-frame feature size ``F_m``.
        targets: names of the label columns, e.g. ``("valence", "arousal")``.

    Optional: ``zscore_by_default: bool`` (see :class:`ZScoreDefault`).
    """

    feature_dims: dict[str, int]
    targets: tuple[str, ...]

    def splits(self) -> tuple[str, ...]:
        """Names of the partitions this dataset provides (e.g. train, val, test)."""
        ...

    def videos(self, split: str) -> Sequence[Video]:
        """All videos of ``split``; raises :class:`fusionkit.core.errors.DataError` if unknown."""
        ...


@runtime_checkable
class ZScoreDefault(Protocol):
    """A dataset that says whether its features should be z-scored when the recipe leaves
    ``data.normalize: auto`` (extracted embeddings: yes; data already on a common scale: no).
    Datasets without it are z-scored."""

    zscore_by_default: bool


@runtime_checkable
class FeatureIdentity(Protocol):
    """A dataset whose features come from settings its data files do not show, e.g. an
    extractor and its weights: ``feature_identity()`` names them per modality (text that
    changes with them, such as a feature cache folder's name). A run records it at the end
    of training; ``eval``, ``predict``, ``stream`` and robustness sweeps refuse the run on
    data of another identity (features of another backbone fed to the run's model)."""

    def feature_identity(self) -> dict[str, str]: ...


class DatasetBuild(Protocol):
    def __call__(self, params: BaseModel) -> Dataset: ...


@runtime_checkable
class Encoder(Protocol):
    """Per-modality temporal encoder ``(B, T, F) -> (B, T, out_dim)``."""

    out_dim: int

    def __call__(self, x: Tensor, mask: Tensor) -> Tensor: ...


class EncoderBuild(Protocol):
    def __call__(self, params: BaseModel, *, in_dim: int, modality: str) -> Encoder: ...


@runtime_checkable
class CausalEncoder(Protocol):
    """An encoder whose output frame ``t`` depends on input frames ``t - receptive_field + 1
    .. t`` only. Streaming prediction then encodes each new frame from its receptive field."""

    out_dim: int
    receptive_field: int

    def __call__(self, x: Tensor, mask: Tensor) -> Tensor: ...


@runtime_checkable
class StreamingEncoder(Protocol):
    """A causal encoder with an O(1)-per-frame form (eval mode): a stream of :meth:`step` calls
    from :meth:`init_stream` equals ``forward`` on the whole sequence."""

    out_dim: int
    receptive_field: int

    def init_stream(self, batch: int, device: torch.device | str) -> Any:
        """The state before the first frame."""
        ...

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """One new frame ``(B, F)`` -> ``((B, out_dim), new state)``."""
        ...


@runtime_checkable
class FrameLocal(Protocol):
    """A fusion, gate or head that declares ``frame_local = True``: in eval mode its output
    frame ``t`` depends on its input frame ``t`` only. Streaming prediction then computes it for
    the newest frame alone; the conformance kit checks the claim."""

    frame_local: bool


@runtime_checkable
class NamedSteps(Protocol):
    """A fusion whose stacked steps have names (e.g. the modalities it stacks), in step order;
    the report labels the gate weights over the steps with them."""

    step_names: Sequence[str]


@runtime_checkable
class Fusion(Protocol):
    """``{modality: (B, T, D_m)} -> {stream: (B, T, S, D_s)}``.

    Attributes:
        out_dims: stream -> feature size ``D_s`` of its stack.
        num_steps: ``S``, the number of stacked steps (1 for a plain fusion).
        fixed_length: the only window length ``T`` the fusion accepts, or ``None``.

    Optional: :class:`FrameLocal`, :class:`NamedSteps`.
    """

    out_dims: dict[str, int]
    num_steps: int
    fixed_length: int | None

    def __call__(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]: ...


class FusionBuild(Protocol):
    def __call__(self, params: BaseModel, *, in_dims: dict[str, int]) -> Fusion: ...


@dataclass
class GateOutput:
    """What a gate returns.

    Attributes:
        features: ``(B, T, D)`` fused sequence handed to the head.
        weights: stream -> ``(B, T, S)`` non-negative per-frame weights over the steps.
    """

    features: Tensor
    weights: dict[str, Tensor]


@runtime_checkable
class Gate(Protocol):
    """``{stream: (B, T, S, D_s)} -> GateOutput`` with ``features`` of size ``out_dim``.

    Optional: :class:`FrameLocal`.
    """

    out_dim: int

    def __call__(self, stacks: dict[str, Tensor], mask: Tensor) -> GateOutput: ...


class GateBuild(Protocol):
    def __call__(self, params: BaseModel, *, in_dims: dict[str, int], num_steps: int) -> Gate: ...


@runtime_checkable
class Head(Protocol):
    """``(B, T, D) -> (B, T, n_targets)``.

    Optional: :class:`FrameLocal`.
    """

    def __call__(self, x: Tensor, mask: Tensor) -> Tensor: ...


class HeadBuild(Protocol):
    def __call__(self, params: BaseModel, *, in_dim: int, n_targets: int) -> Head: ...


@runtime_checkable
class Perturbation(Protocol):
    """A seeded, out-of-place corruption of one video (robustness tests, augmentation).

    Called as ``perturbation(video, generator)``; returns a **new** :class:`Video` and never
    writes into the tensors of ``video`` (unchanged tensors may be shared). All randomness must
    come from ``generator``, a ``torch.Generator`` that fusionkit seeds per video from
    ``(seed, perturbation name, video name)`` (see :func:`fusionkit.plugin.video_generator`),
    so a result does not depend on the order or the subset of videos perturbed.

    A perturbation class may set ``revision: ClassVar[int]`` (default 1) and raise it when a
    change makes the same params give other numbers: robustness results computed with
    another revision are recomputed, and reports leave them out.
    """

    def __call__(self, video: Video, generator: torch.Generator) -> Video: ...


class PerturbationBuild(Protocol):
    def __call__(self, params: BaseModel) -> Perturbation: ...


# --------------------------------------------------------------------------- optional protocols
# A dataset may implement these in addition to :class:`Dataset`; the core checks with
# ``isinstance`` and never requires them.


@dataclass
class ExtractReport:
    """What one feature-extraction pass did.

    Attributes:
        total: jobs considered (one per cache file).
        computed: jobs run because their cache was missing.
        refreshed: jobs re-run because their cache was stale or corrupt (label -> reason).
        skipped: jobs whose cache was already valid.
        failed: label -> error message (each message names the file it concerns).
        seconds: wall time of the pass.
        cache_dirs: the cache folders written (each has a ``manifest.json``).
    """

    total: int = 0
    computed: int = 0
    refreshed: dict[str, str] = field(default_factory=dict)
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cache_dirs: list[str] = field(default_factory=list)

    def add(self, other: ExtractReport) -> None:
        """Count ``other`` (another pass, e.g. another data setting of a grid) into this one."""
        self.total += other.total
        self.computed += other.computed
        self.refreshed.update(other.refreshed)
        self.skipped += other.skipped
        self.failed.update(other.failed)
        self.seconds += other.seconds
        self.cache_dirs += [d for d in other.cache_dirs if d not in self.cache_dirs]


@runtime_checkable
class Extractable(Protocol):
    """A dataset whose raw data must be turned into feature caches before training.

    ``fusionkit extract RECIPE`` calls :meth:`extract`; training then only reads the caches.
    """

    def extract(self, *, workers: int = 1, progress: bool = True) -> ExtractReport:
        """Compute every missing, stale or corrupt cache (valid ones are skipped).

        Args:
            workers: parallel worker processes.
            progress: show a progress display on stderr.
        """
        ...


@runtime_checkable
class MediaFeatures(Protocol):
    """A dataset that can turn one media file into the per-frame features its videos carry
    (``fusionkit stream RUN MEDIA`` uses it; caches are not involved)."""

    def media_features(self, path: Path) -> tuple[dict[str, Tensor], float]:
        """``({modality: (N, F_m)}, fps)`` of the file's video frames."""
        ...


@runtime_checkable
class SubmissionFrames(Protocol):
    """A dataset that knows the official per-frame rows of a prediction file.

    ``fusionkit predict`` writes one line per listed row, in order, with the prediction of the
    row's frame: the :class:`Video` row whose ``frame_ids`` entry is the last one ``<=`` that
    frame index. Frames past a video's end get its last prediction (padding); frames the list
    omits are not written (truncation).
    """

    def submission_frames(self, split: str) -> dict[str, list[tuple[str, int]]]:
        """Video name -> ``(row name, 0-based frame index)`` pairs, e.g.
        ``("<video>/00001.jpg", 0)``, in the order the file must list them."""
        ...
