"""Signal perturbations: additive noise at a given SNR, whole-modality dropout and dropout of
spans of frames."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from fusionkit.plugin import (
    Params,
    Video,
    check_modalities,
    register,
    stream_generator,
    with_features,
)

__all__ = [
    "ModalityDropout",
    "ModalityDropoutParams",
    "Noise",
    "NoiseParams",
    "SpanDropout",
    "SpanDropoutParams",
]


class NoiseParams(Params):
    """Params of ``noise``."""

    modalities: list[str] | None = Field(None, description="modalities affected (null: all)")
    snr_db: float = Field(
        20.0, ge=-60.0, le=120.0, description="signal-to-noise ratio in dB, per video and modality"
    )


@register(
    "perturbation", "noise", summary="additive Gaussian noise at snr_db per video and modality"
)
class Noise:
    """Additive white Gaussian noise at a given SNR, on the frames where the modality is present.

    Per video and modality, the signal power is the variance of each feature dimension over
    the present frames, averaged over the dimensions, ``P = mean_d var_t(x[t, d])`` (a constant
    offset is not signal: after z-scoring it is gone), and the noise is i.i.d.
    ``N(0, P / 10**(snr_db/10))`` on those frames. Frames where the modality is absent keep
    their features; a stream with ``P = 0`` is left as is.
    """

    #: 2: the power is the variance over present frames (1: the mean square over all frames,
    #: with noise on absent frames too)
    revision: ClassVar[int] = 2

    def __init__(self, params: NoiseParams) -> None:
        self.params = params

    def __call__(self, video: Video, generator: torch.Generator) -> Video:
        updates = {}
        for m in check_modalities(video, self.params.modalities, "noise"):
            x = video.features[m]
            present = video.present.get(m)
            seen = x if present is None else x[present.bool()]
            power = float(seen.double().var(0, unbiased=False).mean()) if len(seen) > 1 else 0.0
            std = math.sqrt(power / 10 ** (self.params.snr_db / 10))
            noise = std * torch.randn(x.shape, generator=stream_generator(generator, m))
            if present is not None:
                noise = noise * present.reshape((-1,) + (1,) * (x.dim() - 1))
            updates[m] = x + noise.to(x.dtype)
        return with_features(video, updates)


class ModalityDropoutParams(Params):
    """Params of ``modality_dropout``."""

    modalities: list[str] | None = Field(None, description="modalities affected (null: all)")
    p: float = Field(1.0, ge=0.0, le=1.0, description="probability per video and modality")
    fill: float = Field(0.0, description="value of every feature of a dropped modality")


@register(
    "perturbation",
    "modality_dropout",
    summary="remove a whole modality (all frames = fill) with probability p",
)
class ModalityDropout:
    """Whole-modality absence: with probability ``p`` (independently per video and modality)
    every frame of the modality is set to ``fill`` (in the units of the features as read) and
    marked absent, so that z-scoring keeps a fill of 0 at 0, as for a frame without a face."""

    #: 2: dropped frames are marked absent (1: they stayed present, and z-scoring turned a
    #: fill of 0 into -mean / std)
    revision: ClassVar[int] = 2

    def __init__(self, params: ModalityDropoutParams) -> None:
        self.params = params

    def __call__(self, video: Video, generator: torch.Generator) -> Video:
        updates, absent = {}, {}
        for m in check_modalities(video, self.params.modalities, "modality_dropout"):
            x = video.features[m]
            if float(torch.rand((), generator=stream_generator(generator, m))) < self.params.p:
                updates[m] = torch.full_like(x, self.params.fill)
                absent[m] = torch.ones(x.shape[0], dtype=torch.bool)
        return with_features(video, updates, absent)


class SpanDropoutParams(Params):
    """Params of ``span_dropout``."""

    modalities: list[str] | None = Field(None, description="modalities affected (null: all)")
    rate: float = Field(0.0, ge=0.0, le=1.0, description="fraction of frames dropped")
    span: int = Field(30, ge=1, le=100_000, description="frames per dropped span")
    same_spans: bool = Field(False, description="drop the same frames in every modality")
    fill: float = Field(0.0, description="value of the features of dropped frames")


@register(
    "perturbation",
    "span_dropout",
    summary="set a fraction `rate` of frames, in spans of `span` frames, to fill",
)
class SpanDropout:
    """Missing spans of frames: exactly ``round(rate * n)`` of the ``n`` frames (halves up, of
    the binary floating-point product: 0.58 * 25 is 14.4999..., so 14 frames) are
    set to ``fill`` (in the units of the features as read) and marked absent, so that
    z-scoring keeps a fill of 0 at 0. The video is cut into consecutive blocks of ``span``
    frames, and blocks in random order are dropped until that many frames are; the last block
    dropped is cut short where it would overshoot. Independent per modality unless
    ``same_spans``."""

    #: 3: dropped frames are marked absent (2: exactly round(rate * frames) frames, which
    #: stayed present; 1: round(rate * blocks) whole blocks)
    revision: ClassVar[int] = 3

    def __init__(self, params: SpanDropoutParams) -> None:
        self.params = params

    def dropped(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n,)`` bool mask of the dropped frames of one stream."""
        span = self.params.span
        blocks = -(-n // span)
        order = torch.randperm(blocks, generator=generator)
        lengths = (n - order * span).clamp(max=span)  # the last block may be short
        before = lengths.cumsum(0) - lengths
        goal = math.floor(self.params.rate * n + 0.5)
        take = torch.zeros(blocks, dtype=torch.long)
        take[order] = (goal - before).clamp(min=0).minimum(lengths)
        frame = torch.arange(n)
        return frame % span < take[frame // span]

    def __call__(self, video: Video, generator: torch.Generator) -> Video:
        updates, absent = {}, {}
        for m in check_modalities(video, self.params.modalities, "span_dropout"):
            x = video.features[m]
            g = stream_generator(generator, "*" if self.params.same_spans else m)
            drop = self.dropped(x.shape[0], g)
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            updates[m] = torch.where(drop.reshape(shape), torch.full_like(x, self.params.fill), x)
            absent[m] = drop
        return with_features(video, updates, absent)
