"""Parameters (the recipe's ``data.params`` blocks) of the ``affwild2`` and ``features``
datasets, and of the feature extractors they run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fusionkit.plugin import Params
from fusionkit_affwild2.backbones import AudioBackboneSpec, VisualBackboneSpec

__all__ = [
    "AffWild2Params",
    "AudioParams",
    "FeaturesParams",
    "LogMelParams",
    "SplitParams",
    "VisualParams",
    "WaveformParams",
]


class LogMelParams(Params):
    """VGGish-style log-mel front end (defaults = VGGish)."""

    sample_rate: int = Field(16000, ge=1000, description="mono waveform rate after resampling")
    window_ms: float = Field(25.0, gt=0, description="STFT window length")
    hop_ms: float = Field(10.0, gt=0, description="STFT hop; one log-mel frame per hop")
    n_mels: int = Field(64, ge=1, description="mel bands")
    f_min: float = Field(125.0, ge=0, description="lowest mel band edge (Hz)")
    f_max: float = Field(7500.0, gt=0, description="highest mel band edge (Hz)")
    log_offset: float = Field(0.01, gt=0, description="log(mel + offset)")
    patch_frames: int = Field(96, ge=1, description="log-mel frames per patch (96 = 0.96 s)")

    @model_validator(mode="after")
    def _band(self) -> LogMelParams:
        if self.f_max <= self.f_min or self.f_max > self.sample_rate / 2:
            raise ValueError(
                f"need f_min < f_max <= sample_rate / 2 (got {self.f_min}, {self.f_max}, "
                f"{self.sample_rate})"
            )
        return self


class WaveformParams(Params):
    """How a waveform backbone (wav2vec2, hubert, wavlm) is run and put on the video clock."""

    window_ms: float | None = Field(
        None,
        gt=0,
        description="length of each video frame's window; its row is the mean of the encoder "
        "frames (20 ms steps) overlapping it (null: one video frame, 1000 / fps ms)",
    )
    chunk_seconds: float = Field(
        16.0, gt=0, description="audio encoded per chunk (bounds memory on long videos)"
    )
    context_seconds: float = Field(
        2.0,
        ge=0,
        description="extra audio on each side of a chunk, encoded for context and dropped",
    )
    chunks_per_batch: int = Field(
        4, ge=1, le=1024, description="equal-length chunks per backbone call"
    )


class AudioParams(Params):
    """Audio feature extraction: decode, mono, sync, resample, then log-mel patches
    (``vggish``, ``audio_cnn``) or the waveform (``wav2vec2``, ``hubert``, ``wavlm``) into
    the backbone, one row per video frame."""

    backbone: AudioBackboneSpec = Field(
        default={"name": "vggish"},
        validate_default=True,
        description="audio_backbone applied to each frame's log-mel patch, or to the waveform",
    )
    logmel: LogMelParams = Field(
        default_factory=LogMelParams,
        description="log-mel front end of log-mel backbones (VGGish defaults)",
    )
    waveform: WaveformParams = Field(
        default_factory=WaveformParams,
        description="chunking and per-frame pooling of waveform backbones",
    )
    anchor: Literal["start", "center"] = Field(
        "start",
        description="start: frame i's patch (or window) starts at i/fps (as released, ~0.48 s "
        "look-ahead with 0.96 s patches); center: it is centred on i/fps",
    )
    sync: Literal["container", "none"] = Field(
        "container",
        description="container: shift audio by its start time minus the video's (container "
        "timestamps) so t=0 is the first video frame; none: audio sample 0 = frame 0",
    )
    batch_size: int = Field(256, ge=1, le=65_536, description="log-mel patches per backbone call")


class VisualParams(Params):
    """Visual feature extraction from the organisers' face crops."""

    backbone: VisualBackboneSpec = Field(
        default={"name": "ir50"},
        validate_default=True,
        description="visual_backbone applied to each face crop",
    )
    resize: int = Field(
        48,
        ge=4,
        description="crops are resized to resize x resize (as released: 48), then "
        "centre-cropped to the backbone's input size",
    )
    batch_size: int = Field(256, ge=1, le=65_536, description="crops per backbone call")


