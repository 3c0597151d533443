"""Applying perturbations: per-video seeding, out-of-place helpers and a dataset wrapper.

A perturbation is a registered component of kind ``perturbation`` (see
:class:`fusionkit.core.interfaces.Perturbation`). This module gives the pieces every perturbation
and every caller share (plugins reach the helpers through :mod:`fusionkit.plugin`):

* :func:`video_generator`: the ``torch.Generator`` of one video, seeded from
  ``(seed, perturbation name, video name)`` through a hash, so a video's draw depends neither
  on the order in which videos are perturbed nor on which other videos exist;
* :func:`with_features`, :func:`shift_index`, :func:`check_modalities`: out-of-place helpers;
* :class:`PerturbedDataset`: a :class:`~fusionkit.core.interfaces.Dataset` that hands out perturbed
  copies of another dataset's videos for some (or all) splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from fusionkit.core.errors import DataError
from fusionkit.core.interfaces import Dataset, Perturbation, Video
from fusionkit.core.recipe import PerturbationSpec
from fusionkit.core.registry import Registry, get_registry

__all__ = [
    "AppliedPerturbation",
    "PerturbedDataset",
    "build_perturbation",
    "check_modalities",
    "perturbation_revision",
    "shift_index",
    "stream_generator",
    "video_generator",
    "with_features",
    "with_moved_frames",
]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def video_generator(seed: int, perturbation: str, video: str) -> torch.Generator:
    """The generator a perturbation uses for one video."""
    return torch.Generator().manual_seed(derive_seed(seed, perturbation, video))


def stream_generator(generator: torch.Generator, stream: str) -> torch.Generator:
    """An independent generator for one modality of a video, derived from the video's own:
    what a modality draws does not depend on which other modalities are perturbed."""
    return torch.Generator().manual_seed(derive_seed(generator.initial_seed(), stream))


def with_features(
    video: Video, updates: dict[str, Tensor], absent: dict[str, Tensor] | None = None
) -> Video:
    """A new :class:`Video` whose features are ``video``'s with ``updates`` replacing some
    modalities. ``video`` is left untouched; the other tensors are shared, not copied.

    ``absent`` (modality -> ``(T,)`` bool) marks frames the perturbation removed: they are no
    longer ``present``, so z-scoring leaves a removed frame filled with 0 at 0, as it leaves a
    frame the data never had (a missing face), instead of turning it into ``-mean / std``.
    """
    present = dict(video.present)
    for m, gone in (absent or {}).items():
        was = present.get(m)
        keep = ~gone.bool()
        present[m] = keep if was is None else was.bool() & keep
    return dataclasses.replace(video, features={**video.features, **updates}, present=present)


def with_moved_frames(video: Video, sources: dict[str, Tensor]) -> Video:
    """A new :class:`Video` in which frame ``i`` of each modality ``m`` of ``sources`` shows
    frame ``sources[m][i]`` of ``video`` (``(T,)`` long, e.g. :func:`shift_index`), and is
    present where that frame was: a frame the data never had (a missing face, filled with 0)
    stays absent wherever it moves, so z-scoring keeps it at 0. ``video`` is left untouched.
    """
    present = dict(video.present)
    for m, index in sources.items():
        if m in present:
            present[m] = present[m][index]
    moved = {m: video.features[m][index] for m, index in sources.items()}
    return dataclasses.replace(video, features={**video.features, **moved}, present=present)


def check_modalities(video: Video, wanted: Iterable[str] | None, who: str) -> list[str]:
    """The modalities to perturb (``None``: all of the video's), each checked to exist."""
    if wanted is None:
        return sorted(video.features)
    names = list(wanted)
    missing = [m for m in names if m not in video.features]
    if missing:
        raise DataError(
            f"perturbation {who}: video {video.name!r} has no modality {missing[0]!r} "
            f"(it has: {', '.join(sorted(video.features))}); fix the perturbation's "
            "`modality`/`modalities` param"
        )
    return names


def shift_index(num_frames: int, k: int) -> Tensor:
    """Source row of every frame when a stream is shifted by ``k`` frames, edge-padded.

    Frame ``i`` of the shifted stream shows frame ``clamp(i - k, 0, n - 1)`` of the original:
    ``k > 0`` delays the stream (it shows the past; the first ``k`` frames repeat frame 0),
    ``k < 0`` advances it (the last ``|k|`` frames repeat the last frame).

    >>> shift_index(5, 2).tolist()
    [0, 0, 0, 1, 2]
    >>> shift_index(5, -2).tolist()
    [2, 3, 4, 4, 4]
    """
    return (torch.arange(num_frames) - k).clamp(0, max(num_frames - 1, 0))


@dataclass(frozen=True)
class AppliedPerturbation:
    """A built perturbation with the name, params and seed it is recorded under."""

    name: str
    params: BaseModel
    seed: int
    fn: Perturbation

    def __call__(self, video: Video) -> Video:
        tensors = [*video.features.values(), video.labels, video.label_mask,
                   *video.present.values()]  # fmt: skip
        versions = [t._version for t in tensors]  # bumped by every in-place write
        out = self.fn(video, video_generator(self.seed, self.name, video.name))
        if any(t._version != v for t, v in zip(tensors, versions, strict=True)):
            raise DataError(
                f"perturbation {self.name!r} wrote into the tensors of video {video.name!r} it "
                "was given, which belong to the dataset (every later use of the video would see "
                "the change): return a new Video with new tensors (plugin.with_features)"
            )
        if not isinstance(out, Video):
            raise DataError(
                f"perturbation {self.name!r} returned {type(out).__name__}, not a Video"
            )
        if out.num_frames != video.num_frames:
            raise DataError(
                f"perturbation {self.name!r} changed video {video.name!r} from "
                f"{video.num_frames} to {out.num_frames} frames; perturbations keep the length"
            )
        cut = {m: int(x.shape[0]) for m, x in out.features.items() if x.shape[0] != out.num_frames}
        if cut:
            got = ", ".join(f"{m} to {n}" for m, n in sorted(cut.items()))
            raise DataError(
                f"perturbation {self.name!r} changed the features of video {video.name!r} "
                f"({got} frames; the video has {video.num_frames}); perturbations keep the length"
            )
        return out

    def record(self) -> dict[str, Any]:
        """What results files store about this perturbation."""
        return {"name": self.name, "params": self.params.model_dump(mode="json"), "seed": self.seed}


def perturbation_revision(name: str, registry: Registry | None = None) -> int:
    """The ``revision`` a registered perturbation declares (1 when it declares none): on the
    registered class, on the build function, or on the class a build function's return
    annotation names (``def build(params) -> MyPerturbation``)."""
    build = (registry or get_registry()).get("perturbation", name).build
    revision = getattr(build, "revision", None)
    if revision is None and not isinstance(build, type):
        try:
            returned = typing.get_type_hints(build).get("return")
        except Exception:  # an annotation that does not resolve: nothing declared there
            returned = None
        revision = getattr(returned, "revision", None)
    return revision if isinstance(revision, int) and not isinstance(revision, bool) else 1


def build_perturbation(
    spec: PerturbationSpec, registry: Registry | None = None, where: str = "perturbation"
) -> AppliedPerturbation:
    """Build a validated perturbation spec."""
    registry = registry or get_registry()
    fn = registry.build("perturbation", spec.name, spec.params, where=where)
    return AppliedPerturbation(spec.name, spec.params, spec.seed, fn)


class PerturbedDataset:
    """Perturbed copies of another dataset's videos.

    Args:
        base: the dataset to wrap (never modified).
        perturbations: applied in order to every video of the perturbed splits.
        splits: the splits to perturb (``None``: all); the others pass through unchanged.
    """

    def __init__(
        self,
        base: Dataset,
        perturbations: Sequence[AppliedPerturbation],
        splits: Iterable[str] | None = None,
    ) -> None:
        self.base = base
        self.perturbations = list(perturbations)
        self.only = None if splits is None else set(splits)
        self.feature_dims = dict(base.feature_dims)
        self.targets = tuple(base.targets)
        self._cache: dict[str, list[Video]] = {}

    def splits(self) -> tuple[str, ...]:
        return tuple(self.base.splits())

    def videos(self, split: str) -> Sequence[Video]:
        videos = self.base.videos(split)
        if self.only is not None and split not in self.only:
            return videos
        if split not in self._cache:
            out = []
            for v in videos:
                for p in self.perturbations:
                    v = p(v)
                out.append(v)
            self._cache[split] = out
        return self._cache[split]
