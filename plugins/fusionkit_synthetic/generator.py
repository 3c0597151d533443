"""Generative process of the ``synthetic`` dataset (pure numpy, deterministic by seed).

One video is made in these steps (``docs/synthetic.md`` has the equations):

1. latent valence ``v`` and arousal ``a``: ``tanh`` of smooth Gaussian processes with
   per-video offsets and scales (bounded in ``[-1, 1]``, valence biased positive, arousal low
   with positive bursts and a mild ``|v|`` coupling);
2. speech activity ``s``: an alternating talk/pause renewal process;
3. display: each modality shows its strong dimension (video: valence, audio: causally smoothed
   arousal) with per-video expressivity, resting offset and smooth display noise, and its weak
   dimension masked by a nuisance (correlation ``cross_talk``);
4. video features: a random MLP (shared by all videos of a dataset seed) of the display, head
   pose, illumination, identity and mouth motion while talking, plus a per-video offset;
5. audio features: while talking, a random MLP of the display, the arousal trend, speaker
   identity, phonetic content and vocal effort, times a per-video gain; room noise always; the
   whole clean stream is shifted by the per-video lag (constant, or drifting over the video),
   and the voice is muted on silent reliability spans;
6. i.i.d. feature noise, then corruptions: noisy reliability spans, frozen frames, zeroed or
   frozen reliability spans, missing spans, unlabeled runs.

Every random quantity comes from its own :class:`numpy.random.Generator`, seeded from
``(seed, split, video, stream)``, so changing one knob never changes what another governs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import numpy as np

from fusionkit_synthetic.params import SyntheticParams

__all__ = [
    "RELIABILITY_KINDS",
    "SPLITS",
    "ObservationMaps",
    "RandomMLP",
    "ReliabilitySpan",
    "VideoArrays",
    "build_maps",
    "causal_ema",
    "dropout_span",
    "freeze_index",
    "gaussian_filter",
    "generate_video",
    "lag_track",
    "latents",
    "reliability_spans",
    "smooth_noise",
    "speech_activity",
    "stream_rng",
    "unlabeled_mask",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_KEY = {"train": 1, "val": 2, "test": 3}
_MAPS_KEY = 0  # the observation maps: shared by all splits

# Time constants of the generative process, in seconds.
_V_SLOW, _V_FAST = 2.5, 0.6  # valence: slow mood + faster reactions
_A_SLOW, _A_FAST, _A_BURST = 2.0, 0.5, 1.0  # arousal components
_POSE, _LIGHT, _MOUTH = 1.5, 6.0, 0.1  # video nuisances
_A_EMA, _A_TREND = 0.3, 1.5  # audio sees arousal through these causal smoothers
_CONTENT, _EFFORT, _ROOM = 0.06, 2.0, 1.0  # audio nuisances
_TALK = 2.0  # mean talk-spurt duration
_TALK_DRIFT = 1.0  # correlation time of the increments of a drifting lag ("walk")
_EDGE = 0.04  # softness of speech on/offsets

_DISP = 1.0  # display noise correlation time
_WEAK = 1.5  # correlation time of the nuisance that masks the weak dimension
_REST = 0.3  # std of per-video resting (offset) display, in latent stds
# Fixed standardisation of the latents before they enter the observation maps.
_V_MEAN, _V_STD, _A_MEAN, _A_STD = 0.12, 0.5, 0.25, 0.3

_HIDDEN = 64  # hidden units of the random observation MLPs


class Stream(IntEnum):
    """Index of each per-video random stream (part of its seed key; never reorder)."""

    LENGTH = 0
    LATENT = 1
    SPEECH = 2
    VIDEO_NUISANCE = 3
    AUDIO_NUISANCE = 4
    VIDEO_NOISE = 5
    AUDIO_NOISE = 6
    LAG = 7
    VIDEO_FREEZE = 8
    AUDIO_FREEZE = 9
    VIDEO_DROPOUT = 10
    AUDIO_DROPOUT = 11
    UNLABELED = 12
    LAG_DRIFT = 13
    RELIABILITY = 14
    RELIABILITY_KIND = 15
    RELIABILITY_NOISE = 16


def stream_rng(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for ``(seed, *key)`` (never the global RNG)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(key)))


# --------------------------------------------------------------------------- filters


def _fft_conv_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``y[i] = sum_j kernel[j] * x[i + K - 1 - j]`` for ``i < L - K + 1`` along axis 0."""
    length, k = x.shape[0], kernel.shape[0]
    nfft = 1 << (length + k - 2).bit_length()
    spec = np.fft.rfft(x, nfft, axis=0) * np.fft.rfft(kernel, nfft).reshape(
        (-1,) + (1,) * (x.ndim - 1)
    )
    return np.fft.irfft(spec, nfft, axis=0)[k - 1 : length]


