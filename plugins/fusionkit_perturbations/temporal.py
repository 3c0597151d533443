"""Temporal perturbations: a fixed shift of one modality, random per-video jitter, and dropped
(frozen) frames.

Sign convention (the same as the synthetic dataset's ``lag``): shifting a modality by ``+k``
makes its frame ``i`` show what the original showed at frame ``i - k``, i.e. that stream
arrives ``k`` frames late; ``-k`` makes it early. Frames shifted in from outside the video
repeat the first (or last) frame (edge padding), so the length never changes. Whether a frame
is present moves with it: a frame the data never had (a missing face, filled with 0) stays
absent where it lands.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fusionkit.plugin import (
    Params,
    Video,
    check_modalities,
    register,
    shift_index,
    stream_generator,
    with_features,
    with_moved_frames,
)

__all__ = [
    "FrameDrop",
    "FrameDropParams",
    "Jitter",
    "JitterParams",
    "Shift",
    "ShiftParams",
]

_MAX_SHIFT = 100_000


class ShiftParams(Params):
    """Params of ``shift``."""

    modality: str = Field("audio", description="the modality shifted against the others")
    k: int = Field(
        0,
        ge=-_MAX_SHIFT,
        le=_MAX_SHIFT,
        description="frames; +k: frame i shows original frame i-k (late), -k: early",
    )


@register(
    "perturbation",
    "shift",
    summary="shift one modality by k frames (+k: frame i shows i-k), edge-padded",
)
class Shift:
    """Shift one modality by ``k`` frames against the others (and the labels), edge-padded."""

    #: 2: presence moves with the frames (1: it stayed in place, so a missing frame moved onto
    #: a present one was z-scored to -mean / std)
    revision: ClassVar[int] = 2

    def __init__(self, params: ShiftParams) -> None:
        self.params = params

    def __call__(self, video: Video, generator: torch.Generator) -> Video:
        (m,) = check_modalities(video, [self.params.modality], "shift")
        if self.params.k == 0:
            return with_features(video, {})
        n = video.features[m].shape[0]
        return with_moved_frames(video, {m: shift_index(n, self.params.k)})


class JitterParams(Params):
    """Params of ``jitter``."""

    modality: str = Field("audio", description="the modality shifted against the others")
    max_k: int = Field(
        0, ge=0, le=_MAX_SHIFT, description="each video's shift is uniform in [-max_k, max_k]"
    )


@register(
    "perturbation",
    "jitter",
    summary="shift one modality of each video by a random k in [-max_k, max_k]",
)
class Jitter:
    """Shift one modality of each video by its own random ``k`` in ``[-max_k, max_k]``."""

    #: 2: presence moves with the frames (see ``shift``)
    revision: ClassVar[int] = 2

    def __init__(self, params: JitterParams) -> None:
        self.params = params

    def draw(self, generator: torch.Generator) -> int:
        """The shift of one video (uniform over the ``2 max_k + 1`` integers)."""
        m = self.params.max_k
        return int(torch.randint(-m, m + 1, (1,), generator=generator))

    def __call__(self, video: Video, generator: torch.Generator) -> Video:
        (m,) = check_modalities(video, [self.params.modality], "jitter")
        k = self.draw(generator)
        return with_moved_frames(video, {m: shift_index(video.features[m].shape[0], k)})


class FrameDropParams(Params):
    """Params of ``frame_drop``."""

    modalities: list[str] | None = Field(None, description="modalities affected (null: all)")
    p: float = Field(0.0, ge=0.0, lt=1.0, description="probability that a frame is dropped")


@register(
    "perturbation",
    "frame_drop",
    summary="drop frames with probability p; a dropped frame repeats the last one",
)
class FrameDrop:
    """Dropped frames: each frame after the first is lost with probability ``p``, independently
    per modality, and replaced by the last frame that arrived (a frozen frame), present where
    that frame was."""

    #: 2: a frozen frame is present where the frame it repeats was (see ``shift``)
    revision: ClassVar[int] = 2

    def __init__(self, params: FrameDropParams) -> None:
        self.params = params

    def __call__(self, video: Video, generator: torch.Generator) -> Video:
        sources = {}
        for m in check_modalities(video, self.params.modalities, "frame_drop"):
            n = video.features[m].shape[0]
            g = stream_generator(generator, m)
            kept = torch.rand(n, generator=g) >= self.params.p
            kept[:1] = True
            source = torch.where(kept, torch.arange(n), torch.zeros(n, dtype=torch.long))
            sources[m] = torch.cummax(source, dim=0).values
        return with_moved_frames(video, sources)
