"""Data-integrity checks of the ``affwild2`` dataset: a test list naming annotated trials,
``_left`` / ``_right`` trials with raw videos of their own, face crops numbered from 0, a
submission template that does not match the test list, and the cheap layout checks that
``fusionkit recipe validate`` must report as ``run`` does (audit sections 1, 3, 10, 11, 16).

Most trees are small copies of the generated fixture tree (:func:`shared_tree`, tiny
extractors); one test runs the ``_left`` / ``_right`` case on two GRID clips and is skipped
without them.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fusionkit.core.errors import DataError
from fusionkit.core.recipe import load_recipe
from fusionkit.engine.session import check_recipe
from fusionkit_affwild2.layout import crop_indices, read_submission_template
from tests.affwild2_fixture import (
    NAMINGS,
    TINY_AUDIO,
    TINY_VIDEO,
    Fixture,
    shared_tree,
    tree_from_clips,
)
from tests.conftest import REPO
from tests.test_affwild2 import dataset

pytestmark = [
    pytest.mark.filterwarnings("ignore:affwild2.*belong to no split"),
    pytest.mark.filterwarnings("ignore:affwild2.*have random weights"),
    pytest.mark.filterwarnings("ignore:affwild2.*label rows != decoded video frames"),
]

ANN = NAMINGS["abaw"][0]  # 6th_ABAW_Annotations/VA_Estimation_Challenge
GRID = Path(os.environ.get("FUSIONKIT_GRID_DIR", REPO.parent / "shared" / "data" / "grid"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Fixture:
    return shared_tree(tmp_path_factory.getbasetemp())


def copy_tree(src: Path, dst: Path, caches: bool = False) -> Path:
    """A private copy of a fixture tree (extract rewrites caches: never on the shared tree)."""
    ignore = None if caches else shutil.ignore_patterns("fusionkit_cache")
    shutil.copytree(src, dst, ignore=ignore)
    return dst


def annotations_only(root: Path, train: dict[str, str], val: dict[str, str]) -> Path:
    """A tree with annotation files only (``name -> text``): enough to build the dataset."""
    for part, files in (("Train_Set", train), ("Validation_Set", val)):
        folder = root / ANN / part
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / f"{name}.txt").write_text(text)
    return root


def q(path: Path) -> str:
    """``path`` as a regular expression that matches it literally."""
    return re.escape(str(path))


LABELS = "valence,arousal\n0.1,0.2\n-5,-5\n0.3,-0.4\n"


# --------------------------------------------------------------------------- 1. test list leak


def test_a_test_list_naming_an_annotated_trial_is_refused(tree, tmp_path):
    leak = tmp_path / "test_leak.txt"
    leak.write_text("vid_f\nvid_b\nvid_e\n")  # vid_b: Train_Set, vid_e: Validation_Set
    with pytest.raises(DataError) as info:
        dataset(tree.root, test_list=str(leak)).trials("test")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"test list {leak} names trial(s) that have an annotation file in ")
    assert "Train_Set" in msg and "Validation_Set" in msg
    assert ": vid_b, vid_e;" in msg and "vid_f" not in msg
    assert "remove these names from the test list" in msg
    # the organisers' kind of list (no annotated trial) still works
    assert dataset(tree.root, test_list=str(tree.test_list)).trials("test") == tree.split("test")


# --------------------------------------------------------------------------- 3. _left / _right


def _lr_tree(tree: Fixture, root: Path) -> Path:
    """``xx_left.mp4`` and ``xx_right.mp4`` (two different recordings, no ``xx.mp4``) for the
    train trials ``xx_left`` / ``xx_right``; ``zz.mp4`` next to ``zz_left.mp4`` for the val
    trial ``zz_left`` (the un-suffixed video wins)."""
    src = tree.root
    raw, crops = root / "raw_videos", root / "cropped_aligned"
    raw.mkdir(parents=True)
    for name, media in (
        ("xx_left", "vid_a.mp4"),
        ("xx_right", "vid_b.mp4"),
        ("zz", "vid_d.mp4"),
        ("zz_left", "vid_f.mp4"),
    ):
        shutil.copy2(src / "raw_videos" / media, raw / f"{name}.mp4")
    for trial, source in (("xx_left", "vid_a_left"), ("xx_right", "vid_b"), ("zz_left", "vid_d")):
        shutil.copytree(src / "cropped_aligned" / source, crops / trial)
    for part, trial, source in (
        ("Train_Set", "xx_left", "Train_Set/vid_a_left"),
        ("Train_Set", "xx_right", "Train_Set/vid_b"),
        ("Validation_Set", "zz_left", "Validation_Set/vid_d"),
    ):
        (root / ANN / part).mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / ANN / f"{source}.txt", root / ANN / part / f"{trial}.txt")
    return root


def test_left_and_right_with_their_own_raw_videos_get_their_own_audio(tree, tmp_path):
    root = _lr_tree(tree, tmp_path / "lr")
    ds = dataset(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ds.extract(progress=False)
    assert not report.failed, report.failed
    # one audio cache per distinct raw video (zz_left reads zz.mp4: the un-suffixed one wins)
    cached = sorted(p.stem for p in ds.audio_cache.path.glob("*.safetensors"))
    assert cached == ["xx_left", "xx_right", "zz"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        videos = {v.name: v for v in dataset(root).videos("train")}
    left, right = videos["xx_left"], videos["xx_right"]
    assert not torch.equal(left.features["audio"][:60], right.features["audio"][:60])
    assert right.fps == pytest.approx(float(tree.media["vid_b"].fps))  # 29.97, not vid_a's 30
    # each trial's audio is exactly that of its own file (vid_a.mp4 / vid_b.mp4 in the shared
    # tree, extracted there with the same extractor)
    shared = {v.name: v for v in dataset(tree.root).videos("train")}
    assert torch.equal(right.features["audio"], shared["vid_b"].features["audio"])
    assert torch.equal(left.features["audio"], shared["vid_a_left"].features["audio"])
    assert ds.media_key("xx_left") == "xx_left" and ds.media_key("xx_right") == "xx_right"
    assert ds.media_key("zz_left") == "zz"
    # the trial-named file that zz_left does not read is named, not ignored silently
    messages = [str(w.message) for w in caught]
    assert any(
        "1 raw video(s) named after a _left/_right trial are not used" in m
        and "raw_videos/zz_left.mp4 (trial zz_left reads raw_videos/zz.mp4)" in m
        for m in messages
    ), messages


def test_left_and_right_sharing_one_raw_video_keep_one_audio_cache(tree):
    ds = dataset(tree.root, test_list=str(tree.test_list))
    cached = sorted(p.stem for p in ds.audio_cache.path.glob("*.safetensors"))
    assert cached == sorted(tree.media)  # keyed by the shared media name, as before
    assert ds.media_key("vid_a_left") == ds.media_key("vid_a_right") == "vid_a"
    assert ds.media_key("vid_d_right") == ds.media_key("vid_d") == "vid_d"
    assert ds.media_key("vid_g_left") == "vid_g"


@pytest.mark.skipif(
    not (GRID / "bbaf2n.mpg").is_file() or not (GRID / "brbk7n.mpg").is_file(),
    reason=f"GRID clips not found at {GRID} (set FUSIONKIT_GRID_DIR to the folder holding "
    "bbaf2n.mpg, brbk7n.mpg and the other GRID .mpg clips)",
)
def test_left_and_right_grid_clips_each_get_their_own_audio(tmp_path):
    """Audit section 3 on real clips: two talkers' recordings as xx_left.mpg / xx_right.mpg."""
    clips = [GRID / f"{c}.mpg" for c in ("bbaf2n", "brbk7n", "lbax4n")]
    fx = tree_from_clips(clips, tmp_path / "grid", crop_size=24, splits=(0.67, 0.33))
    root = fx.root
    assert fx.split("train") == ["bbaf2n", "brbk7n"] and fx.split("val") == ["lbax4n"]
    for old, new in (("bbaf2n", "xx_left"), ("brbk7n", "xx_right")):
        (root / "raw_videos" / f"{old}.mpg").rename(root / "raw_videos" / f"{new}.mpg")
        (root / "cropped_aligned" / old).rename(root / "cropped_aligned" / new)
        train = root / ANN / "Train_Set"
        (train / f"{old}.txt").rename(train / f"{new}.txt")
    ds = dataset(root, verify_sources=True)
    report = ds.extract(progress=False)
    assert not report.failed, report.failed
    cached = sorted(p.stem for p in ds.audio_cache.path.glob("*.safetensors"))
    assert cached == ["lbax4n", "xx_left", "xx_right"]
    videos = {v.name: v for v in dataset(root).videos("train")}
    assert not torch.equal(
        videos["xx_left"].features["audio"], videos["xx_right"].features["audio"]
    )


