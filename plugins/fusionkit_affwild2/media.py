"""Raw media through PyAV (FFmpeg libraries inside the pip wheel; no system binary).

* :func:`probe`: frame rate read from the container, frame count, stream start times.
* :func:`decode_audio`: mono float waveform at its native rate, optionally shifted so that
  sample 0 is the time of the first video frame (container timestamps).
* :func:`load_audio`: the same, resampled with ``torchaudio.functional.resample``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import torch
import torchaudio
from torch import Tensor

from fusionkit.plugin import DataError

__all__ = [
    "MediaInfo",
    "decode_audio",
    "decode_audio_lead",
    "load_audio",
    "load_audio_lead",
    "probe",
]


@dataclass(frozen=True)
class MediaInfo:
    """What the container says about one media file.

    Attributes:
        fps: video frame rate (``average_rate``, else ``guessed_rate``); 0.0 without video.
        fps_exact: the same as a fraction string, e.g. ``"30000/1001"``.
        num_frames: video frames (decoded or demuxed, see :func:`probe`).
        video_start: time of the first video frame in seconds.
        audio_start: time of the first audio sample in seconds (None without audio).
        sample_rate: native audio rate (0 without audio).
        channels: native audio channels (0 without audio).
    """

    fps: float
    fps_exact: str
    num_frames: int
    video_start: float
    audio_start: float | None
    sample_rate: int
    channels: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _open(path: Path) -> av.container.InputContainer:
    if not path.is_file():
        raise DataError(f"media file {path} does not exist")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot open media file {path}: {exc}") from None


def _rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def _seconds(pts: int | None, time_base: Fraction | None) -> float | None:
    if pts is None or time_base is None:
        return None
    return float(pts * time_base)


def probe(path: Path, frame_count: Literal["decode", "packets"] = "decode") -> MediaInfo:
    """Frame rate, frame count and stream start times of a media file.

    ``frame_count="decode"`` decodes every video frame (exact, slow on long HD videos);
    ``"packets"`` counts the demuxed non-empty video packets (one per frame for the usual
    codecs, no decoding).
    """
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        fps, n, v_start = Fraction(0), 0, 0.0
        if video is not None:
            rate = _rate(video)
            if rate is None:
                raise DataError(f"{path}: the container gives no video frame rate")
            fps = rate
            first: float | None = None
            try:
                if frame_count == "decode":
                    video.thread_type = "AUTO"
                    for frame in container.decode(video):
                        if first is None:
                            first = frame.time
                        n += 1
                else:
                    for packet in container.demux(video):
                        if packet.size:
                            if first is None:
                                first = _seconds(packet.pts, packet.time_base)
                            n += 1
            except av.FFmpegError as exc:
                raise DataError(f"{path}: video stream cannot be decoded: {exc}") from None
            start = _seconds(video.start_time, video.time_base)
            v_start = start if start is not None else (first or 0.0)
        a_start = None
        if audio is not None:
            a_start = _seconds(audio.start_time, audio.time_base)
        return MediaInfo(
            fps=float(fps),
            fps_exact=f"{fps.numerator}/{fps.denominator}",
            num_frames=n,
            video_start=v_start,
            audio_start=a_start,
            sample_rate=int(audio.rate or 0) if audio is not None else 0,
            channels=int(audio.channels or 0) if audio is not None else 0,
        )


def decode_audio(path: Path, sync: Literal["container", "none"] = "none") -> tuple[Tensor, int]:
    """Mono float32 waveform ``(n,)`` at the native rate, and that rate.

    Channels are averaged. With ``sync="container"`` the waveform is shifted by the audio
    stream's start time minus the video stream's, padding with silence or dropping samples, so
    that sample 0 is the moment of the first video frame. A file without audio gives an
    empty waveform.
    """
    wave, rate, _ = decode_audio_lead(path, sync)
    return wave, rate


def decode_audio_lead(
    path: Path, sync: Literal["container", "none"] = "none"
) -> tuple[Tensor, int, int]:
    """:func:`decode_audio`, and the number of silent samples it put before the recording
    (an audio stream that starts after the first video frame, ``sync="container"``): those
    samples are not audio the recording has."""
    with _open(path) as container:
        if not container.streams.audio:
            return torch.zeros(0), 0, 0
        stream = container.streams.audio[0]
        rate = int(stream.rate or 0)
        chunks: list[np.ndarray] = []
        first_time: float | None = None
        resampler = None
        try:
            for frame in container.decode(stream):
                if first_time is None and frame.time is not None:
                    first_time = frame.time
                if resampler is None:
                    rate = frame.sample_rate or rate
                    # format conversion only (planar float, same layout and rate)
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=rate)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            if resampler is not None:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray())
        except av.FFmpegError as exc:
            raise DataError(f"{path}: audio stream cannot be decoded: {exc}") from None
        if not chunks or rate <= 0:
            return torch.zeros(0), max(rate, 0), 0
        wave = torch.from_numpy(np.concatenate(chunks, axis=1)).float().mean(dim=0)
        lead = 0
        if sync == "container" and container.streams.video:
            video = container.streams.video[0]
            v_start = _seconds(video.start_time, video.time_base) or 0.0
            a_start = first_time if first_time is not None else v_start
            shift = round((a_start - v_start) * rate)
            if shift > 0:
                wave = torch.cat([torch.zeros(shift), wave])
                lead = shift
            elif shift < 0:
                wave = wave[-shift:]
        return wave.contiguous(), rate, lead


def load_audio(
    path: Path, sample_rate: int = 16000, sync: Literal["container", "none"] = "none"
) -> Tensor:
    """:func:`decode_audio` resampled to ``sample_rate`` with torchaudio (band-limited sinc)."""
    return load_audio_lead(path, sample_rate, sync)[0]


def load_audio_lead(
    path: Path, sample_rate: int = 16000, sync: Literal["container", "none"] = "none"
) -> tuple[Tensor, int]:
    """:func:`load_audio`, and the silent samples (at ``sample_rate``) put before the
    recording (see :func:`decode_audio_lead`)."""
    wave, rate, lead = decode_audio_lead(path, sync)
    if wave.numel() == 0 or rate == sample_rate:
        return wave, lead
    wave = torchaudio.functional.resample(wave, orig_freq=rate, new_freq=sample_rate)
    return wave, round(lead * sample_rate / rate)