def _gauss_kernel(sigma: float) -> np.ndarray:
    half = max(1, int(np.ceil(4.0 * sigma)))
    t = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return kernel / kernel.sum()


def smooth_noise(rng: np.random.Generator, n: int, channels: int, sigma: float) -> np.ndarray:
    """``(n, channels)`` Gaussian-smoothed white noise with unit variance.

    Args:
        sigma: std of the Gaussian smoothing kernel in frames (the correlation length).
    """
    kernel = _gauss_kernel(sigma)
    white = rng.standard_normal((n + kernel.shape[0] - 1, channels))
    return _fft_conv_valid(white, kernel) / np.sqrt(np.sum(kernel**2))


def gaussian_filter(x: np.ndarray, sigma: float) -> np.ndarray:
    """Centered Gaussian smoothing of ``x`` along axis 0 with edge padding."""
    kernel = _gauss_kernel(sigma)
    half = (kernel.shape[0] - 1) // 2
    padded = np.concatenate([np.repeat(x[:1], half, 0), x, np.repeat(x[-1:], half, 0)], 0)
    return _fft_conv_valid(padded, kernel)


def causal_ema(x: np.ndarray, tau: float) -> np.ndarray:
    """Causal exponential moving average along axis 0 (time constant ``tau`` frames)."""
    if tau <= 0:
        return x.copy()
    k = int(np.ceil(6.0 * tau)) + 1
    kernel = np.exp(-np.arange(k, dtype=np.float64) / tau)
    kernel /= kernel.sum()
    padded = np.concatenate([np.repeat(x[:1], k - 1, 0), x], 0)
    return _fft_conv_valid(padded, kernel)


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


# --------------------------------------------------------------------------- latents


