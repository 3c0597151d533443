"""Waveform backbones on the video clock: chunked encoding of long audio, then one feature row
per video frame.

**Windows.** Video frame ``k`` (the video's own rate ``fps``, read from the container) owns a
window of ``W`` seconds (``window_ms``; default one frame, ``1 / fps``) placed as the log-mel
patches are (:func:`~fusionkit_affwild2.logmel.patch_starts`): ``anchor="start"`` gives
``[k / fps, k / fps + W)``, ``anchor="center"`` gives ``[k / fps - W / 2, k / fps + W / 2)``.
Time 0 is the first video frame once the audio is shifted by ``sync: container``.

**Pooling.** Encoder frame ``j`` covers samples ``[j * hop, j * hop + window)`` (20 ms steps of
25 ms for the torchaudio speech encoders). Row ``k`` is the mean of the encoder frames whose
span overlaps frame ``k``'s window. A window past either end of the recording takes the
nearest encoder frame (as log-mel patches repeat the edge frame), and ``present[k]`` is False
when the window does not overlap the recording at all. The window arithmetic is exact
(integers), so a window edge that falls on a frame boundary never flips with rounding.

**Chunks.** The encoder sees at most ``chunk_seconds + 2 * context_seconds`` of audio at a
time: chunk ``c`` keeps its own encoder frames and is computed with ``context_seconds`` of
audio on each side (dropped afterwards), so memory stays bounded for any length and frames
near a chunk edge still see context. A recording that fits in one chunk is encoded whole,
exactly as one call on it would. Chunks of equal length run as one batch of
``chunks_per_batch``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor, nn

from fusionkit.plugin import DataError

__all__ = ["FrameWindows", "encode_chunked", "encoder_frames", "frame_windows", "pool_frames"]

_BLOCK = 2048  # video frames pooled per step (bounds the cumulative-sum buffer)


def encoder_frames(samples: int, hop: int, window: int) -> int:
    """Encoder frames of a waveform of ``samples`` samples (0 if shorter than one window)."""
    return 0 if samples < window else 1 + (samples - window) // hop


@dataclass(frozen=True)
class FrameWindows:
    """Per video frame: the first and last overlapping encoder frame (not clamped to the
    recording) and whether the window overlaps the recording."""

    lo: Tensor
    hi: Tensor
    present: Tensor


def frame_windows(
    num_frames: int,
    fps: Fraction,
    sample_rate: int,
    hop: int,
    window: int,
    samples: int,
    anchor: Literal["start", "center"],
    window_seconds: Fraction | None = None,
    lead: int = 0,
) -> FrameWindows:
    """The encoder frames overlapping each video frame's window (see the module docstring).

    Times are kept as integers over one common denominator ``den``: frame ``k``'s window is
    ``[s_k, s_k + w) / den`` seconds. The recording spans samples ``lead .. samples``: the
    first ``lead`` are silence put before an audio stream that starts late, so a window that
    ends before them is not present.
    """
    if fps <= 0:
        raise DataError(f"video frame rate must be positive, got {fps}")
    width = Fraction(1) / fps if window_seconds is None else Fraction(window_seconds)
    den = 2 * fps.numerator * width.denominator
    step = fps.denominator * 2 * width.denominator  # 1 / fps, in units of 1 / den
    w = 2 * width.numerator * fps.numerator  # width, in units of 1 / den
    shift = 0 if anchor == "start" else w // 2  # w is even
    unit = hop * den  # one encoder hop, in units of 1 / (den * sample_rate)
    lo, hi, present = [], [], []
    for k in range(num_frames):
        s = (k * step - shift) * sample_rate  # window start, in units of 1 / (den * sr)
        e = s + w * sample_rate
        # frame j overlaps [s, e) when j * hop < e and j * hop + window > s
        hi.append((e - 1) // unit)
        lo.append((s - window * den) // unit + 1)
        present.append(s < samples * den and e > lead * den)
    return FrameWindows(
        torch.tensor(lo, dtype=torch.long),
        torch.tensor(hi, dtype=torch.long),
        torch.tensor(present, dtype=torch.bool),
    )


def pool_frames(frames: Tensor, windows: FrameWindows) -> Tensor:
    """``(F, D)``: row ``k`` the mean of ``frames[lo_k..hi_k]`` (clamped to the frames)."""
    t = frames.shape[0]
    if t == 0:
        raise DataError("no encoder frames to pool")
    lo = windows.lo.clamp(0, t - 1)
    hi = torch.maximum(windows.hi.clamp(0, t - 1), lo)
    out = torch.empty(len(lo), frames.shape[1], dtype=frames.dtype)
    for b in range(0, len(lo), _BLOCK):
        blo, bhi = lo[b : b + _BLOCK], hi[b : b + _BLOCK]
        a, z = int(blo.min()), int(bhi.max())
        csum = torch.zeros(z - a + 2, frames.shape[1], dtype=torch.float64)
        torch.cumsum(frames[a : z + 1].double(), 0, out=csum[1:])
        total = csum[bhi - a + 1] - csum[blo - a]
        out[b : b + _BLOCK] = (total / (bhi - blo + 1)[:, None]).to(frames.dtype)
    return out


@torch.inference_mode()
def encode_chunked(
    model: nn.Module,
    wave: Tensor,
    *,
    chunk_frames: int,
    context_frames: int,
    chunks_per_batch: int,
    device: str,
) -> Tensor:
    """``(T, D)`` encoder frames of a whole ``(samples,)`` waveform (``samples >=
    model.frame_window``), computed chunk by chunk on ``device`` (see the module docstring)."""
    hop, win = int(model.frame_hop), int(model.frame_window)
    total = encoder_frames(wave.numel(), hop, win)
    if total == 0:
        raise DataError(f"waveform of {wave.numel()} samples is shorter than one encoder frame")
    out = torch.empty(total, int(model.out_dim))
    groups: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    for f0 in range(0, total, chunk_frames):
        f1 = min(total, f0 + chunk_frames)
        a, b = max(0, f0 - context_frames), min(total, f1 + context_frames)
        # the last chunk keeps the samples after the last full frame (< hop of them), so a
        # recording that fits one chunk is encoded exactly as a whole
        end = wave.numel() if b == total else (b - 1) * hop + win
        groups[end - a * hop].append((f0, f1, a))
    for length, chunks in groups.items():
        for s in range(0, len(chunks), chunks_per_batch):
            part = chunks[s : s + chunks_per_batch]
            x = torch.stack([wave[a * hop : a * hop + length] for _, _, a in part])
            y = model(x.to(device)).float().cpu()
            want = encoder_frames(length, hop, win)
            if y.dim() != 3 or y.shape[1] != want:
                raise DataError(
                    f"waveform backbone {type(model).__name__} returned {tuple(y.shape)} for "
                    f"{length} samples; expected (B, {want}, D) frames of hop {hop}, window {win}"
                )
            for (f0, f1, a), rows in zip(part, y, strict=True):
                out[f0:f1] = rows[f0 - a : f1 - a]
    return out
