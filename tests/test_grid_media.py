"""Raw-media smoke tests on real clips of the GRID corpus (CC BY 4.0, Cooke et al. 2006):
decoding, resampling, per-frame log-mel patches on the 25 fps video clock checked against the
word timings, face frames, extract -> train -> predict end to end on a tree built around
the clips, and the same with foundation backbones (WavLM, DINOv2; random weights, offline),
their rows checked frame by frame against an independent computation.

The clips live outside the repository: ``<repo>/../shared/data/grid`` or
``$FUSIONKIT_GRID_DIR``. Without them every test here is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fusionkit.cli import app
from fusionkit.core.registry import get_registry
from fusionkit_affwild2.backbones import AudioBackboneSpec, VisualBackboneSpec
from fusionkit_affwild2.faces import prepare_faces, read_faces
from fusionkit_affwild2.logmel import LogMel, frame_patches, patch_starts
from fusionkit_affwild2.media import decode_audio, load_audio, probe
from tests.affwild2_fixture import (
    FOUNDATION_AUDIO,
    FOUNDATION_VIDEO,
    TINY_AUDIO,
    TINY_VIDEO,
    _decode_frames,
    overlap_mean,
    tree_from_clips,
)
from tests.conftest import REPO

GRID = Path(os.environ.get("FUSIONKIT_GRID_DIR", REPO.parent / "shared" / "data" / "grid"))
CLIP = GRID / "swwp2s.mpg"
pytestmark = [
    pytest.mark.skipif(
        not CLIP.is_file(),
        reason=f"GRID clips not found at {GRID} (set FUSIONKIT_GRID_DIR to the folder holding "
        "swwp2s.mpg and the other GRID .mpg clips)",
    ),
    pytest.mark.filterwarnings("ignore:affwild2.*label rows"),
]


def speech_onset_seconds() -> float:
    """Start of the first word in ``swwp2s.align`` (units of 1/25000 s)."""
    for line in (GRID / "swwp2s.align").read_text().splitlines():
        start, _, word = line.split()
        if word != "sil":
            return int(start) / 25000
    raise AssertionError("no word in the alignment")


def test_decode_and_resample_a_real_clip():
    info = probe(CLIP)
    assert (info.fps_exact, info.num_frames) == ("25/1", 75)
    assert (info.sample_rate, info.channels) == (44100, 2)
    wave, rate = decode_audio(CLIP, "container")
    assert rate == 44100 and wave.dim() == 1
    assert 2.9 < wave.numel() / rate < 3.0  # the audio is ~48 ms shorter than the video
    wave16 = load_audio(CLIP, 16000, "container")
    assert abs(wave16.numel() - wave.numel() * 16000 / 44100) <= 2
    assert float(wave.abs().max()) <= 1.0  # s16 scaled to [-1, 1]
    # speech is below 8 kHz: resampling keeps its energy
    assert float(wave16.square().mean()) == pytest.approx(float(wave.square().mean()), rel=0.05)


def test_logmel_patches_follow_the_video_clock_and_the_speech():
    front = LogMel()
    lm = front(load_audio(CLIP, 16000, "container"))
    energy = lm.mean(dim=1)
    silence, speech = float(energy[:40].median()), float(energy[60:200].median())
    assert speech - silence > 1.5
    onset = int(torch.nonzero(energy > (silence + speech) / 2)[0, 0]) / front.frames_per_second
    assert abs(onset - speech_onset_seconds()) < 0.1  # 0.49 s in swwp2s.align
    starts = patch_starts(75, 25.0, front.frames_per_second, 96, "start")
    assert torch.equal(starts, torch.arange(75) * 4)  # 25 fps: 4 log-mel frames per frame
    patches = frame_patches(lm, starts, 96)
    assert patches.shape == (75, 96, 64)
    first_word = round(speech_onset_seconds() * 25)  # frame 12
    assert float(patches[first_word].mean()) > float(patches[0].mean()) + 0.5
    centred = patch_starts(75, 25.0, front.frames_per_second, 96, "center")
    assert torch.equal(centred - starts, torch.full((75,), -48))


def test_face_frames_of_a_real_clip():
    images, fps = _decode_frames(CLIP)
    assert (len(images), images[0].shape, fps) == (75, (288, 360, 3), 25)
    faces = prepare_faces([img[60:220, 100:260] for img in images], 48, 40)
    assert faces.shape == (75, 3, 40, 40)
    assert faces.min() >= -1 and faces.max() <= 1
    assert float(faces.std(dim=0).mean()) > 0.01  # the talking face moves


def test_grid_extract_run_predict(tmp_path):
    clips = sorted(GRID.glob("*.mpg"))
    fx = tree_from_clips(clips, tmp_path / "grid", crop_size=24)
    assert not any((fx.root / "raw_videos").glob("*.mpg")) or all(
        p.is_symlink() for p in (fx.root / "raw_videos").iterdir()
    )
    recipe = str(REPO / "recipes" / "affwild2" / "tagf.yaml")
    args = [
        f"data.params.root={fx.root}",
        f"data.params.audio.backbone={TINY_AUDIO}",
        f"data.params.video.backbone={TINY_VIDEO}",
        "data.params.video.resize=24",
        f"data.params.test_list={fx.test_list}",
    ]
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = runner.invoke(app, ["extract", recipe, *args, "-q"])
        assert res.exit_code == 0, res.output
        res = runner.invoke(
            app,
            [
                "run",
                recipe,
                *args,
                "training.epochs=1",
                "model.targets=[valence,arousal]",
                "model.encoders.video.params.channels=[32, 32]",
                "model.encoders.audio.params.channels=[16, 16]",
                f"output.dir={tmp_path / 'runs'}",
                "-q",
            ],
        )
        assert res.exit_code == 0, res.output
        out = tmp_path / "grid_test.csv"
        run_dir = tmp_path / "runs" / "affwild2_tagf_valence"
        res = runner.invoke(app, ["predict", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = out.read_text().splitlines()
    tests = fx.split("test")
    assert lines[0] == "image_location,valence,arousal"
    assert len(lines) == 1 + 75 * len(tests)
    assert lines[1] == f"{tests[0]}/00001.jpg," + lines[1].split(",", 1)[1]
    values = torch.tensor([[float(x) for x in line.split(",")[1:]] for line in lines[1:]])
    assert torch.isfinite(values).all() and values.abs().max() <= 1.0


@pytest.mark.filterwarnings("ignore:affwild2.*belong to no split")  # the test clips
def test_grid_foundation_features_are_aligned_and_train(tmp_path, monkeypatch):
    """`fusionkit extract` with WavLM Base and DINOv2 ViT-S/14 (random weights, network
    blocked) writes one row per video frame: row k of audio is the mean of the encoder frames
    overlapping [k/25, (k+1)/25) and row k of video is crop k+1's embedding, both recomputed
    here independently; then the foundation recipe trains on them."""
    pytest.importorskip(
        "timm", reason="timm is not installed (pip install 'fusionkit[foundation]')"
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    fx = tree_from_clips(sorted(GRID.glob("*.mpg")), tmp_path / "grid", crop_size=28)
    recipe = str(REPO / "recipes" / "affwild2" / "foundation.yaml")
    args = [
        f"data.params.root={fx.root}",
        f"data.params.audio.backbone={FOUNDATION_AUDIO}",
        f"data.params.video.backbone={FOUNDATION_VIDEO}",
        "data.params.video.resize=28",
    ]
    runner = CliRunner()
    res = runner.invoke(app, ["extract", recipe, *args, "-q"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert (
        "warning: affwild2: the audio backbone 'wavlm' and video backbone 'dinov2' have random"
        in out
    )

    comp = get_registry().get("dataset", "affwild2")
    ds = comp.build(
        comp.params.model_validate(
            {
                "root": str(fx.root),
                "audio": {"backbone": FOUNDATION_AUDIO},
                "video": {"backbone": FOUNDATION_VIDEO, "resize": 28},
            }
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (video, *_) = ds.videos("train")
    spec = fx.trials[video.name]
    clip = GRID / f"{spec.media}.mpg"
    assert video.num_frames == 75 and video.fps == 25.0
    assert video.features["audio"].shape == (75, 768) and video.features["video"].shape == (75, 384)
    audio_model = AudioBackboneSpec.model_validate(FOUNDATION_AUDIO).build()
    face_model = VisualBackboneSpec.model_validate(FOUNDATION_VIDEO).build()
    wave = load_audio(clip, 16000, "container")
    with torch.inference_mode():
        frames = audio_model(wave[None])[0]
    assert frames.shape[0] == 1 + (wave.numel() - 400) // 320 == 148  # 2.97 s at 50 Hz
    crops = fx.root / "cropped_aligned" / video.name
    missing = spec.missing_crops[0]
    for k in (0, 12, 37, 73, 74):
        expected = overlap_mean(frames, k, Fraction(25))
        torch.testing.assert_close(video.features["audio"][k], expected, atol=1e-4, rtol=1e-4)
        if k in spec.missing_crops:
            continue
        with torch.inference_mode():
            face = face_model(read_faces([crops / f"{k + 1:05d}.jpg"], 28, 28))[0]
        torch.testing.assert_close(video.features["video"][k], face, atol=1e-4, rtol=1e-4)
    assert not video.present["video"][missing] and not video.features["video"][missing].any()
    seconds = wave.numel() / 16000  # the audio ends ~30 ms before the video
    expected_present = [k / 25 < seconds for k in range(75)]
    assert video.present["audio"].tolist() == expected_present

    res = runner.invoke(
        app,
        [
            "run",
            recipe,
            *args,
            "training.epochs=2",
            "model.encoders.video.params.channels=[32, 32]",
            "model.encoders.audio.params.channels=[16, 16]",
            f"output.dir={tmp_path / 'runs'}",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads(
        (tmp_path / "runs" / "affwild2_foundation_tagf_valence" / "metrics.json").read_text()
    )
    assert metrics, metrics
