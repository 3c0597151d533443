"""VGGish-style log-mel spectrogram and one patch per video frame.

Front end (VGGish defaults, all in :class:`~fusionkit_affwild2.params.LogMelParams`): 16 kHz
mono; 25 ms periodic Hann window, 10 ms hop, FFT size the next power of two (512), magnitude
spectrum without centring; 64 HTK mel bands over 125-7500 Hz (torchaudio filterbank, no
normalisation); ``log(mel + 0.01)``.

Patches: frame ``i`` of a video at ``fps`` gets ``patch_frames`` (96 = 0.96 s) consecutive
log-mel frames. With ``anchor="start"`` (as released) the patch starts at log-mel frame
``round(i / fps / hop)``, so it covers ``[i/fps, i/fps + 0.96 s)``: about 0.48 s of look-ahead.
With ``anchor="center"`` it is centred on ``i / fps``. Rows outside the recording repeat the
nearest edge frame (as the released code repeats the last patch).
"""

from __future__ import annotations

from typing import Literal

import torch
import torchaudio
from einops import rearrange
from torch import Tensor

from fusionkit_affwild2.params import LogMelParams

__all__ = ["LogMel", "frame_patches", "patch_starts"]


class LogMel(torch.nn.Module):
    """Waveform ``(n,)`` at ``sample_rate`` -> log-mel ``(frames, n_mels)``."""

    def __init__(self, params: LogMelParams | None = None) -> None:
        super().__init__()
        p = params or LogMelParams()
        self.params = p
        self.win = round(p.sample_rate * p.window_ms / 1000)
        self.hop = round(p.sample_rate * p.hop_ms / 1000)
        n_fft = 1 << (self.win - 1).bit_length()
        self.n_fft = n_fft
        self.spectrogram = torchaudio.transforms.Spectrogram(
            n_fft=n_fft,
            win_length=self.win,
            hop_length=self.hop,
            power=1.0,
            center=False,
            window_fn=torch.hann_window,
        )
        self.mel = torchaudio.transforms.MelScale(
            n_mels=p.n_mels,
            sample_rate=p.sample_rate,
            f_min=p.f_min,
            f_max=p.f_max,
            n_stft=n_fft // 2 + 1,
            norm=None,
            mel_scale="htk",
        )

    @property
    def frames_per_second(self) -> float:
        return self.params.sample_rate / self.hop

    def forward(self, wave: Tensor) -> Tensor:
        if wave.numel() < self.win:  # too short for one window: pad with silence
            wave = torch.nn.functional.pad(wave, (0, self.win - wave.numel()))
        # torch.stft centres the win-long window in an n_fft-long frame; padding by the
        # difference makes frame k cover samples [k * hop, k * hop + win) exactly, as VGGish
        # frames do (the magnitude spectrum ignores where the window sits in the FFT buffer)
        left = (self.n_fft - self.win) // 2
        wave = torch.nn.functional.pad(wave.float(), (left, self.n_fft - self.win - left))
        spec = self.spectrogram(wave)  # (freq, frames)
        mel = self.mel(spec)
        return rearrange(torch.log(mel + self.params.log_offset), "mel frames -> frames mel")


def patch_starts(
    num_frames: int,
    fps: float,
    frames_per_second: float,
    patch: int,
    anchor: Literal["start", "center"],
) -> Tensor:
    """First log-mel frame of each video frame's patch, ``(num_frames,)`` long."""
    t = torch.arange(num_frames, dtype=torch.float64) / fps * frames_per_second
    start = torch.round(t).long()  # round half to even, like Python's round
    if anchor == "center":
        start = start - patch // 2
    return start


def frame_patches(logmel: Tensor, starts: Tensor, patch: int) -> Tensor:
    """Gather ``(len(starts), patch, n_mels)`` patches; indices outside the recording are
    clamped to its first / last frame."""
    offsets = torch.arange(patch, device=starts.device)
    index = (starts[:, None] + offsets[None, :]).clamp_(0, logmel.shape[0] - 1)
    return logmel[index]
