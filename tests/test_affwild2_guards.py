"""Guards of the Aff-Wild2 plugins that give a wrong number with exit 0 when they break: a
``-5`` in one column of an annotation row, the identity of the face-feature cache (``resize``,
the crop folder's file names and sizes, the extractor configuration recorded in each file),
and the ``features`` dataset's NaN rows, short arrays and 1-based submission names.

The trees are the generated fixture tree (:func:`shared_tree`, tiny extractors) or private
copies of it, and small arrays and label files in ``tmp_path`` (no media).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fusionkit.core.errors import DataError
from fusionkit_affwild2.layout import read_labels
from tests.affwild2_fixture import TINY_AUDIO, TINY_VIDEO, Fixture, shared_tree, write_jpeg
from tests.test_affwild2 import dataset
from tests.test_affwild2_trust import copy_tree
from tests.test_extract import extract
from tests.test_features_trust import FRAMES, WIDTHS, make_features
from tests.test_features_trust import dataset as features_dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:affwild2.*belong to no split"),  # no test_list
    pytest.mark.filterwarnings("ignore:affwild2.*have random weights"),  # tiny backbones
    pytest.mark.filterwarnings("ignore:affwild2.*label rows != decoded video frames"),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Fixture:
    return shared_tree(tmp_path_factory.getbasetemp())


@pytest.fixture
def tree_copy(tree, tmp_path) -> Path:
    """A private copy of the extracted shared tree, caches included (tests modify it)."""
    return copy_tree(tree.root, tmp_path / "aw2", caches=True)


# --------------------------------------------------------------------------- labels


def test_minus5_in_one_column_masks_the_row(tmp_path):
    """``-5`` is outside ``[-1, 1]``, so it can only mean "not annotated", whichever column
    holds it. Without masking a row where only one column is ``-5``, reading the file stops
    on ``-5,0.3`` as out of range (or a -5 would be trained on as a valence or arousal)."""
    path = tmp_path / "one_column.txt"
    path.write_text("valence,arousal\n0.1,0.2\n-5,0.3\n0.2,-5\n-0.4,0.5\n-5,-5\n0.7,-0.6\n")
    lab = read_labels(path)
    assert lab.rows == 6
    assert lab.mask.tolist() == [True, False, False, True, False, True]
    expected = [[0.1, 0.2], [0, 0], [0, 0], [-0.4, 0.5], [0, 0], [0.7, -0.6]]
    np.testing.assert_allclose(lab.values, np.array(expected, np.float32), atol=1e-7)


# --------------------------------------------------------------------------- video cache


def test_another_resize_uses_another_video_cache(tree):
    """Crops are resized to ``video.resize`` before the backbone, so the face features depend
    on it. If ``resize`` were not part of the cache identity, a run with another ``resize``
    would silently reuse features computed from differently resized faces."""
    base = dataset(tree.root)
    other = dataset(tree.root, video={"backbone": TINY_VIDEO, "resize": 40, "batch_size": 64})
    assert other.video_cache.path != base.video_cache.path
    assert other.audio_cache.path == base.audio_cache.path  # resize plays no part in audio
    assert base.video_cache.file("vid_b").is_file()  # the resize=24 cache exists ...
    with pytest.raises(DataError, match=r"missing feature cache .*face_cnn-.*vid_a_left"):
        other.videos("train")  # ... but is not used for resize=40


def _rename_crop(folder: Path) -> None:
    """Move crop 00036.jpg (frame 35) to 00034.jpg, the free number of frame 33."""
    assert not (folder / "00034.jpg").exists()
    (folder / "00036.jpg").rename(folder / "00034.jpg")


def _rewrite_crop(folder: Path) -> None:
    """Replace crop 00010.jpg by another face (noise) whose file has another size."""
    path = folder / "00010.jpg"
    before = path.stat().st_size
    noise = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    write_jpeg(path, noise)
    assert path.stat().st_size != before


@pytest.mark.parametrize("change", [_rename_crop, _rewrite_crop], ids=["rename", "rewrite"])
def test_crop_folder_with_the_same_count_but_other_files_is_stale(tree_copy, change):
    """A crop renamed to a free frame number, or replaced by another face, keeps the number
    of crops. If only the count were checked, cached row k would belong to another frame or
    another face; the names and sizes of the files make the cache stale, and ``extract``
    recomputes it."""
    folder = tree_copy / "cropped_aligned" / "vid_b"  # frame 33 (00034.jpg) has no crop
    ds = dataset(tree_copy)
    before = {v.name: v for v in ds.videos("train")}["vid_b"]
    cache = ds.video_cache.file("vid_b")
    change(folder)
    with pytest.raises(
        DataError,
        match=re.escape(
            f"stale feature cache {cache}: source {folder}: file names or sizes changed"
        ),
    ):
        dataset(tree_copy).videos("train")
    report = extract(dataset(tree_copy))
    assert list(report.refreshed) == ["video vid_b"]
    assert report.refreshed["video vid_b"].startswith("stale")
    after = {v.name: v for v in dataset(tree_copy).videos("train")}["vid_b"]
    feats, present = after.features["video"], after.present["video"]
    if change is _rename_crop:  # frame 33 now has a face, frame 35 has none
        assert not before.present["video"][33] and before.present["video"][35]
        assert present[33] and not present[35]
        assert torch.equal(feats[33], before.features["video"][35])
        assert (feats[35] == 0).all()
    else:  # frame 9 is the new face; its neighbours are unchanged
        assert not torch.allclose(feats[9], before.features["video"][9])
        torch.testing.assert_close(feats[8], before.features["video"][8])
        torch.testing.assert_close(feats[10], before.features["video"][10])


def test_a_cache_file_copied_into_another_configurations_folder_is_refused(tree_copy):
    """Each extractor configuration has its own folder, and each file records the key of the
    configuration that made it. A file copied by hand into another configuration's folder
    has unchanged sources and a valid content hash: without checking the recorded key, its
    features (here audio patches anchored at the frame start) would be used as if made with
    the other configuration (patches centred on the frame)."""
    start = dataset(tree_copy)
    center = dataset(tree_copy, audio={"backbone": TINY_AUDIO, "anchor": "center"})
    assert center.audio_cache.path != start.audio_cache.path
    center.audio_cache.path.mkdir(parents=True)
    copied = center.audio_cache.file("vid_a")
    shutil.copy2(start.audio_cache.file("vid_a"), copied)
    media = tree_copy / "raw_videos" / "vid_a.mp4"
    assert start.audio_cache.status("vid_a", {"media": media}).valid  # the original is fine
    status = center.audio_cache.status("vid_a", {"media": media})
    assert (status.state, status.reason) == ("stale", "made by a different extractor configuration")
    with pytest.raises(
        DataError,
        match=re.escape(
            f"stale feature cache {copied}: made by a different extractor configuration"
        ),
    ):
        center.videos("train")  # vid_a_left, the first train trial, reads vid_a's audio


# --------------------------------------------------------------------------- features dataset


def test_features_row_with_one_nan_counts_as_missing(tmp_path):
    """The ``features`` docstring: rows that contain NaN count as missing (zeros, present
    False). A row with a single NaN kept as present would carry its NaN into normalisation
    and training."""
    feats, labels = make_features(tmp_path)
    arr = np.load(feats / "video" / "a.npy")
    arr[3, 0] = np.nan
    np.save(feats / "video" / "a.npy", arr)
    a = {v.name: v for v in features_dataset(feats, labels).videos("train")}["a"]
    present, x = a.present["video"], a.features["video"]
    assert present.tolist() == [k != 3 for k in range(FRAMES)]
    assert (x[3] == 0).all()
    np.testing.assert_array_equal(x[[2, 4]].numpy(), arr[[2, 4]])
    assert a.present["audio"].all()


def test_features_short_array_is_padded_with_its_last_row(tmp_path):
    """The ``features`` docstring: an array up to ROW_TOLERANCE rows short is padded with its
    last row. Padding with zeros instead would feed all-zero rows marked present, a value the
    features never take, on the last frames."""
    feats, labels = make_features(tmp_path)
    arr = np.random.default_rng(3).standard_normal((FRAMES - 2, WIDTHS["video"]))
    arr = arr.astype(np.float32)
    np.save(feats / "video" / "a.npy", arr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = {v.name: v for v in features_dataset(feats, labels).videos("train")}["a"]
    assert any(
        f"video/a.npy ({FRAMES - 2} rows, {FRAMES} frames)" in str(w.message) for w in caught
    )
    x = a.features["video"].numpy()
    assert x.shape == (FRAMES, WIDTHS["video"])
    np.testing.assert_array_equal(x[: FRAMES - 2], arr)
    np.testing.assert_array_equal(x[FRAMES - 2 :], np.stack([arr[-1], arr[-1]]))
    assert a.present["video"].all()


def test_features_submission_rows_name_frames_from_1(tmp_path):
    """Aff-Wild2 frame files are 1-based (``00001.jpg`` is frame 0). Naming rows from 0 would
    put every prediction one frame off the organisers' row names."""
    feats, labels = make_features(tmp_path)
    rows = features_dataset(feats, labels).submission_frames("val")
    assert list(rows) == ["c"]
    assert len(rows["c"]) == FRAMES
    assert rows["c"][0] == ("c/00001.jpg", 0)
    assert rows["c"][1] == ("c/00002.jpg", 1)
    assert rows["c"][-1] == (f"c/{FRAMES:05d}.jpg", FRAMES - 1)
    assert rows["c"][-1][0] == "c/00020.jpg"


