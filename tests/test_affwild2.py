"""The ``affwild2`` dataset on a generated tree in the official layout, and the generic
``features`` dataset: label parsing, annotation namings, folds, media probing, audio and face
alignment by true frame index, error messages that name the file."""

from __future__ import annotations

import shutil
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fusionkit.core.errors import DataError
from fusionkit.core.recipe import load_recipe
from fusionkit.core.registry import get_registry
from fusionkit_affwild2.backbones import AudioBackboneSpec, VisualBackboneSpec
from fusionkit_affwild2.dataset import AffWild2Dataset, fit_rows, forward_fill
from fusionkit_affwild2.extraction import build_backbone
from fusionkit_affwild2.faces import read_faces
from fusionkit_affwild2.layout import (
    find_annotation_sets,
    fold_split,
    read_labels,
    read_name_list,
    read_submission_template,
)
from fusionkit_affwild2.logmel import LogMel, frame_patches, patch_starts
from fusionkit_affwild2.media import decode_audio, load_audio, probe
from tests.affwild2_fixture import (
    BURST_HZ,
    NAMINGS,
    TINY_AUDIO,
    TINY_VIDEO,
    Fixture,
    crop_level,
    shared_tree,
    tiny_params,
    write_annotations,
)
from tests.conftest import REPO

pytestmark = [
    pytest.mark.filterwarnings("ignore:affwild2.*belong to no split"),  # no test_list
    pytest.mark.filterwarnings("ignore:affwild2.*have random weights"),  # tiny backbones
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Fixture:
    return shared_tree(tmp_path_factory.getbasetemp())


def dataset(root: Path, **extra) -> AffWild2Dataset:
    comp = get_registry().get("dataset", "affwild2")
    return AffWild2Dataset(comp.params.model_validate(tiny_params(root, **extra)))


@pytest.fixture(scope="module")
def train_videos(tree):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        videos = {v.name: v for v in dataset(tree.root).videos("train")}
    return videos, [str(w.message) for w in caught]


# --------------------------------------------------------------------------- labels


def test_labels_mask_minus5_rows_in_place(tree):
    trial = tree.trials["vid_b"]
    lab = read_labels(tree.root / NAMINGS["abaw"][0] / "Train_Set" / "vid_b.txt")
    truth = tree.labels("vid_b")
    assert lab.rows == trial.label_rows == 68
    unlabelled = np.zeros(68, bool)
    for lo, hi in trial.unlabelled:
        unlabelled[lo:hi] = True
    assert np.array_equal(~lab.mask, unlabelled)
    # no compaction: the row after a -5 run is still that frame's label
    np.testing.assert_allclose(lab.values[lab.mask], truth[~unlabelled], atol=1e-6)
    assert (lab.values[~lab.mask] == 0).all()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("v,a\n0.1,0.2\n", r"bad\.txt:1: expected the header 'valence,arousal'"),
        ("valence,arousal\n0.1,0.2\n0.3\n", r"bad\.txt:3: expected two comma-separated"),
        ("valence,arousal\n0.1,0.2\n1.5,0.1\n", r"bad\.txt:3: values must be in \[-1, 1\]"),
        ("valence,arousal\n", r"bad\.txt: header but no frame rows"),
    ],
)
def test_label_errors_name_file_and_line(tmp_path, text, match):
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(DataError, match=match):
        read_labels(tmp_path / "bad.txt")


def test_unreadable_label_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"cannot read annotation file .*missing\.txt"):
        read_labels(tmp_path / "missing.txt")


@pytest.mark.parametrize("naming", sorted(NAMINGS))
def test_both_annotation_namings_are_found(tmp_path, tree, naming):
    fx = Fixture(tmp_path, tree.media, tree.trials, naming)
    base = write_annotations(fx, naming)
    sets = find_annotation_sets(tmp_path)
    assert sets.base == base
    assert sets.train.name == NAMINGS[naming][1]
    assert sorted(p.stem for p in sets.train.glob("*.txt")) == tree.split("train")
    assert sorted(p.stem for p in sets.val.glob("*.txt")) == tree.split("val")