# --------------------------------------------------------------------------- 11. 0-based crops


def _renumber_from_zero(folder: Path) -> None:
    for p in sorted(folder.glob("*.jpg")):
        p.rename(folder / f"{int(p.stem) - 1:05d}.jpg")


def test_crops_numbered_from_zero_are_refused(tree, tmp_path):
    root = copy_tree(tree.root, tmp_path / "aw0", caches=True)
    folder = root / "cropped_aligned" / "vid_c"
    _renumber_from_zero(folder)
    with pytest.raises(DataError) as info:
        crop_indices(folder)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"face-crop folder {folder} holds 00000.jpg, but Aff-Wild2 crops are ")
    assert "1-based" in msg and "renumber its files k -> k + 1" in msg
    # extract: strict stops before any job, otherwise the trial is reported as failed
    with pytest.raises(DataError, match=re.escape(f"face-crop folder {folder} holds 00000.jpg")):
        dataset(root, strict=True).extract(progress=False)
    # training on a cache made from such a folder (before this check existed) is refused too
    with pytest.raises(DataError, match=re.escape(f"face-crop folder {folder} holds 00000.jpg")):
        dataset(root, verify_sources=False).videos("train")
    # a 1-based folder with gaps is fine
    assert sorted(crop_indices(root / "cropped_aligned" / "vid_b"))[:3] == [0, 1, 2]