def test_a_video_far_shorter_than_its_labels_gets_its_own_warning():
    """A few frames between labels and video is usual and warned about as such; a video far
    shorter (or longer) than its labels, as a truncated file is, is named apart with what to
    check."""
    from types import SimpleNamespace

    from fusionkit_affwild2.dataset import AffWild2Dataset

    frames = {"ok": 60, "near": 58, "cut": 39}
    rows = {"ok": 60, "near": 60, "cut": 75}
    fake = SimpleNamespace(
        label_paths=dict.fromkeys(frames),
        media_key=lambda t: t,
        audio_cache=SimpleNamespace(info=lambda m: {"info": {"num_frames": frames[m]}}),
        labels=lambda t: SimpleNamespace(rows=rows[t]),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AffWild2Dataset._check_lengths(fake, ["ok", "near", "cut"])
    texts = [str(w.message) for w in caught]
    assert len(texts) == 2
    far = next(t for t in texts if "far more than a few" in t)
    assert "cut (75 label rows, 39 video frames)" in far and "near" not in far
    assert "truncated" in far
    usual = next(t for t in texts if "!= decoded video frames" in t)
    assert "near (60 label rows, 58 video frames)" in usual and "cut" not in usual


def test_labels_many_times_longer_than_their_video_are_refused(tmp_path):
    """An annotation file with more than ten times as many rows as its video has frames (a
    file of another video, or one concatenated over and over) is refused naming the file:
    nearly every frame trained on would have no video behind it (it trained with exit 0).
    A file of more than a million rows is refused before it is read."""
    from types import SimpleNamespace

    from fusionkit.plugin import DataError
    from fusionkit_affwild2.dataset import AffWild2Dataset
    from fusionkit_affwild2.layout import MAX_LABEL_ROWS, read_labels

    frames, rows = {"ok": 60, "huge": 66}, {"ok": 60, "huge": 3_000}
    fake = SimpleNamespace(
        label_paths={t: tmp_path / f"{t}.txt" for t in frames},
        media_key=lambda t: t,
        audio_cache=SimpleNamespace(info=lambda m: {"info": {"num_frames": frames[m]}}),
        labels=lambda t: SimpleNamespace(rows=rows[t]),
    )
    with pytest.raises(DataError, match=r"huge\.txt \(3000 rows, 66 video frames\)"):
        AffWild2Dataset._check_lengths(fake, ["ok", "huge"])
    rows["huge"] = 600  # 9 times: a truncated video, warned about as before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AffWild2Dataset._check_lengths(fake, ["ok", "huge"])
    assert any("far more than a few" in str(w.message) for w in caught)
    big = tmp_path / "big.txt"
    big.write_text("valence,arousal\n" + "0.1,0.2\n" * (MAX_LABEL_ROWS + 1))
    with pytest.raises(DataError, match="more than 1,000,000; it is not an annotation file"):
        read_labels(big)