def test_annotation_discovery_errors(tmp_path, tree):
    with pytest.raises(DataError, match=r"no VA annotations under .*VA_Estimation_Challenge"):
        find_annotation_sets(tmp_path)
    fx = Fixture(tmp_path, tree.media, tree.trials, "abaw")
    write_annotations(fx, "abaw")
    write_annotations(fx, "va_set_2020")
    with pytest.raises(
        DataError, match=r"several VA annotation folders.*data\.params\.annotations"
    ):
        find_annotation_sets(tmp_path)
    chosen = find_annotation_sets(tmp_path, Path("annotations/VA_Set"))
    assert chosen.train.name == "Training_Set"


# --------------------------------------------------------------------------- splits


def test_folds_follow_the_released_chunks():
    train = [f"t{i:03d}" for i in range(356)]
    val = [f"v{i:03d}" for i in range(76)]
    tr0, va0 = fold_split(train, val, 0)
    assert (tr0, va0) == (train, val)  # fold 0 = official split
    tr1, va1 = fold_split(train, val, 1)
    assert va1 == train[284:356]  # the last chunk (trials 284-355) validates
    assert set(tr1) == set(train[:284]) | set(val)
    sizes = [len(fold_split(train, val, k)[1]) for k in range(6)]
    assert sizes == [76, 72, 71, 71, 71, 71]
    vals = [fold_split(train, val, k)[1] for k in range(6)]
    assert sorted(t for v in vals for t in v) == sorted(train + val)  # each validates once
    for k in range(6):
        tr, va = fold_split(train, val, k)
        assert not set(tr) & set(va) and len(tr) + len(va) == 432
    with pytest.raises(DataError, match="out of range"):
        fold_split(train, val, 6)


def test_dataset_splits_and_fold(tree):
    ds = dataset(tree.root)
    assert ds.splits() == ("train", "val")
    assert ds.trials("train") == tree.split("train")
    assert ds.trials("val") == tree.split("val")
    with pytest.raises(DataError, match=r"no split 'test'.*test_list"):
        ds.trials("test")
    ds1 = dataset(tree.root, split={"fold": 1})
    assert ds1.trials("val") == [tree.split("train")[-1]]
    assert set(ds1.trials("train")) >= set(tree.split("val"))
    ds_test = dataset(tree.root, test_list=str(tree.test_list))
    assert ds_test.trials("test") == tree.split("test")


def test_name_list_and_template(tree, tmp_path):
    assert read_name_list(tree.test_list) == tree.split("test")
    rows = read_submission_template(tree.template)
    assert {k: len(v) for k, v in rows.items()} == tree.template_rows
    assert rows["vid_f"][0] == ("vid_f/00001.jpg", 0)
    bad = tmp_path / "t.txt"
    bad.write_text("image_location,valence,arousal\nvid_f/frame1.png,0,0\n")
    with pytest.raises(DataError, match=r"t\.txt:2: expected '<video>/<5-digit frame>\.jpg'"):
        read_submission_template(bad)


# --------------------------------------------------------------------------- media


def test_probe_reads_fps_from_the_container(tree):
    for spec in tree.media.values():
        path = tree.root / "raw_videos" / f"{spec.name}.{spec.ext}"
        info = probe(path)
        assert Fraction(info.fps_exact) == spec.fps, spec.name
        assert info.num_frames == spec.frames, spec.name
        assert probe(path, "packets").num_frames == spec.frames, spec.name
    assert {float(m.fps) < 15 for m in tree.media.values()} == {True, False}


def _onset(wave: torch.Tensor, rate: int) -> float:
    return float(torch.nonzero(wave.abs() > 0.2)[0, 0]) / rate