class SplitParams(Params):
    """Which trials form train / val: the official split or a cross-validation fold."""

    fold: int = Field(
        0,
        ge=0,
        description="0 = official split; k > 0 rolls the chunks as the released code does "
        "(fold 1 validates on the last train chunk and trains on the official val set)",
    )
    chunks: int = Field(5, ge=2, description="number of chunks the official train set is cut into")

    @model_validator(mode="after")
    def _fold_range(self) -> SplitParams:
        if self.fold > self.chunks:
            raise ValueError(f"fold must be in 0..{self.chunks} (chunks + official val)")
        return self


class AffWild2Params(Params):
    """The ``affwild2`` dataset: an Aff-Wild2 copy in the official layout (see docs/data.md)."""

    root: Path = Field(description="dataset root: cropped_aligned/, raw videos, annotations")
    annotations: Path | None = Field(
        None,
        description="folder holding Train_Set|Training_Set and Validation_Set (default: found "
        "under root: */VA_Estimation_Challenge or annotations/VA_Set)",
    )
    crops_dir: str = Field("cropped_aligned", description="face-crop folder under root")
    video_dirs: list[str] = Field(
        default_factory=lambda: ["raw_videos", "videos", "batch1", "batch2", "batch3"],
        description="folders (under root, or absolute) searched recursively for raw videos",
    )
    cache_dir: Path | None = Field(
        None, description="feature caches (default: <root>/fusionkit_cache)"
    )
    test_list: Path | None = Field(
        None, description="text file naming the test videos, one per line (enables split 'test')"
    )
    submission_template: Path | None = Field(
        None,
        description="the organisers' sample prediction file (image_location,valence,arousal); "
        "its rows define each test video's frames",
    )
    split: SplitParams = Field(
        default_factory=SplitParams, description="official split (fold 0) or a CV fold"
    )
    audio: AudioParams = Field(
        default_factory=AudioParams, description="audio feature extraction (VGGish by default)"
    )
    video: VisualParams = Field(
        default_factory=VisualParams, description="face feature extraction (IR-50 by default)"
    )
    frame_count: Literal["decode", "packets"] = Field(
        "decode",
        description="how a video's frame count is measured: decode every frame, or count "
        "demuxed packets (much faster; equal for the usual codecs)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="extraction device (auto: CUDA when present)"
    )
    verify_sources: bool = Field(
        True,
        description="when loading caches, check that raw media and crop folders are unchanged "
        "(stale caches are an error)",
    )
    missing_face: Literal["zero", "previous"] = Field(
        "zero",
        description="features of frames without a face crop: zeros, or the previous face's",
    )
    strict: bool = Field(
        False,
        description="abort on the first such problem: a trial (annotation file or test_list "
        "entry) whose raw video or face-crop folder does not exist (default: extract reports "
        "it as failed and extracts the others)",
    )


class FeaturesParams(Params):
    """The ``features`` dataset: precomputed per-video arrays plus Aff-Wild2-format labels."""

    features_dir: Path = Field(description="folder of per-video feature arrays")
    layout: Literal["by_modality", "by_video"] = Field(
        "by_modality",
        description="by_modality: <features_dir>/<modality>/<video>.npy; by_video: "
        "<features_dir>/<video>/<modality>.npy (.npy or .safetensors)",
    )
    modalities: list[str] | None = Field(
        None, description="modalities to load (default: every one found)"
    )
    labels: Path = Field(
        description="folder holding Train_Set|Training_Set and Validation_Set label files, or a "
        "root to search for */VA_Estimation_Challenge or annotations/VA_Set"
    )
    rows: Literal["all_frames", "labelled_frames"] = Field(
        "all_frames",
        description="all_frames: row i is frame i; labelled_frames: one row per non -5 label "
        "row, in order (the released compacted format); rows are put back on their frames",
    )
    shared_media: bool = Field(
        True,
        description="a <video>_left/_right without its own array uses <video>'s (e.g. audio)",
    )
    test_list: Path | None = Field(None, description="text file naming the test videos")
    submission_template: Path | None = Field(
        None,
        description="the organisers' sample prediction file (image_location,valence,arousal); "
        "its rows define each test video's frames in `fusionkit predict`",
    )
    split: SplitParams = Field(
        default_factory=SplitParams, description="official split (fold 0) or a CV fold"
    )
