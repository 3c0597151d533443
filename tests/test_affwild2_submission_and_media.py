"""Aff-Wild2 submissions and media: far template padding is told, test faces past a short
decode are kept, crops saved under other names are refused, and a validation trial sharing a
training trial's raw video is warned about.

Each test builds its own tiny tree and compares against numbers computed here from the
documented format (row ``k`` = frame ``k`` = crop ``%05d.jpg`` of ``k + 1``)."""

from __future__ import annotations

import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkit.core.errors import DataError
from fusionkit.core.registry import get_registry
from fusionkit.engine.predict import RunPredictions, write_submission
from fusionkit_affwild2.dataset import AffWild2Dataset
from tests.affwild2_fixture import MediaSpec, tiny_params, write_jpeg, write_media

pytestmark = [
    pytest.mark.filterwarnings("ignore:affwild2.*have random weights"),
    pytest.mark.filterwarnings("ignore:affwild2.*belong to no split"),
]

ANN = "6th_ABAW_Annotations/VA_Estimation_Challenge"


def _labels(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    k = np.arange(rows)
    lines = [f"{0.5 * np.sin(k_ / 5):.4f},{0.4 * np.cos(k_ / 7):.4f}" for k_ in k]
    path.write_text("valence,arousal\n" + "\n".join(lines) + "\n")


def _crops(folder: Path, frames: range, ext: str = "jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in frames:
        img = np.full((24, 24, 3), 30 + (k * 37) % 190, dtype=np.uint8)
        write_jpeg(folder / f"{k + 1:05d}.{ext}", img)


def _tree(root: Path) -> Path:
    """tr (train, 20 frames), va (val, 20 frames), te (test: video of 20 frames, 30 crops),
    pn (train: crops saved as .png, no .jpg)."""
    for name in ("tr", "va", "te", "pn"):
        write_media(root / "raw_videos" / f"{name}.mp4", MediaSpec(name, Fraction(25), 20))
    _labels(root / ANN / "Train_Set" / "tr.txt", 20)
    _labels(root / ANN / "Train_Set" / "pn.txt", 20)
    _labels(root / ANN / "Validation_Set" / "va.txt", 20)
    _crops(root / "cropped_aligned" / "tr", range(20))
    _crops(root / "cropped_aligned" / "va", range(20))
    _crops(root / "cropped_aligned" / "te", range(30))  # the organisers' crops: 30 frames
    _crops(root / "cropped_aligned" / "pn", range(20), ext="png")
    (root / "test_list.txt").write_text("te\n")
    return root


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = _tree(tmp_path_factory.mktemp("aw2h"))
    comp = get_registry().get("dataset", "affwild2")
    ds = AffWild2Dataset(comp.params.model_validate(tiny_params(root, test_list="test_list.txt")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ds.extract(workers=1, progress=False)
    return ds, report, [str(w.message) for w in caught]


def test_far_template_padding_is_reported_with_its_size(tmp_path):
    """A template listing 400 rows of a video predicted on 40 frames is written (360 rows
    repeat the last prediction), counted in the summary, and warned about with the count."""
    pred = torch.linspace(-0.5, 0.5, 40)[:, None].repeat(1, 2)
    run = RunPredictions(
        run_dir=tmp_path / "r",
        targets=("valence", "arousal"),
        dataset_targets=("valence", "arousal"),
        per_video={"T": (torch.arange(40), pred)},
        rows={"T": [(f"T/{k + 1:05d}.jpg", k) for k in range(400)]},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = write_submission([run], tmp_path / "sub.csv")
    body = (tmp_path / "sub.csv").read_text().splitlines()[1:]
    # independent check of what was written: 360 rows repeat frame 39's prediction
    assert sum(line.endswith("0.500000,0.500000") for line in body) == 361
    assert summary["padded"] == {"T": (360, 400)}
    (said,) = [str(w.message) for w in caught]
    assert "far more than a few frames: T (360 of 400 rows padded)" in said


def test_far_template_truncation_is_warned_and_a_few_frames_are_not(tmp_path):
    """A template listing 40 of a video's 400 predicted frames is warned about with the count;
    one listing 398 of them (a few frames, as two decoders differ) is reported, not warned."""
    pred = torch.zeros(400, 2)
    for listed, far in ((40, True), (398, False)):
        run = RunPredictions(
            run_dir=tmp_path / "r",
            targets=("valence", "arousal"),
            dataset_targets=("valence", "arousal"),
            per_video={"T": (torch.arange(400), pred)},
            rows={"T": [(f"T/{k + 1:05d}.jpg", k) for k in range(listed)]},
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = write_submission([run], tmp_path / f"sub{listed}.csv")
        assert summary["truncated"] == {"T": (400 - listed, 400)}
        said = [str(w.message) for w in caught]
        if far:
            (text,) = said
            assert f"far more than a few frames: T ({400 - listed} of 400 frames cut)" in text
        else:
            assert said == []


def test_test_trial_crops_past_the_decoded_end_are_kept_and_warned_about(extracted):
    """A test trial whose video decodes to 20 frames but has 30 face crops keeps all 30 frames
    (the organisers score them): faces on frames 20-29, no audio there, and a warning that
    names the trial with both counts."""
    ds, _, _ = extracted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (te,) = ds.videos("test")
    assert te.num_frames == 30
    assert te.present["video"].all()  # every frame has its crop
    assert te.present["audio"][:20].all() and not te.present["audio"][20:].any()
    assert te.features["video"][20:].abs().sum() > 0  # faces, not zero padding
    said = " ".join(str(w.message) for w in caught)
    assert "te (30 face crops, 20 video frames)" in said


def test_crop_folder_without_jpg_files_is_named_by_extract(extracted):
    """A crop folder holding only .png files fails its trial's extraction naming the folder
    and what it holds, where it extracted a trial without any face in silence."""
    ds, report, _ = extracted
    why = report.failed["video pn"]
    assert f"face-crop folder {ds.crops_path('pn')} holds 20 image(s) (00001.png" in why
    assert "00001.jpg for the first frame" in why
    assert not ds.video_cache.file("pn").is_file()


def test_fold_that_splits_a_left_right_pair_warns(tmp_path):
    """Fold 3 validates on t2_right while t2_left (the same raw video, one audio array) trains:
    loading the validation split warns, naming both."""
    ann = tmp_path / ANN
    train = ["t1", "t2_left", "t2_right", "t3", "t4", "t5"]
    for t in train:
        _labels(ann / "Train_Set" / f"{t}.txt", 10)
    for t in ("v1", "v2"):
        _labels(ann / "Validation_Set" / f"{t}.txt", 10)
    for t in [*train, "v1", "v2"]:
        (tmp_path / "f" / "video").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "f" / "video" / f"{t}.npy", np.ones((10, 2), np.float32))
    for t in ("t1", "t2", "t3", "t4", "t5", "v1", "v2"):
        (tmp_path / "f" / "audio").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "f" / "audio" / f"{t}.npy", np.ones((10, 2), np.float32))
    comp = get_registry().get("dataset", "features")
    params = comp.params.model_validate(
        {
            "features_dir": str(tmp_path / "f"),
            "labels": str(tmp_path),
            "shared_media": True,
            "split": {"fold": 3},
        }
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = comp.build(params)
        val = [v.name for v in ds.videos("val")]
        tr = [v.name for v in ds.videos("train")]
    # the documented scheme (computed here): 6 train trials -> chunks of 1, official val
    # is chunk 6; fold 3 validates on chunk 3 = t2_right
    assert val == ["t2_right"] and "t2_left" in tr
    said = " ".join(str(w.message) for w in caught)
    assert "1 trial(s) of split 'val' come from the raw video of a training trial: " in said
    assert "t2_right (t2_left in train)" in said


def test_a_test_trial_without_a_cache_names_the_test_list_to_extract_with(tmp_path):
    """A test trial never extracted (training extracts without a test list) is refused with
    the extract command that covers it: with data.params.test_list."""
    root = _tree(tmp_path / "aw")
    comp = get_registry().get("dataset", "affwild2")
    ds = AffWild2Dataset(comp.params.model_validate(tiny_params(root, test_list="test_list.txt")))
    with pytest.raises(DataError) as info:
        ds.videos("test")
    msg = str(info.value)
    assert msg.startswith("missing feature cache ") and "te.safetensors" in msg
    assert "run `fusionkit extract RECIPE data.params.test_list=test_list.txt`" in msg


@pytest.mark.parametrize("rows", [None, "template"])
def test_a_video_name_with_a_comma_is_quoted_in_the_csv(tmp_path, rows):
    """A video named from a file name may hold a comma or a quote: its rows are quoted, so
    a CSV reader gets the header's columns (the rows had one field more than the header)."""
    import csv

    name = 'vid,e "b"'
    pred = torch.tensor([[0.25, -0.5], [0.5, -0.25]])
    run = RunPredictions(
        run_dir=tmp_path / "r",
        targets=("valence", "arousal"),
        dataset_targets=("valence", "arousal"),
        per_video={name: (torch.arange(2), pred)},
        rows=None if rows is None else {name: [(f"{name}/{k + 1:05d}.jpg", k) for k in range(2)]},
    )
    write_submission([run], tmp_path / "sub.csv")
    with (tmp_path / "sub.csv").open(newline="") as fh:
        header, *body = list(csv.reader(fh))
    assert all(len(r) == len(header) for r in body)
    got = [dict(zip(header, r, strict=True)) for r in body]
    assert [float(r["valence"]) for r in got] == [0.25, 0.5]
    if rows is None:
        assert [(r["video"], r["frame"]) for r in got] == [(name, "0"), (name, "1")]
    else:
        assert got[1]["image_location"] == f"{name}/00002.jpg"