def test_audio_container_sync_aligns_a_late_audio_stream(tree):
    spec = tree.media["vid_e"]  # its audio stream starts 0.2 s after the video
    path = tree.root / "raw_videos" / "vid_e.mp4"
    expected = spec.burst_frame / float(spec.fps) + spec.audio_offset
    synced, rate = decode_audio(path, "container")
    assert abs(_onset(synced, rate) - expected) < 0.005
    raw, _ = decode_audio(path, "none")
    assert abs(_onset(raw, rate) - (expected - spec.audio_offset)) < 0.05


def test_decode_is_mono_and_resampled(tree):
    path = tree.root / "raw_videos" / "vid_a.mp4"  # stereo 44.1 kHz AAC
    wave44, rate = decode_audio(path, "container")
    assert rate == 44100 and wave44.dim() == 1
    wave16 = load_audio(path, 16000, "container")
    assert abs(wave16.numel() - wave44.numel() * 16000 / 44100) <= 2
    spec = torch.fft.rfft(wave16[int(0.75 * 16000) : int(0.95 * 16000)])
    peak_hz = float(spec.abs().argmax()) * 16000 / (0.2 * 16000)
    assert abs(peak_hz - BURST_HZ) < 10


def test_wav_decodes_and_broken_media_is_named(tmp_path):
    import av

    wav = tmp_path / "speech.wav"
    t = np.arange(8000) / 8000
    with av.open(str(wav), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        pcm = (0.25 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    wave, rate = decode_audio(wav, "container")
    assert rate == 8000 and wave.numel() == 8000
    np.testing.assert_allclose(wave.numpy(), 0.25 * np.sin(2 * np.pi * 440 * t), atol=1e-3)
    assert load_audio(wav, 16000).numel() == 16000
    assert (probe(wav).num_frames, probe(wav).sample_rate) == (0, 8000)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    with pytest.raises(DataError, match=r"cannot open media file .*broken\.mp4"):
        probe(broken)
    with pytest.raises(DataError, match=r"media file .*absent\.mp4 does not exist"):
        decode_audio(tmp_path / "absent.mp4")


def test_logmel_front_end_is_vggish_style():
    front = LogMel()
    assert (front.win, front.hop, front.spectrogram.n_fft) == (400, 160, 512)
    t = torch.arange(16000) / 16000
    lm = front(torch.sin(2 * torch.pi * 1000 * t))
    assert lm.shape == (1 + (16000 - 400) // 160, 64)
    # the loudest band is the one whose centre is nearest 1 kHz (HTK mel, 125-7500 Hz)
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    centres = np.linspace(mel(125), mel(7500), 66)[1:-1]
    assert int(lm.mean(0).argmax()) == int(np.abs(centres - mel(1000)).argmin())
    assert float(front(torch.zeros(16000)).max()) == pytest.approx(np.log(0.01), abs=1e-6)
    # frame k = |rFFT_512(x[160k : 160k + 400] * periodic Hann)| through the mel matrix
    x = torch.randn(8000, generator=torch.Generator().manual_seed(0))
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    for k in (0, 7, 47):
        mag = np.abs(np.fft.rfft(x[160 * k : 160 * k + 400].numpy() * hann, 512))
        ref = np.log(front.mel.fb.numpy().T @ mag + 0.01)
        np.testing.assert_allclose(front(x)[k].numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("anchor", ["start", "center"])
def test_patch_of_a_frame_starts_at_its_time(tree, anchor):
    spec = tree.media["vid_a"]  # 30 fps, burst at frame 21 = 0.7 s
    front = LogMel()
    lm = front(load_audio(tree.root / "raw_videos" / "vid_a.mp4", 16000, "container"))
    energy = lm.max(dim=1).values  # the tone's band
    onset = int(torch.nonzero(energy > (energy.min() + energy.max()) / 2)[0, 0])
    assert abs(onset - 70) <= 2  # 0.7 s at 100 log-mel frames per second
    starts = patch_starts(spec.frames, 30.0, 100.0, 96, anchor)
    assert int(starts[21]) == (70 if anchor == "start" else 22)
    patches = frame_patches(lm, starts, 96)
    level = patches[21].max(dim=1).values
    rise = int(torch.nonzero(level > (energy.min() + energy.max()) / 2)[0, 0])
    assert abs(rise - (0 if anchor == "start" else 48)) <= 2
    # frames past the end repeat the last log-mel frame
    assert torch.equal(patches[-1][-1], lm[-1])


def test_patch_starts_follow_each_video_rate():
    assert patch_starts(4, 25.0, 100.0, 96, "start").tolist() == [0, 4, 8, 12]
    ntsc = patch_starts(31, 30000 / 1001, 100.0, 96, "start")
    assert int(ntsc[30]) == round(30 * 100 * 1001 / 30000)  # 100.1 -> 100
    assert patch_starts(3, 12.0, 100.0, 96, "start").tolist() == [0, 8, 17]  # 8.33, 16.67


# --------------------------------------------------------------------------- the dataset


def test_videos_are_aligned_by_true_frame_index(tree, train_videos):
    videos, _ = train_videos
    assert sorted(videos) == tree.split("train")
    for name, v in videos.items():
        trial = tree.trials[name]
        assert v.num_frames == trial.label_rows
        assert v.features["audio"].shape == (v.num_frames, 16)
        assert v.features["video"].shape == (v.num_frames, 12)
        truth = tree.labels(name)
        labelled = truth[:, 0] != -5
        assert torch.equal(v.label_mask, torch.from_numpy(labelled))
        np.testing.assert_allclose(v.labels.numpy()[labelled], truth[labelled], atol=1e-6)
        assert torch.equal(v.frame_ids, torch.arange(v.num_frames))
        media = tree.media[trial.media]
        assert v.fps == pytest.approx(float(media.fps))
        present = v.present["video"]
        for k in trial.missing_crops:
            if k < v.num_frames:
                assert not present[k] and (v.features["video"][k] == 0).all()
        assert present.sum() == min(v.num_frames, media.frames) - sum(
            k < min(v.num_frames, media.frames) for k in trial.missing_crops
        )


def test_face_row_k_comes_from_crop_k_plus_1(tree, train_videos):
    videos, _ = train_videos
    model = build_backbone(VisualBackboneSpec.model_validate(TINY_VIDEO), "cpu")
    folder = tree.root / "cropped_aligned" / "vid_b"
    ks = [0, 5, 32, 34, 65]  # 33 has no crop
    faces = read_faces([folder / f"{k + 1:05d}.jpg" for k in ks], 24, 20)
    assert faces.mean(dim=(1, 2, 3)).tolist() == pytest.approx(
        [(crop_level(k) / 255 - 0.5) / 0.5 for k in ks], abs=0.02
    )
    with torch.inference_mode():
        expected = model(faces)
    torch.testing.assert_close(videos["vid_b"].features["video"][ks], expected)


def test_audio_row_k_is_the_patch_starting_at_k_over_fps(tree, train_videos):
    videos, _ = train_videos
    spec = tree.media["vid_b"]  # 29.97 fps, mono 16 kHz AAC
    front = LogMel()
    lm = front(load_audio(tree.root / "raw_videos" / "vid_b.mp4", 16000, "container"))
    ks = torch.tensor([0, 17, 40, 65])
    starts = torch.round(ks.double() * 100 / float(spec.fps)).long()
    model = build_backbone(AudioBackboneSpec.model_validate(TINY_AUDIO), "cpu")
    with torch.inference_mode():
        expected = model(frame_patches(lm, starts, 96))
    torch.testing.assert_close(videos["vid_b"].features["audio"][ks], expected)
    wrong = model(frame_patches(lm, starts + 3, 96)).detach()  # a 30 ms shift is visible
    assert not torch.allclose(videos["vid_b"].features["audio"][ks], wrong)


def test_label_and_frame_counts_that_differ_are_handled_with_a_warning(tree, train_videos):
    videos, messages = train_videos
    text = " ".join(messages)
    assert "vid_b (68 label rows, 66 video frames)" in text
    assert "vid_c (58 label rows, 60 video frames)" in text
    b = videos["vid_b"]  # two label rows more than video frames: audio edge-padded, no face
    assert torch.equal(b.features["audio"][66], b.features["audio"][65])
    assert torch.equal(b.features["audio"][67], b.features["audio"][65])
    assert not b.present["video"][66:].any()
    assert not b.present["audio"][66:].any()
    assert videos["vid_c"].features["audio"].shape[0] == 58  # two fewer: cut


def test_left_and_right_share_the_media(tree, train_videos):
    videos, _ = train_videos
    left, right = videos["vid_a_left"], videos["vid_a_right"]
    assert torch.equal(left.features["audio"], right.features["audio"])
    assert not torch.equal(left.present["video"], right.present["video"])
    ds = dataset(tree.root)
    shared = tree.root / "raw_videos" / "vid_d.mp4"
    assert ds.media_path("vid_d_right") == ds.media_path("vid_d") == shared


def test_test_split_length_is_the_decoded_frame_count(tree):
    ds = dataset(tree.root, test_list=str(tree.test_list))
    videos = {v.name: v for v in ds.videos("test")}
    assert videos["vid_f"].num_frames == tree.media["vid_f"].frames
    assert not videos["vid_f"].label_mask.any()
    rows = ds.submission_frames("test")
    assert rows["vid_g_left"][-1] == (f"vid_g_left/{tree.media['vid_g'].frames:05d}.jpg", 39)


def test_missing_face_previous_fills_forward():
    feats = torch.arange(12.0).reshape(6, 2)
    present = torch.tensor([False, True, False, False, True, False])
    out = forward_fill(feats, present)
    assert out.tolist() == [[0, 0], [2, 3], [2, 3], [2, 3], [8, 9], [8, 9]]
    assert fit_rows(torch.tensor([[1.0], [2.0]]), 4, "edge").flatten().tolist() == [1, 2, 2, 2]
    assert fit_rows(torch.tensor([True]), 3, "zero").tolist() == [True, False, False]


def test_missing_files_end_with_a_message_naming_them(tree, tmp_path):
    shared = tmp_path / "shared"  # extract rewrites cache manifests: never on the shared tree
    shutil.copytree(tree.root, shared)
    ds = dataset(shared, video_dirs=["elsewhere"], strict=True)
    with pytest.raises(
        DataError, match=r"no raw video for trial 'vid_a_left'.*vid_a\.mp4.*vid_a_left\.txt"
    ):
        ds.extract(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = dataset(shared, video_dirs=["elsewhere"]).extract(progress=False)
    assert sorted(report.failed) == sorted(
        f"trial {t}" for t in tree.split("train") + tree.split("val")
    )
    assert "vid_e.txt" in report.failed["trial vid_e"]
    root = tmp_path / "copy"
    shutil.copytree(tree.root, root, ignore=shutil.ignore_patterns("fusionkit_cache"))
    shutil.rmtree(root / "cropped_aligned" / "vid_c")
    with pytest.raises(DataError, match=r"face-crop folder .*cropped_aligned/vid_c"):
        dataset(root, strict=True).extract(progress=False)
    with pytest.raises(DataError, match=r"missing feature cache .*vid_a\.safetensors.*extract"):
        dataset(root).videos("train")
    with pytest.raises(DataError, match=r"dataset root .*nowhere does not exist"):
        dataset(tmp_path / "nowhere").videos("train")


def test_shipped_affwild2_recipes_validate_with_a_root(tree):
    for path in sorted((REPO / "recipes" / "affwild2").glob("*.yaml")):
        rc = load_recipe(path, [f"data.params.root={tree.root}"])
        assert rc.data.name == "affwild2"
        expected = "wavlm" if path.stem == "foundation" else "vggish"
        assert rc.data.params.audio.backbone.name == expected
    with pytest.raises(Exception, match=r"data\.params\.root: required key is missing"):
        load_recipe(REPO / "recipes" / "affwild2" / "tagf.yaml")
    with pytest.raises(Exception, match=r"unknown visual_backbone 'ir5'"):
        load_recipe(
            REPO / "recipes" / "affwild2" / "tagf.yaml",
            [f"data.params.root={tree.root}", "data.params.video.backbone.name=ir5"],
        )


# --------------------------------------------------------------------------- features plugin


def _features_dataset(**params):
    comp = get_registry().get("dataset", "features")
    return comp.build(comp.params.model_validate(params))


def test_features_plugin_reads_arrays_and_labels(tree, tmp_path):
    rng = np.random.default_rng(0)
    feats = tmp_path / "feats"
    for trial in tree.split("train") + tree.split("val"):
        n = tree.trials[trial].label_rows
        (feats / "video").mkdir(parents=True, exist_ok=True)
        arr = rng.standard_normal((n - 2 if trial == "vid_c" else n, 7)).astype(np.float32)
        if trial == "vid_b":
            arr[3] = np.nan
        np.save(feats / "video" / f"{trial}.npy", arr)
    (feats / "audio").mkdir()
    for media in {tree.trials[t].media for t in tree.split("train") + tree.split("val")}:
        n = max(tree.trials[t].label_rows for t in tree.trials if tree.trials[t].media == media)
        save_file({"features": torch.randn(n, 5)}, str(feats / "audio" / f"{media}.safetensors"))
    ds = _features_dataset(features_dir=str(feats), labels=str(tree.root))
    assert ds.feature_dims == {"audio": 5, "video": 7}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        videos = {v.name: v for v in ds.videos("train")}
    assert any("vid_c.npy (56 rows, 58 frames)" in str(w.message) for w in caught)
    b = videos["vid_b"]
    assert not b.present["video"][3] and (b.features["video"][3] == 0).all()
    assert torch.equal(
        videos["vid_a_left"].features["audio"], videos["vid_a_right"].features["audio"]
    )
    np.testing.assert_allclose(
        videos["vid_a_left"].features["video"].numpy(),
        np.load(feats / "video" / "vid_a_left.npy"),
    )


def test_features_plugin_puts_compacted_rows_back_on_their_frames(tree, tmp_path):
    feats = tmp_path / "by_video"
    trial = "vid_e"
    lab = read_labels(tree.root / NAMINGS["abaw"][0] / "Validation_Set" / f"{trial}.txt")
    for name in tree.split("val") + tree.split("train"):
        n = int(read_labels(next(tree.root.rglob(f"{name}.txt"))).mask.sum())
        (feats / name).mkdir(parents=True)
        np.save(feats / name / "audio.npy", np.arange(n, dtype=np.float32)[:, None])
    ds = _features_dataset(
        features_dir=str(feats), layout="by_video", labels=str(tree.root), rows="labelled_frames"
    )
    v = {v.name: v for v in ds.videos("val")}[trial]
    x = v.features["audio"][:, 0]
    assert torch.equal(v.present["audio"], torch.from_numpy(lab.mask))
    assert x[lab.mask].tolist() == list(range(int(lab.mask.sum())))
    assert (x[~torch.from_numpy(lab.mask)] == 0).all()
    np.save(feats / trial / "audio.npy", np.zeros((3, 1), np.float32))
    ds = _features_dataset(
        features_dir=str(feats), layout="by_video", labels=str(tree.root), rows="labelled_frames"
    )
    with pytest.raises(DataError, match=r"vid_e/audio\.npy has 3 rows but .*vid_e\.txt has 44"):
        ds.videos("val")
