"""Generator of small Aff-Wild2-format trees for tests and for trying the pipeline.

:func:`make_tree` writes, under one root, the official layout with its edge cases:

* real encoded media with audio through PyAV: H.264 + AAC in ``.mp4`` (stereo 44.1 kHz, mono
  16 kHz), MPEG-4 + MP3 in ``.avi``; frame rates 30, 30000/1001 (29.97), 25, 24000/1001
  (23.976) and 12 (below 15 fps); one video whose audio stream starts 0.2 s after its video;
* ``cropped_aligned/<trial>/%05d.jpg`` crops (1-based) with frames missing; each crop is a
  flat grey whose level encodes its frame index (:func:`crop_level`);
* ``_left`` / ``_right`` trials sharing one raw video, and ``vid_d`` beside ``vid_d_right``;
* annotation files with ``-5,-5`` runs mid-video, one with two label rows more and one with
  two fewer than its video has frames; either annotation naming (``naming``);
* a test video list and an organisers'-style sample submission whose frame lists are longer
  (padding) or shorter (truncation) than the videos.

Each audio track is low noise with a 1 kHz burst starting at a known frame, so alignment can
be checked. :func:`tree_from_clips` builds the same layout around existing real clips (e.g.
the GRID corpus): symlinks to the clips, face crops cut from their decoded frames, synthetic
labels.

Command line (nothing is written inside the repository unless you ask for it)::

    python -m tests.affwild2_fixture /tmp/aw2                       # generated media
    python -m tests.affwild2_fixture /tmp/grid_aw2 --clips ../shared/data/grid
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

__all__ = [
    "NAMINGS",
    "Fixture",
    "MediaSpec",
    "TrialSpec",
    "crop_level",
    "make_tree",
    "tree_from_clips",
    "write_annotations",
]

#: Annotation folder layouts of the ABAW editions: (partition folder parent, train, val).
NAMINGS: dict[str, tuple[str, str, str]] = {
    "abaw": ("6th_ABAW_Annotations/VA_Estimation_Challenge", "Train_Set", "Validation_Set"),
    "va_set_2021": ("annotations/VA_Set", "Train_Set", "Validation_Set"),
    "va_set_2020": ("annotations/VA_Set", "Training_Set", "Validation_Set"),
}
BURST_SECONDS = 0.3
BURST_HZ = 1000.0


@dataclass(frozen=True)
class MediaSpec:
    """One raw video of the fixture.

    Attributes:
        burst_frame: the 1 kHz burst starts at ``burst_frame / fps`` seconds of video time.
        audio_offset: seconds by which the audio stream starts after the video stream.
        audio: False writes a video-only file (no audio track).
    """

    name: str
    fps: Fraction
    frames: int
    ext: str = "mp4"
    audio_rate: int = 44100
    channels: int = 2
    burst_frame: int = 20
    audio_offset: float = 0.0
    audio: bool = True


@dataclass
class TrialSpec:
    """One trial (annotation name) of the fixture.

    Attributes:
        label_rows: rows of its annotation file (None for a test trial).
        unlabelled: ``[start, stop)`` frame ranges written as ``-5,-5``.
        missing_crops: 0-based frames without a crop file.
    """

    name: str
    media: str
    split: str
    label_rows: int | None = None
    unlabelled: list[tuple[int, int]] = field(default_factory=list)
    missing_crops: list[int] = field(default_factory=list)


@dataclass
class Fixture:
    """What :func:`make_tree` wrote (the ground truth tests compare against)."""

    root: Path
    media: dict[str, MediaSpec]
    trials: dict[str, TrialSpec]
    naming: str
    test_list: Path | None = None
    template: Path | None = None
    template_rows: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[str]:
        return sorted(t.name for t in self.trials.values() if t.split == name)

    def labels(self, trial: str) -> np.ndarray:
        """The ``(rows, 2)`` values written for ``trial`` (``-5`` where unannotated)."""
        return _label_values(self.trials[trial])


def crop_level(frame: int) -> int:
    """Grey level of the crop of 0-based ``frame`` (distinct for neighbouring frames)."""
    return 30 + (frame * 37) % 190


# --------------------------------------------------------------------------- media


def _burst_wave(spec: MediaSpec, seconds: float, rng: np.random.Generator) -> np.ndarray:
    sr = spec.audio_rate
    t = np.arange(round(seconds * sr)) / sr
    x = 0.003 * rng.standard_normal(t.shape[0])
    start = spec.burst_frame / float(spec.fps)
    on = (t >= start) & (t < start + BURST_SECONDS)
    x[on] += 0.5 * np.sin(2 * np.pi * BURST_HZ * (t[on] - start))
    return x.astype(np.float32)


def _audio_frame(chunk: np.ndarray, fmt: str, layout: str, channels: int) -> av.AudioFrame:
    planes = np.repeat(chunk[None, :], channels, axis=0)
    if fmt in ("s16", "s16p", "s32", "s32p"):
        scale, dtype = (32767, np.int16) if fmt.startswith("s16") else (2**31 - 1, np.int32)
        planes = (planes * scale).astype(dtype)
    else:
        planes = planes.astype(np.float32)
    if not fmt.endswith("p"):  # packed: one interleaved row
        planes = planes.T.reshape(1, -1)
    return av.AudioFrame.from_ndarray(np.ascontiguousarray(planes), format=fmt, layout=layout)


def write_media(path: Path, spec: MediaSpec, seed: int = 0, size: tuple[int, int] = (48, 40)):
    """Encode ``spec`` into ``path`` (video frames of a moving gradient, burst audio)."""
    video_codec, audio_codec = ("libx264", "aac") if spec.ext == "mp4" else ("mpeg4", "libmp3lame")
    rng = np.random.default_rng(seed)
    width, height = size
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        vs = out.add_stream(video_codec, rate=spec.fps)
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        aus = out.add_stream(audio_codec, rate=spec.audio_rate) if spec.audio else None
        if aus is not None:
            aus.layout = "stereo" if spec.channels == 2 else "mono"
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(spec.frames):
            img = ((xx * 4 + yy * 2 + i * 6) % 256).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.stack([img, img[::-1], 255 - img], -1), "rgb24")
            frame.pts = i
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode(None):
            out.mux(packet)
        if aus is None:
            return
        wave = _burst_wave(spec, spec.frames / float(spec.fps) - spec.audio_offset, rng)
        fmt = aus.codec_context.format.name
        step = 1024
        pts = round(spec.audio_offset * spec.audio_rate)
        for s in range(0, wave.shape[0], step):
            frame = _audio_frame(wave[s : s + step], fmt, aus.layout.name, spec.channels)
            frame.sample_rate = spec.audio_rate
            frame.pts, frame.time_base = pts, Fraction(1, spec.audio_rate)
            pts += min(step, wave.shape[0] - s)
            for packet in aus.encode(frame):
                out.mux(packet)
        for packet in aus.encode(None):
            out.mux(packet)


def write_jpeg(path: Path, rgb: np.ndarray) -> None:
    """Encode an ``(H, W, 3)`` uint8 image as JPEG with FFmpeg's MJPEG encoder."""
    h, w = rgb.shape[:2]
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuvj444p"
    ctx.time_base = Fraction(1, 25)
    ctx.options = {"qscale": "2"}
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), "rgb24").reformat(
        format="yuvj444p"
    )
    packets = list(ctx.encode(frame)) + list(ctx.encode(None))
    path.write_bytes(b"".join(bytes(p) for p in packets))


