"""The ``synthetic`` dataset: lazily generated, cached per split."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fusionkit.plugin import DataError, Video, register
from fusionkit_synthetic.generator import (
    SPLITS,
    ObservationMaps,
    ReliabilitySpan,
    VideoArrays,
    build_maps,
    generate_video,
)
from fusionkit_synthetic.params import SyntheticParams

__all__ = ["ReliabilitySpan", "SyntheticDataset", "VideoInfo", "build"]


def span_mask(n: int, spans: Iterable[tuple[int, int]]) -> torch.Tensor:
    """``(n,)`` bool: ``True`` on the frames inside any ``[start, stop)`` span."""
    out = torch.zeros(n, dtype=torch.bool)
    for start, stop in spans:
        out[start:stop] = True
    return out


@dataclass(frozen=True)
class VideoInfo:
    """Per-video generative facts that are not per-frame tensors (for analysis and tests).

    Attributes:
        name: the video's name.
        lag: constant audio lag in frames (``lag_max``); without drift, audio frame ``i``
            observes the latents at ``i - lag``.
        speech_ratio: expected fraction of frames with speech.
        audio_gain: multiplicative gain of the speech part of the audio.
        audio_dropout, video_dropout: missing (zeroed) ``[start, stop)`` span, or None.
        latent: ``(N, 2)`` true valence and arousal on every frame (labels are its labelled
            frames).
        speech: ``(N,)`` speech activity on the audio timeline.
        frame_lag: ``(N,)`` int64 audio lag of every frame: audio frame ``i`` observes the
            latents at ``clamp(i - frame_lag[i], 0, N - 1)`` (``lag`` plus the drift).
        reliability: the spans where one modality is unreliable (``reliability_*`` knobs), in
            time order.
    """

    name: str
    lag: int
    speech_ratio: float
    audio_gain: float
    audio_dropout: tuple[int, int] | None
    video_dropout: tuple[int, int] | None
    latent: torch.Tensor
    speech: torch.Tensor
    frame_lag: torch.Tensor
    reliability: tuple[ReliabilitySpan, ...] = ()

    def unreliable(self, modality: str, kinds: tuple[str, ...] | None = None) -> torch.Tensor:
        """``(N,)`` bool: ``True`` on frames inside a span of ``modality`` (of ``kinds``)."""
        return span_mask(
            self.latent.shape[0],
            (
                (s.start, s.stop)
                for s in self.reliability
                if s.modality == modality and (kinds is None or s.kind in kinds)
            ),
        )


class SyntheticDataset:
    """Embedded audio-visual valence/arousal dataset (no files, deterministic by seed).

    Each :class:`~fusionkit.plugin.Video` has ``features`` ``{"audio": (N, audio_dim),
    "video": (N, video_dim)}`` (float32), ``labels`` ``(N, 2)`` (valence, arousal; 0 where
    unlabeled), ``label_mask`` ``(N,)`` and ``present`` (False where a modality is not observed:
    its dropout span and its zeroed or frozen reliability spans) and ``flags``
    (``"audio unreliable"`` / ``"video unreliable"``: every reliability span of that modality,
    of any kind, and its dropout span; shaded in the report's gate plots).
    The true latents and the speech activity are in :meth:`info`.

    A split is generated on first use and cached; :meth:`videos` returns the cached records
    (do not modify their tensors in place).
    """

    targets: tuple[str, ...] = ("valence", "arousal")
    #: ``data.normalize: auto`` leaves the synthetic features as generated (measured: z-scoring
    #: does not help them; see docs/synthetic.md).
    zscore_by_default = False

    def __init__(self, params: SyntheticParams) -> None:
        self.params = params
        self.feature_dims: dict[str, int] = {"audio": params.audio_dim, "video": params.video_dim}
        self._maps: ObservationMaps | None = None
        self._videos: dict[str, list[Video]] = {}
        self._info: dict[str, list[VideoInfo]] = {}

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def num_videos(self, split: str) -> int:
        """Number of videos configured for ``split``."""
        self._check(split)
        p = self.params
        return {"train": p.num_train, "val": p.num_val, "test": p.num_test}[split]

    def videos(self, split: str) -> list[Video]:
        """All videos of ``split`` (generated on first call, then cached)."""
        self._generate(split)
        return list(self._videos[split])

    def info(self, split: str) -> list[VideoInfo]:
        """Per-video generative facts (lag, speaking ratio, ...) of ``split``, in video order."""
        self._generate(split)
        return list(self._info[split])

    def _check(self, split: str) -> None:
        if split not in SPLITS:
            raise DataError(
                f"synthetic dataset has no split {split!r}; valid splits: {', '.join(SPLITS)}"
            )

    def _generate(self, split: str) -> None:
        self._check(split)
        if split in self._videos:
            return
        if self._maps is None:
            self._maps = build_maps(self.params)
        videos, infos = [], []
        for index in range(self.num_videos(split)):
            name = f"syn_{split}_{index:03d}"
            arrays = generate_video(self.params, self._maps, split, index)
            videos.append(self._to_video(name, arrays))
            infos.append(
                VideoInfo(
                    name=name,
                    lag=arrays.lag,
                    speech_ratio=arrays.speech_ratio,
                    audio_gain=arrays.audio_gain,
                    audio_dropout=arrays.audio_dropout,
                    video_dropout=arrays.video_dropout,
                    latent=torch.as_tensor(arrays.latent, dtype=torch.float32),
                    speech=torch.as_tensor(arrays.speech, dtype=torch.float32),
                    frame_lag=torch.as_tensor(arrays.frame_lag, dtype=torch.int64),
                    reliability=tuple(arrays.reliability),
                )
            )
        self._videos[split], self._info[split] = videos, infos

    def _to_video(self, name: str, arrays: VideoArrays) -> Video:
        def f32(x: object) -> torch.Tensor:
            return torch.as_tensor(x, dtype=torch.float32).contiguous()

        mask = torch.as_tensor(arrays.label_mask, dtype=torch.bool)
        latent = f32(arrays.latent)
        labels = torch.where(mask[:, None], latent, torch.zeros(()))
        n = latent.shape[0]
        present, flags = {}, {}
        for m, dropout in (("audio", arrays.audio_dropout), ("video", arrays.video_dropout)):
            own = [r for r in arrays.reliability if r.modality == m]
            missing = [dropout] if dropout is not None else []
            absent = [*missing, *((r.start, r.stop) for r in own if r.kind in ("zero", "freeze"))]
            if absent:
                present[m] = ~span_mask(n, absent)
            bad = span_mask(n, [*missing, *((r.start, r.stop) for r in own)])
            if bool(bad.any()):
                flags[f"{m} unreliable"] = bad
        return Video(
            name=name,
            features={"audio": f32(arrays.audio), "video": f32(arrays.video)},
            labels=labels,
            label_mask=mask,
            fps=float(self.params.fps),
            frame_ids=torch.arange(n, dtype=torch.int64),
            present=present,
            flags=flags,
        )


@register("dataset", "synthetic")
def build(params: SyntheticParams) -> SyntheticDataset:
    """Embedded audio-visual valence/arousal data (no files; deterministic by seed)."""
    return SyntheticDataset(params)
