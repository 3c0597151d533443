"""Parameters (the recipe's ``data.params`` block) of the ``synthetic`` dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fusionkit.plugin import Params

__all__ = ["MAX_FEATURE_VALUES", "MAX_TOTAL_FRAMES", "SyntheticParams"]

#: Most frames the three splits may hold together (counted at ``max_frames`` per video): the
#: dataset is generated into memory, about 1.3 KB a frame at the default sizes.
MAX_TOTAL_FRAMES = 2_000_000
#: Most feature values (frames x (audio_dim + video_dim)) the three splits may hold together
#: (4 GB of float32).
MAX_FEATURE_VALUES = 1_000_000_000


class SyntheticParams(Params):
    """Knobs of the synthetic audio-visual valence/arousal dataset (see ``docs/synthetic.md``).

    Every knob draws from its own random stream, so changing one (say ``lag_max``) leaves
    everything it does not govern (latents, speech activity, noise draws, ...) bitwise unchanged.
    """

    seed: int = Field(
        0,
        ge=0,
        le=2**63 - 1,
        description="seed of the dataset itself (observation maps and every video); "
        "independent of the training seed",
    )
    num_train: int = Field(48, ge=1, le=100_000, description="number of videos in 'train'")
    num_val: int = Field(16, ge=1, le=100_000, description="number of videos in 'val'")
    num_test: int = Field(16, ge=1, le=100_000, description="number of videos in 'test'")
    min_frames: int = Field(300, ge=16, le=1_000_000, description="shortest video, in frames")
    max_frames: int = Field(1200, ge=16, le=1_000_000, description="longest video, in frames")
    fps: float = Field(
        30.0,
        ge=1.0,
        le=240.0,
        description="frames per second; the latent dynamics are specified in seconds, so a "
        "higher fps gives more (and more correlated) frames per second of affect",
    )
    audio_dim: int = Field(32, ge=4, le=4096, description="size of an audio feature vector")
    video_dim: int = Field(48, ge=4, le=4096, description="size of a video feature vector")
    audio_noise: float = Field(
        0.5, ge=0.0, le=10.0, description="std of i.i.d. Gaussian noise added to audio features"
    )
    video_noise: float = Field(
        0.5, ge=0.0, le=10.0, description="std of i.i.d. Gaussian noise added to video features"
    )
    lag_max: int = Field(
        0,
        ge=0,
        le=10_000,
        description="max |audio lag| in frames; each video draws an integer lag uniformly in "
        "[-lag_max, lag_max] and audio frame i observes the latents at frame i - lag "
        "(edge-clamped); 0 = aligned",
    )
    frame_drop: float = Field(
        0.0,
        ge=0.0,
        le=0.95,
        description="probability that a frame of a modality is a frozen copy of the previous "
        "one (independently per modality)",
    )
    modality_dropout: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="probability, per video and modality, that one span of 10-50% of the "
        "video's frames is missing in that modality (features set to zeros)",
    )
    unlabeled_rate: float = Field(
        0.02,
        ge=0.0,
        le=0.5,
        description="approximate fraction of frames, in runs of 5-30 frames, that carry no "
        "label (label_mask False, label 0), like Aff-Wild2's -5 rows",
    )
    cross_talk: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="visibility of the weak dimension in each modality (arousal in video, "
        "valence in audio): the correlation of its display with the displayed affect, the rest "
        "being a smooth nuisance; 0 = invisible, 1 = as visible as the strong dimension",
    )
    display_noise: float = Field(
        0.4,
        ge=0.0,
        le=5.0,
        description="std (in latent stds) of the smooth, per-modality noise in how faces and "
        "voices display the affect; sets the ceiling any model can reach",
    )
    speech_ratio: float = Field(
        0.6,
        ge=0.05,
        le=1.0,
        description="mean fraction of frames with speech; audio carries affect only while "
        "someone speaks (per-video ratio varies around this)",
    )

    lag_drift: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="amplitude in frames of a slow drift of the audio lag within each video, "
        "added to the constant lag of lag_max (per-frame lag in info().frame_lag, rounded to "
        "whole frames); 0 = the lag stays constant",
    )
    lag_drift_period: float = Field(
        20.0,
        ge=0.5,
        le=3600.0,
        description="time scale of the drift in seconds: the period of 'sine'; the time in "
        "which 'walk' moves by about lag_drift",
    )
    lag_drift_kind: Literal["sine", "walk"] = Field(
        "sine",
        description="'sine': lag_drift * sin(2 pi t / period + random phase); 'walk': a "
        "random walk with smooth increments, reflected at +-lag_drift",
    )
    reliability_rate: float = Field(
        0.0,
        ge=0.0,
        le=0.9,
        description="expected fraction of each video's frames inside spans where one modality "
        "is unreliable (noisy, zeroed, frozen or silent; see reliability_kinds); 0 = off",
    )
    reliability_span: float = Field(
        2.0,
        ge=0.1,
        le=60.0,
        description="mean length of an unreliable span in seconds (each uniform in 0.5-1.5 "
        "times this)",
    )
    reliability_modality: Literal["either", "audio", "video"] = Field(
        "either",
        description="the modality of the unreliable spans; 'either': each span picks audio or "
        "video with probability 1/2 (spans never overlap, so one modality at a time)",
    )
    reliability_kinds: list[Literal["noise", "zero", "freeze", "silence"]] = Field(
        default_factory=lambda: ["noise", "zero", "freeze", "silence"],
        min_length=1,
        max_length=4,
        description="what an unreliable span does, drawn uniformly per span among these: "
        "'noise' adds Gaussian noise (reliability_noise), 'zero' zeroes the features and "
        "'freeze' repeats the frame before the span (both: present False), 'silence' mutes "
        "the voice in the audio (audio spans only)",
    )
    reliability_noise: float = Field(
        3.0,
        ge=0.0,
        le=20.0,
        description="std of the Gaussian noise added on 'noise' spans (clean features have "
        "about unit variance)",
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> SyntheticParams:
        if self.min_frames > self.max_frames:
            raise ValueError(
                f"min_frames ({self.min_frames}) must not exceed max_frames ({self.max_frames})"
            )
        return self

    @model_validator(mode="after")
    def _check_total_size(self) -> SyntheticParams:
        videos = self.num_train + self.num_val + self.num_test
        frames = videos * self.max_frames
        if frames > MAX_TOTAL_FRAMES:
            raise ValueError(
                f"num_train + num_val + num_test ({videos:,} videos) x max_frames "
                f"({self.max_frames:,}) is {frames:,} frames; the synthetic dataset holds at "
                f"most {MAX_TOTAL_FRAMES:,} frames in all (it is generated in memory): lower "
                "the video counts or max_frames"
            )
        values = frames * (self.audio_dim + self.video_dim)
        if values > MAX_FEATURE_VALUES:
            raise ValueError(
                f"{frames:,} frames x (audio_dim + video_dim = "
                f"{self.audio_dim + self.video_dim:,}) is {values:,} feature values; the "
                f"synthetic dataset holds at most {MAX_FEATURE_VALUES:,} (it is generated in "
                "memory): lower the video counts, max_frames or the feature sizes"
            )
        return self

    @model_validator(mode="after")
    def _check_reliability(self) -> SyntheticParams:
        kinds = self.reliability_kinds
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"reliability_kinds lists a kind twice: {kinds}")
        if self.reliability_modality != "audio" and set(kinds) == {"silence"}:
            raise ValueError(
                "reliability_kinds ['silence'] applies to audio only, but "
                f"reliability_modality is {self.reliability_modality!r}: add a video kind "
                "(noise, zero, freeze) or set reliability_modality: audio"
            )
        return self