# --------------------------------------------------------------------------- labels


def _label_values(trial: TrialSpec) -> np.ndarray:
    assert trial.label_rows is not None
    k = np.arange(trial.label_rows)
    phase = (sum(map(ord, trial.name)) % 17) / 3.0
    v = 0.6 * np.sin(2 * np.pi * k / 53.0 + phase)
    a = 0.1 + 0.4 * np.cos(2 * np.pi * k / 41.0 + 0.5 * phase)
    out = np.round(np.stack([v, a], 1), 4)
    for lo, hi in trial.unlabelled:
        out[lo:hi] = -5
    return out


def write_annotations(fixture: Fixture, naming: str) -> Path:
    """Write the label files of every labelled trial in the ``naming`` layout (returns the
    folder holding the partition folders)."""
    parent, train_name, val_name = NAMINGS[naming]
    base = fixture.root / parent
    for trial in fixture.trials.values():
        if trial.split == "test":
            continue
        folder = base / (train_name if trial.split == "train" else val_name)
        folder.mkdir(parents=True, exist_ok=True)
        values = _label_values(trial)
        lines = ["valence,arousal"] + [
            "-5,-5" if row[0] == -5 else f"{row[0]:g},{row[1]:g}" for row in values
        ]
        (folder / f"{trial.name}.txt").write_text("\n".join(lines) + "\n")
    fixture.naming = naming
    return base


def _write_crops(root: Path, trial: TrialSpec, frames: int, size: int) -> None:
    folder = root / "cropped_aligned" / trial.name
    folder.mkdir(parents=True, exist_ok=True)
    missing = set(trial.missing_crops)
    for k in range(frames):
        if k in missing:
            continue
        img = np.full((size, size, 3), crop_level(k), dtype=np.uint8)
        write_jpeg(folder / f"{k + 1:05d}.jpg", img)