def latents(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    """``(n, 2)`` latent valence and arousal of one video, in ``[-1, 1]``.

    ``v = tanh(mu_v + c_v z_v)`` with ``z_v`` a two-time-scale smooth process, a per-video mood
    ``mu_v ~ N(0.15, 0.3^2)`` (positive bias) and scale ``c_v ~ U(0.3, 0.8)``;
    ``a = tanh(mu_a + c_a z_a + 0.25 |v| + b)`` with ``mu_a ~ N(0, 0.12^2)``,
    ``c_a ~ U(0.1, 0.25)`` and bursts ``b = softplus(3 (z_b - 0.7)) / 3`` (right skew).
    """
    zv = 0.85 * smooth_noise(rng, n, 1, _V_SLOW * fps)[:, 0]
    zv += 0.5 * smooth_noise(rng, n, 1, _V_FAST * fps)[:, 0]
    za = 0.8 * smooth_noise(rng, n, 1, _A_SLOW * fps)[:, 0]
    za += 0.45 * smooth_noise(rng, n, 1, _A_FAST * fps)[:, 0]
    zb = smooth_noise(rng, n, 1, _A_BURST * fps)[:, 0]
    mu_v, c_v = rng.normal(0.15, 0.3), rng.uniform(0.3, 0.8)
    mu_a, c_a = rng.normal(0.0, 0.12), rng.uniform(0.1, 0.25)
    v = np.tanh(mu_v + c_v * zv)
    burst = _softplus(3.0 * (zb - 0.7)) / 3.0
    a = np.tanh(mu_a + c_a * za + 0.25 * np.abs(v) + burst)
    return np.stack([v, a], axis=1)


def speech_activity(
    rng: np.random.Generator, n: int, fps: float, ratio: float
) -> tuple[np.ndarray, float]:
    """``(n,)`` soft speech activity in ``[0, 1]`` and this video's speaking ratio.

    Talk spurts (mean 2 s) alternate with pauses whose mean makes the expected speaking
    fraction equal to a per-video ratio ``r ~ Beta(4 ratio, 4 (1 - ratio))``.
    """
    if ratio >= 1.0:
        return np.ones(n), 1.0
    r = float(np.clip(rng.beta(4.0 * ratio, 4.0 * (1.0 - ratio)), 0.03, 1.0))
    talk_mean = _TALK * fps
    pause_mean = talk_mean * (1.0 - r) / r
    count = int(np.ceil(3.0 * n / (talk_mean + pause_mean))) + 8
    talk = rng.gamma(2.0, talk_mean / 2.0, count)
    pause = rng.gamma(2.0, max(pause_mean, 1e-3) / 2.0, count)
    talk_first = bool(rng.random() < r)
    first, second = (talk, pause) if talk_first else (pause, talk)
    ends = np.cumsum(np.stack([first, second], axis=1).reshape(-1))
    segment = np.searchsorted(ends, np.arange(n) + 0.5, side="right")
    talking = (segment % 2 == 0) == talk_first
    return np.clip(gaussian_filter(talking.astype(np.float64), _EDGE * fps), 0.0, 1.0), r


# --------------------------------------------------------------------------- observation maps


@dataclass(frozen=True)
class RandomMLP:
    """A fixed random map ``x -> (tanh((x * in_scale) W1 + b1) W2 - mean) / std``."""

    in_scale: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        hidden = np.tanh((x * self.in_scale) @ self.w1 + self.b1)
        return (hidden @ self.w2 - self.mean) / self.std


def _random_mlp(rng: np.random.Generator, in_scale: np.ndarray, out_dim: int) -> RandomMLP:
    """Draw a random MLP; outputs are standardised on a reference sample of N(0, I) inputs."""
    in_dim = in_scale.shape[0]
    w1 = rng.standard_normal((in_dim, _HIDDEN))
    b1 = rng.normal(0.0, 0.5, _HIDDEN)
    w2 = rng.standard_normal((_HIDDEN, out_dim)) / np.sqrt(_HIDDEN)
    reference = rng.standard_normal((4096, in_dim)) * in_scale
    out = np.tanh(reference @ w1 + b1) @ w2
    return RandomMLP(in_scale, w1, b1, w2, out.mean(0), out.std(0) + 1e-8)


@dataclass(frozen=True)
class ObservationMaps:
    """The maps of one dataset seed, shared by every split and video."""

    video: RandomMLP  # inputs: v, a, pose(3), light, identity(2), mouth
    audio: RandomMLP  # inputs: a_ema, a_change, v, speaker(2), content(2), effort
    room: np.ndarray  # (3, audio_dim) projection of the room noise


def build_maps(params: SyntheticParams) -> ObservationMaps:
    """The observation maps for ``params.seed`` (independent of the split streams)."""
    rng = stream_rng(params.seed, _MAPS_KEY)
    video_scale = np.array([1.0, 1.0, 0.8, 0.8, 0.8, 0.6, 0.7, 0.7, 0.6])
    audio_scale = np.array([1.0, 0.5, 1.0, 0.7, 0.7, 1.0, 1.0, 0.6])
    video = _random_mlp(rng, video_scale, params.video_dim)
    audio = _random_mlp(rng, audio_scale, params.audio_dim)
    room = rng.standard_normal((3, params.audio_dim)) / np.sqrt(3.0)
    return ObservationMaps(video=video, audio=audio, room=room)


# --------------------------------------------------------------------------- corruptions


def freeze_index(rng: np.random.Generator, n: int, p: float) -> np.ndarray:
    """Row index that freezes each frame with probability ``p`` on its predecessor's row."""
    frames = np.arange(n)
    if p <= 0.0:
        return frames
    drop = rng.random(n) < p
    drop[0] = False
    return np.maximum.accumulate(np.where(drop, 0, frames))


def dropout_span(rng: np.random.Generator, n: int, p: float) -> tuple[int, int] | None:
    """With probability ``p`` a ``[start, stop)`` span of 10-50% of the frames, else None.

    The span is drawn whatever ``p`` is, so raising ``p`` only adds spans.
    """
    hit = rng.random() < p
    length = int(rng.integers(max(1, n // 10), max(1, n // 2) + 1))
    start = int(rng.integers(0, n - length + 1))
    return (start, start + length) if hit else None


def unlabeled_mask(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """``(n,)`` bool, ``False`` on runs of 5-30 frames covering about ``rate`` of the video."""
    if rate <= 0.0:
        return np.ones(n, dtype=bool)
    count = rng.poisson(rate * n / 17.5)
    starts = rng.integers(0, n, count)
    stops = np.minimum(starts + rng.integers(5, 31, count), n)
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, starts, 1)
    np.add.at(diff, stops, -1)
    return np.cumsum(diff[:n]) == 0


def _fold(x: np.ndarray, bound: float) -> np.ndarray:
    """Reflect ``x`` into ``[-bound, bound]`` (a triangle wave: continuous, identity inside)."""
    y = np.mod(x + bound, 4.0 * bound)
    return np.where(y > 2.0 * bound, 4.0 * bound - y, y) - bound


def lag_track(
    rng: np.random.Generator,
    n: int,
    fps: float,
    lag: int,
    amplitude: float,
    period: float,
    kind: Literal["sine", "walk"],
) -> np.ndarray:
    """``(n,)`` int64 per-frame audio lag: the constant ``lag`` plus a slow drift in
    ``[-amplitude, amplitude]`` frames, rounded to whole frames.

    * ``sine``: ``amplitude * sin(2 pi t / (period fps) + phi)``, ``phi ~ U(0, 2 pi)``.
    * ``walk``: a bounded random walk: ``w_t = w_0 + s * sum_{i <= t} S_1.0(i)`` (smooth
      increments, ``S_1.0`` unit-variance noise smoothed over 1 s), ``w_0 ~ U(-amplitude,
      amplitude)``, ``s`` such that the walk moves by about ``amplitude`` (one std) in
      ``period`` seconds, reflected at ``+-amplitude``.
    """
    frames = np.arange(n, dtype=np.float64)
    span = period * fps  # frames
    if kind == "sine":
        phase = rng.uniform(0.0, 2.0 * np.pi)
        drift = amplitude * np.sin(2.0 * np.pi * frames / span + phase)
    else:
        start = rng.uniform(-amplitude, amplitude)
        sigma = _TALK_DRIFT * fps
        steps = smooth_noise(rng, n, 1, sigma)[:, 0]
        # var(sum of span steps) ~ span * 2 sigma sqrt(pi) for Gaussian-smoothed white noise
        scale = amplitude / np.sqrt(span * 2.0 * sigma * np.sqrt(np.pi))
        drift = _fold(start + scale * np.cumsum(steps), amplitude)
    return lag + np.rint(drift).astype(np.int64)


RELIABILITY_KINDS: tuple[str, ...] = ("noise", "zero", "freeze", "silence")


@dataclass(frozen=True)
class ReliabilitySpan:
    """A ``[start, stop)`` run of frames where one modality is unreliable.

    Attributes:
        modality: ``audio`` or ``video``.
        kind: ``noise`` (extra Gaussian noise; still observed), ``zero`` (features exactly 0;
            not observed), ``freeze`` (every row repeats the row before the span; not
            observed) or ``silence`` (audio only: the voice is muted, room noise remains;
            still observed).
        start, stop: frames, ``1 <= start < stop <= N``.
    """

    modality: str
    kind: str
    start: int
    stop: int


def reliability_spans(
    positions: np.random.Generator,
    choices: np.random.Generator,
    n: int,
    fps: float,
    params: SyntheticParams,
) -> list[ReliabilitySpan]:
    """The unreliable spans of one video, in time order (none when ``reliability_rate`` is 0).

    Spans and gaps alternate: each gap is exponential with mean
    ``L (1 - rate) / rate`` and each span uniform in ``[0.5 L, 1.5 L]`` frames
    (``L = reliability_span * fps``), so about ``rate`` of the frames are covered; no span
    starts at frame 0. ``positions`` draws the gaps and lengths only, ``choices`` two uniforms
    per span (modality, then kind), so the modality and kind knobs never move a span.
    """
    rate = params.reliability_rate
    if rate <= 0.0:
        return []
    mean = params.reliability_span * fps
    gap_mean = mean * (1.0 - rate) / rate
    spans = []
    t = positions.exponential(gap_mean)
    while True:
        length = max(1, round(mean * positions.uniform(0.5, 1.5)))
        start = max(1, round(t))
        if start >= n:
            break
        stop = min(n, start + length)
        u_modality, u_kind = choices.random(2)
        modality = params.reliability_modality
        if modality == "either":
            modality = "audio" if u_modality < 0.5 else "video"
        kinds = [
            k
            for k in RELIABILITY_KINDS
            if k in params.reliability_kinds and (k != "silence" or modality == "audio")
        ]
        spans.append(ReliabilitySpan(modality, kinds[int(u_kind * len(kinds))], start, stop))
        t = stop + positions.exponential(gap_mean)
    return spans


def _apply_spans(
    x: np.ndarray,
    spans: list[ReliabilitySpan],
    modality: str,
    kinds: tuple[str, ...],
    noise: float,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``x`` with the spans of ``modality`` and of one of ``kinds`` applied (in place)."""
    for span in spans:
        if span.modality != modality or span.kind not in kinds:
            continue
        rows = slice(span.start, span.stop)
        if span.kind == "noise":
            assert rng is not None
            x[rows] += noise * rng.standard_normal((span.stop - span.start, x.shape[1]))
        elif span.kind == "zero":
            x[rows] = 0.0
        elif span.kind == "freeze":
            x[rows] = x[span.start - 1]
    return x


# --------------------------------------------------------------------------- one video


@dataclass
class VideoArrays:
    """Everything generated for one video (float64 numpy; the dataset converts to torch).

    Attributes:
        latent: ``(N, 2)`` true valence, arousal (also on unlabeled frames).
        audio, video: ``(N, F)`` features as delivered (lagged, noisy, corrupted).
        label_mask: ``(N,)`` bool.
        speech: ``(N,)`` speech activity on the audio's (lagged) timeline.
        lag: constant part of the audio lag in frames.
        frame_lag: ``(N,)`` int64 lag of every frame (audio frame ``i`` observes the latents
            at ``i - frame_lag[i]``, edge-clamped); ``lag`` everywhere without drift.
        speech_ratio: this video's expected speaking fraction.
        audio_gain: this video's audio gain.
        audio_dropout, video_dropout: missing ``[start, stop)`` span or None.
        reliability: the unreliable spans, in time order.
    """

    latent: np.ndarray
    audio: np.ndarray
    video: np.ndarray
    label_mask: np.ndarray
    speech: np.ndarray
    lag: int
    speech_ratio: float
    audio_gain: float
    audio_dropout: tuple[int, int] | None
    video_dropout: tuple[int, int] | None
    frame_lag: np.ndarray
    reliability: list[ReliabilitySpan]


def _display(
    g: np.random.Generator, strong: np.ndarray, weak: np.ndarray, params: SyntheticParams
) -> tuple[np.ndarray, np.ndarray]:
    """How a face or voice displays affect: the strong and the weak dimension, ``(n,)`` each.

    ``shown = e * z + r + display_noise * eta`` with per-video expressivity ``e``, resting
    offset ``r`` and smooth noise ``eta``; the weak dimension is further mixed with an
    independent smooth nuisance so that its correlation with ``shown`` is ``cross_talk``.
    """
    n, fps, ct = strong.shape[0], params.fps, params.cross_talk
    expressivity = float(np.exp(g.normal(0.0, 0.25)))
    rest = g.normal(0.0, _REST, 2)
    noise = params.display_noise * smooth_noise(g, n, 2, _DISP * fps)
    shown = expressivity * np.stack([strong, weak], 1) + rest + noise
    masked = ct * shown[:, 1] + np.sqrt(1.0 - ct**2) * smooth_noise(g, n, 1, _WEAK * fps)[:, 0]
    return shown[:, 0], masked


def _video_clean(
    params: SyntheticParams,
    maps: ObservationMaps,
    g: np.random.Generator,
    z: np.ndarray,
    speech: np.ndarray,
) -> np.ndarray:
    """Noise-free ``(n, video_dim)`` video features from standardised latents ``z``.

    The face displays valence strongly and arousal weakly, seen through the shared random map
    together with head pose, illumination, identity and mouth motion while talking.
    """
    n, fps = z.shape[0], params.fps
    valence, arousal = _display(g, z[:, 0], z[:, 1], params)
    pose = smooth_noise(g, n, 3, _POSE * fps)
    light = smooth_noise(g, n, 1, _LIGHT * fps)
    identity = np.broadcast_to(g.standard_normal(2), (n, 2))
    mouth = speech[:, None] * smooth_noise(g, n, 1, _MOUTH * fps)
    face_offset = g.normal(0.0, 0.4, params.video_dim)
    x = np.concatenate([valence[:, None], arousal[:, None], pose, light, identity, mouth], 1)
    return maps.video(x) + face_offset


def _audio_clean(
    params: SyntheticParams,
    maps: ObservationMaps,
    g: np.random.Generator,
    z: np.ndarray,
    speech: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Noise-free, unlagged ``(n, audio_dim)`` voice and room parts of the audio features (the
    clean audio is their sum) and the per-video gain.

    While talking, the voice displays causally smoothed arousal strongly, plus the trend of
    that display, and valence weakly, through the shared random map with speaker identity,
    phonetic content and vocal effort; room noise is present all the time.
    """
    n, fps = z.shape[0], params.fps
    arousal, valence = _display(g, causal_ema(z[:, 1], _A_EMA * fps), z[:, 0], params)
    a_trend = 3.0 * (arousal - causal_ema(arousal, _A_TREND * fps))
    speaker = np.broadcast_to(g.standard_normal(2), (n, 2))
    content = smooth_noise(g, n, 2, _CONTENT * fps)
    effort = smooth_noise(g, n, 1, _EFFORT * fps)
    gain = float(np.exp(g.normal(0.0, 0.3)))
    room = 0.35 * smooth_noise(g, n, 3, _ROOM * fps) @ maps.room
    room += g.normal(0.0, 0.3, params.audio_dim)
    x = np.concatenate(
        [arousal[:, None], a_trend[:, None], valence[:, None], speaker, content, effort], 1
    )
    return speech[:, None] * gain * maps.audio(x), room, gain


def generate_video(
    params: SyntheticParams, maps: ObservationMaps, split: str, index: int
) -> VideoArrays:
    """Generate video ``index`` of ``split`` (deterministic in ``params.seed``)."""
    seed, fps = params.seed, params.fps

    def rng(stream: Stream) -> np.random.Generator:
        return stream_rng(seed, _SPLIT_KEY[split], index, int(stream))

    n = int(rng(Stream.LENGTH).integers(params.min_frames, params.max_frames + 1))
    latent = latents(rng(Stream.LATENT), n, fps)
    v, a = latent[:, 0], latent[:, 1]
    speech, ratio = speech_activity(rng(Stream.SPEECH), n, fps, params.speech_ratio)

    z = np.stack([(v - _V_MEAN) / _V_STD, (a - _A_MEAN) / _A_STD], 1)  # standardised
    video = _video_clean(params, maps, rng(Stream.VIDEO_NUISANCE), z, speech)
    video += params.video_noise * rng(Stream.VIDEO_NOISE).standard_normal(video.shape)
    voice, room, gain = _audio_clean(params, maps, rng(Stream.AUDIO_NUISANCE), z, speech)
    lag = 0
    if params.lag_max > 0:
        lag = int(rng(Stream.LAG).integers(-params.lag_max, params.lag_max + 1))
    frame_lag = np.full(n, lag, dtype=np.int64)
    if params.lag_drift > 0:
        frame_lag = lag_track(
            rng(Stream.LAG_DRIFT),
            n,
            fps,
            lag,
            params.lag_drift,
            params.lag_drift_period,
            params.lag_drift_kind,
        )
    shifted = np.clip(np.arange(n) - frame_lag, 0, n - 1)
    audio, speech = (voice + room)[shifted], speech[shifted]
    spans = reliability_spans(rng(Stream.RELIABILITY), rng(Stream.RELIABILITY_KIND), n, fps, params)
    for span in spans:  # silence: the voice muted, the room noise kept
        if span.kind == "silence":
            audio[span.start : span.stop] = room[shifted[span.start : span.stop]]
    audio += params.audio_noise * rng(Stream.AUDIO_NOISE).standard_normal(audio.shape)

    # Corruptions: noisy spans, frozen frames, zeroed/frozen spans, then missing spans.
    if spans:
        g = rng(Stream.RELIABILITY_NOISE)
        for modality, x in (("audio", audio), ("video", video)):
            _apply_spans(x, spans, modality, ("noise",), params.reliability_noise, g)
    video = video[freeze_index(rng(Stream.VIDEO_FREEZE), n, params.frame_drop)]
    audio = audio[freeze_index(rng(Stream.AUDIO_FREEZE), n, params.frame_drop)]
    for modality, x in (("audio", audio), ("video", video)):
        _apply_spans(x, spans, modality, ("zero", "freeze"), params.reliability_noise)
    video_span = dropout_span(rng(Stream.VIDEO_DROPOUT), n, params.modality_dropout)
    audio_span = dropout_span(rng(Stream.AUDIO_DROPOUT), n, params.modality_dropout)
    if video_span is not None:
        video[video_span[0] : video_span[1]] = 0.0
    if audio_span is not None:
        audio[audio_span[0] : audio_span[1]] = 0.0

    mask = unlabeled_mask(rng(Stream.UNLABELED), n, params.unlabeled_rate)
    return VideoArrays(
        latent=latent,
        audio=audio,
        video=video,
        label_mask=mask,
        speech=speech,
        lag=lag,
        speech_ratio=ratio,
        audio_gain=gain,
        audio_dropout=audio_span,
        video_dropout=video_span,
        frame_lag=frame_lag,
        reliability=spans,
    )