def test_extract_reports_a_zero_based_crop_folder_as_failed(tree, tmp_path):
    root = copy_tree(tree.root, tmp_path / "aw0", caches=True)
    folder = root / "cropped_aligned" / "vid_e"
    _renumber_from_zero(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = dataset(root).extract(progress=False)
    assert list(report.failed) == ["trial vid_e"]
    assert "holds 00000.jpg, but Aff-Wild2 crops are 1-based" in report.failed["trial vid_e"]


# --------------------------------------------------------------------------- 10. template


def _template(path: Path, rows: dict[str, int]) -> Path:
    lines = ["image_location,valence,arousal"]
    for video, n in rows.items():
        lines += [f"{video}/{k + 1:05d}.jpg,0,0" for k in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_submission_rows_are_exactly_the_template_rows_in_its_order(tree, tmp_path):
    order = {"vid_g_left": 5, "vid_f": 50}  # the test list says vid_f first
    tmpl = _template(tmp_path / "sample.txt", order)
    ds = dataset(tree.root, test_list=str(tree.test_list), submission_template=str(tmpl))
    rows = ds.submission_frames("test")
    assert list(rows) == list(order)
    assert rows == read_submission_template(tmpl)
    # a labelled split the template does not name keeps one row per frame
    val = ds.submission_frames("val")
    assert {v: len(r) for v, r in val.items()} == {"vid_d": 30, "vid_e": 54}
    assert val["vid_e"][0] == ("vid_e/00001.jpg", 0)


def test_a_template_naming_other_videos_than_the_test_list_is_refused(tree, tmp_path):
    extra = _template(tmp_path / "tmpl2.txt", {**tree.template_rows, "zzz": 2})
    ds = dataset(tree.root, test_list=str(tree.test_list), submission_template=str(extra))
    with pytest.raises(DataError) as info:
        ds.submission_frames("test")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"submission template {extra} does not match the videos to predict: ")
    assert f"1 template video(s) not in the test list {tree.test_list}: zzz;" in msg
    assert "not in the template" not in msg
    partial = _template(tmp_path / "tmpl3.txt", {"vid_f": 3, "zzz": 1})
    ds = dataset(tree.root, test_list=str(tree.test_list), submission_template=str(partial))
    with pytest.raises(DataError) as info:
        ds.submission_frames("test")
    msg = str(info.value)
    assert "1 template video(s) not in the test list" in msg and ": zzz;" in msg
    assert f"1 video(s) of the test list {tree.test_list} not in the template: vid_g_left;" in msg
    assert "use the sample file and the test list of the same release" in msg
    # predict loads the test videos first: the mismatch stops it before any prediction
    ds = dataset(tree.root, test_list=str(tree.test_list), submission_template=str(partial))
    with pytest.raises(DataError, match=re.escape(f"submission template {partial} does not")):
        ds.videos("test")


def test_a_template_whose_video_rows_are_interleaved_is_warned_about(tree, tmp_path):
    tmpl = tmp_path / "mixed.txt"
    rows = ["vid_f/00001.jpg", "vid_g_left/00001.jpg", "vid_f/00002.jpg", "vid_g_left/00002.jpg"]
    tmpl.write_text("image_location,valence,arousal\n" + "".join(f"{r},0,0\n" for r in rows))
    ds = dataset(tree.root, test_list=str(tree.test_list), submission_template=str(tmpl))
    with pytest.warns(UserWarning) as caught:
        out = ds.submission_frames("test")
    msg = str(caught[0].message)
    assert msg.startswith(
        f"submission template: {tmpl}:4: the rows of video 'vid_f' resume after other "
    )
    assert "its row order differs from the template's" in msg
    assert [r for r, _ in out["vid_f"]] == ["vid_f/00001.jpg", "vid_f/00002.jpg"]


# --------------------------------------------------------------------------- 16. validate


def _recipe(root: Path, *extra: str):
    return load_recipe(
        REPO / "recipes" / "affwild2" / "tagf.yaml",
        [
            f"data.params.root={root}",
            f"data.params.audio.backbone={TINY_AUDIO}",
            f"data.params.video.backbone={TINY_VIDEO}",
            "data.params.video.resize=24",
            *extra,
        ],
    )


def test_validate_reports_what_run_would_reject(tmp_path):
    """``recipe validate`` builds the dataset: the layout checks that read no media run
    there (a tree without any media, so nothing can have been decoded)."""
    good = annotations_only(tmp_path / "aw", {"a": LABELS, "b": LABELS}, {"c": LABELS})
    (good / "test.txt").write_text("t1\nt2\n")
    (good / "sample.txt").write_text("image_location,valence,arousal\nt1/00001.jpg,0,0\n")
    check_recipe(_recipe(good, "data.params.test_list=test.txt"))
    check_recipe(_recipe(good, "data.params.submission_template=sample.txt"))

    cases = [
        ((tmp_path / "nowhere", []), f"dataset root {q(tmp_path / 'nowhere')} does not exist"),
        (
            (good, ["data.params.annotations=nope"]),
            f"annotation folder {q(good / 'nope')} must hold Train_Set",
        ),
        (
            (good, ["data.params.test_list=nope.txt"]),
            f"test list {q(good / 'nope.txt')} does not exist or is not a file",
        ),
        (
            (good, ["data.params.test_list=leak.txt"]),
            f"test list {q(good / 'leak.txt')} names trial\\(s\\) that have an annotation "
            "file .*: a;",
        ),
        (
            (good, ["data.params.submission_template=nope.txt"]),
            r"data\.params\.submission_template: "
            f"{q(good / 'nope.txt')} does not exist .*a relative path is read under",
        ),
        (
            (good, [f"data.params.audio.backbone.params.weights={tmp_path / 'no.safetensors'}"]),
            r"backbone weights file .*no\.safetensors does not exist; set "
            r"data\.params\.audio\.backbone\.params\.weights",
        ),
    ]
    key = "data.params.video.backbone.params.weights"
    truncated, pickled, folder = tmp_path / "cut.safetensors", tmp_path / "w.pth", tmp_path / "w"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64, 64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:200])
    torch.save({"w": torch.zeros(2)}, pickled)
    folder.mkdir()
    cases += [  # told once by validate, not once per extraction job
        ((good, [f"{key}={truncated}"]), r"cut\.safetensors \(data\.params\.video\.backbone"
         r"\.params\.weights\) are not a readable safetensors file"),
        ((good, [f"{key}={pickled}"]), r"converts with `fusionkit weights convert`"),
        ((good, [f"{key}={folder}"]), r"backbone weights .*w is a folder; set data\.params"),
    ]  # fmt: skip
    (good / "leak.txt").write_text("t1\na\n")
    for (root, extra), match in cases:
        with pytest.raises(DataError, match=match):
            check_recipe(_recipe(root, *extra))

    both = annotations_only(tmp_path / "both", {"a": LABELS, "b": LABELS}, {"b": LABELS})
    with pytest.raises(DataError, match=r"trial\(s\) b appear in both .*Train_Set and .*Valid"):
        check_recipe(_recipe(both))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"no VA annotations under {q(empty)}"):
        check_recipe(_recipe(empty))


def test_recipe_validate_command_prints_one_error_line(tmp_path, monkeypatch, capsys):
    import fusionkit.cli.root as cli

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    root = annotations_only(tmp_path / "aw", {"a": LABELS}, {"c": LABELS})
    (root / "leak.txt").write_text("a\n")
    recipe = REPO / "recipes" / "affwild2" / "tagf.yaml"
    argv = ["fusionkit", "recipe", "validate", str(recipe), f"data.params.root={root}"]
    monkeypatch.setattr(sys, "argv", [*argv, "data.params.test_list=leak.txt"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    out, err = capsys.readouterr()
    assert info.value.code == 2 and "ok" not in out
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: test list {root / 'leak.txt'} names trial(s)")
    monkeypatch.setattr(sys, "argv", argv)  # the same tree without the leak: ok
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code in (0, None)
    assert "ok:" in capsys.readouterr().out