def _write_test_files(fixture: Fixture, extra: dict[str, int]) -> None:
    tests = fixture.split("test")
    if not tests:
        return
    fixture.test_list = fixture.root / "test_set_release.txt"
    fixture.test_list.write_text("\n".join(tests) + "\n")
    fixture.template = fixture.root / "VA_test_set_sample.txt"
    rows = ["image_location,valence,arousal"]
    for name in tests:
        media = fixture.media[fixture.trials[name].media]
        n = max(1, media.frames + extra.get(name, 0))
        fixture.template_rows[name] = n
        rows += [f"{name}/{k + 1:05d}.jpg,0,0" for k in range(n)]
    fixture.template.write_text("\n".join(rows) + "\n")


# --------------------------------------------------------------------------- trees


def make_tree(root: Path, naming: str = "abaw", seed: int = 0, crop_size: int = 24) -> Fixture:
    """Write the generated tree described in the module docstring under ``root``."""
    ntsc, film = Fraction(30000, 1001), Fraction(24000, 1001)
    media = [
        MediaSpec("vid_a", Fraction(30), 75, burst_frame=21),
        MediaSpec("vid_b", ntsc, 66, audio_rate=16000, channels=1, burst_frame=17),
        MediaSpec("vid_c", Fraction(25), 60, ext="avi", audio_rate=22050, channels=1),
        MediaSpec("vid_d", Fraction(12), 30, burst_frame=9),
        MediaSpec("vid_e", film, 54, burst_frame=13, audio_offset=0.2),
        MediaSpec("vid_f", Fraction(30), 45, burst_frame=12),
        MediaSpec("vid_g", Fraction(25), 40, burst_frame=10),
    ]
    frames = {m.name: m.frames for m in media}
    trials = [
        TrialSpec("vid_a_left", "vid_a", "train", 75, [(30, 41)], [0, 1, 50]),
        TrialSpec("vid_a_right", "vid_a", "train", 75, [], [10, 11, 12]),
        TrialSpec("vid_b", "vid_b", "train", 68, [(5, 9), (40, 47)], [33]),
        TrialSpec("vid_c", "vid_c", "train", 58, [], []),
        TrialSpec("vid_d_right", "vid_d", "train", 30, [(12, 15)], [29]),
        TrialSpec("vid_d", "vid_d", "val", 30, [], [3]),
        TrialSpec("vid_e", "vid_e", "val", 54, [(20, 30)], [7, 8]),
        TrialSpec("vid_f", "vid_f", "test", None, [], [44]),
        TrialSpec("vid_g_left", "vid_g", "test", None, [], []),
    ]
    fixture = Fixture(Path(root), {m.name: m for m in media}, {t.name: t for t in trials}, naming)
    for k, m in enumerate(media):
        write_media(fixture.root / "raw_videos" / f"{m.name}.{m.ext}", m, seed + k)
    for t in trials:
        n = frames[t.media] if t.label_rows is None else min(t.label_rows, frames[t.media])
        _write_crops(fixture.root, t, n, crop_size)
    write_annotations(fixture, naming)
    _write_test_files(fixture, {"vid_f": 3, "vid_g_left": -2})
    return fixture


def _decode_frames(path: Path) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        rate = Fraction(stream.average_rate or stream.guessed_rate)
        return [f.to_ndarray(format="rgb24") for f in c.decode(stream)], rate


def _resize_nearest(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    ys = (np.arange(size) * h / size).astype(int)
    xs = (np.arange(size) * w / size).astype(int)
    return img[ys][:, xs]


def tree_from_clips(
    clips: list[Path],
    root: Path,
    naming: str = "abaw",
    seed: int = 0,
    crop_size: int = 48,
    splits: tuple[float, float] = (0.6, 0.2),
) -> Fixture:
    """An Aff-Wild2-layout tree around real clips (symlinked, never copied): face crops cut
    from the decoded frames (a square around the upper centre, where a frontal talking face
    sits), synthetic labels with a ``-5`` run, a few crops removed, the last clips as test."""
    rng = np.random.default_rng(seed)
    clips = sorted(clips)
    n_train = max(1, int(len(clips) * splits[0]))
    n_val = max(1, int(len(clips) * splits[1]))
    fixture = Fixture(Path(root), {}, {}, naming)
    raw = fixture.root / "raw_videos"
    raw.mkdir(parents=True, exist_ok=True)
    for i, clip in enumerate(clips):
        link = raw / clip.name
        if not link.exists():
            os.symlink(clip.resolve(), link)
        images, fps = _decode_frames(clip)
        n = len(images)
        split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
        fixture.media[clip.stem] = MediaSpec(clip.stem, fps, n, ext=clip.suffix[1:])
        lo = int(rng.integers(n // 4, n // 2))
        trial = TrialSpec(
            clip.stem,
            clip.stem,
            split,
            None if split == "test" else n,
            [] if split == "test" else [(lo, lo + max(2, n // 10))],
            sorted(rng.choice(n, size=max(1, n // 25), replace=False).tolist()),
        )
        fixture.trials[trial.name] = trial
        folder = fixture.root / "cropped_aligned" / trial.name
        folder.mkdir(parents=True, exist_ok=True)
        h, w = images[0].shape[:2]
        side = int(0.55 * h)
        top, left = max(0, int(0.42 * h) - side // 2), max(0, w // 2 - side // 2)
        for k, img in enumerate(images):
            if k in trial.missing_crops:
                continue
            face = img[top : top + side, left : left + side]
            write_jpeg(folder / f"{k + 1:05d}.jpg", _resize_nearest(face, crop_size))
    write_annotations(fixture, naming)
    _write_test_files(fixture, {})
    return fixture


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="where to write the tree (created)")
    ap.add_argument("--clips", type=Path, help="build around the media in this folder instead")
    ap.add_argument("--naming", choices=sorted(NAMINGS), default="abaw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.clips is not None:
        clips = sorted(p for p in args.clips.iterdir() if p.suffix.lower() in {".mpg", ".mp4"})
        fx = tree_from_clips(clips, args.root, args.naming, args.seed)
    else:
        fx = make_tree(args.root, args.naming, args.seed)
    counts = {s: len(fx.split(s)) for s in ("train", "val", "test")}
    print(f"wrote {fx.root}: {counts}; test list {fx.test_list}; template {fx.template}")


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- test helpers

#: Tiny extractors for tests (seconds on a CPU); the fixture's crops are 24x24.
TINY_AUDIO = {"name": "audio_cnn", "params": {"channels": [4, 8], "dim": 16}}
TINY_VIDEO = {"name": "face_cnn", "params": {"channels": [4, 8], "dim": 12, "input_size": 20}}
_SHARED: dict[str, Fixture] = {}


def tiny_params(root: Path, **extra: object) -> dict:
    """``data.params`` of the ``affwild2`` dataset on ``root`` with the tiny extractors."""
    params: dict = {
        "root": str(root),
        "audio": {"backbone": TINY_AUDIO, "batch_size": 64},
        "video": {"backbone": TINY_VIDEO, "resize": 24, "batch_size": 64},
        "device": "cpu",
    }
    params.update(extra)
    return params


def shared_tree(base: Path) -> Fixture:
    """One generated tree (with its test list and template) per test session, extracted with
    the tiny extractors; later calls return the same tree."""
    if "tree" not in _SHARED:
        from fusionkit.core.registry import get_registry
        from fusionkit_affwild2.dataset import AffWild2Dataset
        from fusionkit_affwild2.params import AffWild2Params

        fx = make_tree(base / "aw2")
        comp = get_registry().get("dataset", "affwild2")
        params = comp.params.model_validate(tiny_params(fx.root, test_list=str(fx.test_list)))
        assert isinstance(params, AffWild2Params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the label/frame count warning is tested itself
            report = AffWild2Dataset(params).extract(workers=1, progress=False)
        assert not report.failed, report.failed
        _SHARED["tree"] = fx
    return _SHARED["tree"]


#: Foundation backbones with random weights (never downloaded): WavLM Base and DINOv2 ViT-S/14
#: at 28 px (2 x 2 patches), for tests on real media.
FOUNDATION_AUDIO = {"name": "wavlm", "params": {"size": "base", "pretrained": False}}
FOUNDATION_VIDEO = {"name": "dinov2", "params": {"pretrained": False, "img_size": 28}}


def overlap_mean(
    frames: Any,
    k: int,
    fps: Fraction,
    *,
    sample_rate: int = 16000,
    hop: int = 320,
    window: int = 400,
    anchor: str = "start",
    width: Fraction | None = None,
) -> Any:
    """Row ``k`` computed independently of the extractor: the mean of the encoder frames whose
    span ``[j * hop, j * hop + window)`` (in samples) overlaps video frame ``k``'s window
    (``width`` seconds, default ``1 / fps``), with exact fractions; a window past the end
    takes the nearest frame."""
    width = Fraction(1) / fps if width is None else width
    start = Fraction(k) / fps - (width / 2 if anchor == "center" else 0)
    end = start + width
    hits = [
        j
        for j in range(frames.shape[0])
        if Fraction(j * hop, sample_rate) < end and Fraction(j * hop + window, sample_rate) > start
    ]
    if not hits:
        hits = [0 if end <= 0 else frames.shape[0] - 1]
    return frames[hits].mean(0)
