"""Data-integrity refusals of the ``features`` dataset, the affwild2 backbones' params and
weights, and ``fusionkit weights convert`` (audit of recipes, items 2, 4, 12, 13, 14, 16, 17).

Each test builds a few small arrays and label files in ``tmp_path`` (no media): a trial in
both partitions, a ``_right`` trial without its own face array, arrays off their labels,
arrays of one modality with different widths, missing folders seen by ``recipe validate``,
weights holding NaN, and unbounded backbone params. Every refusal is one line naming the file
(or the recipe path) and the fix.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from fusionkit.core.errors import CheckpointError, DataError, FusionkitError, RecipeError
from fusionkit.core.recipe import load_recipe
from fusionkit_affwild2.backbones import load_backbone_weights, read_weights
from fusionkit_affwild2.features import ROW_TOLERANCE
from fusionkit_affwild2.layout import HEADER
from tests.affwild2_fixture import TINY_AUDIO, TINY_VIDEO
from tests.conftest import REPO
from tests.test_affwild2 import _features_dataset
from tests.test_reliability import one_line_error
from tests.test_weights import invoke, plugin_backbone

FRAMES = 20
WIDTHS = {"audio": 4, "video": 6}


def data_error_line(call) -> str:
    """The message of the :class:`DataError` that ``call()`` raises, checked to be one line."""
    with pytest.raises(DataError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    return message


def _labels(path: Path, frames: int = FRAMES, unlabelled: tuple[int, int] = (0, 0)) -> Path:
    """An annotation file of ``frames`` rows, ``-5`` on rows ``[lo, hi)``."""
    lo, hi = unlabelled
    rows = ["-5,-5" if lo <= k < hi else f"{k / frames:.3f},-0.2" for k in range(frames)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def _array(path: Path, rows: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(path, rng.standard_normal((rows, width)).astype(np.float32))
    return path


def make_features(root: Path, train=("a", "b"), val=("c",), arrays=None) -> tuple[Path, Path]:
    """``root/feat/<modality>/<trial>.npy`` (``FRAMES`` rows, ``WIDTHS``) and
    ``root/labels/{Train_Set,Validation_Set}/<trial>.txt``; ``arrays`` lists the trials
    with arrays (default: every trial)."""
    feats, labels = root / "feat", root / "labels"
    for part, names in (("Train_Set", train), ("Validation_Set", val)):
        (labels / part).mkdir(parents=True, exist_ok=True)
        for name in names:
            _labels(labels / part / f"{name}.txt")
    for i, name in enumerate(arrays if arrays is not None else (*train, *val)):
        for modality, width in WIDTHS.items():
            _array(feats / modality / f"{name}.npy", FRAMES, width, seed=i)
    return feats, labels


def dataset(feats: Path, labels: Path, **params):
    return _features_dataset(features_dir=str(feats), labels=str(labels), **params)


def write_recipe(root: Path, feats: Path, labels: Path) -> Path:
    recipe = {
        "name": "feat",
        "data": {
            "name": "features",
            "params": {"features_dir": str(feats), "labels": str(labels)},
            "window": 8,
            "hop": 4,
        },
        "model": {
            "encoders": {m: {"name": "linear", "params": {"dim": 8}} for m in WIDTHS},
            "fusion": {"name": "concat"},
            "gate": {"name": "last"},
            "head": {"name": "regression", "params": {"hidden": 8}},
            "targets": ["valence", "arousal"],
        },
        "training": {"epochs": 1, "batch_size": 4, "num_threads": 1, "device": "cpu"},
        "evaluation": {"splits": ["val"]},
        "output": {"dir": str(root / "runs")},
    }
    path = root / "feat.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# --------------------------------------------------------------------------- 2: both splits


def test_a_trial_in_train_and_val_is_refused_naming_both_files(tmp_path):
    feats, labels = make_features(tmp_path, train=("a", "b"), val=("a", "c"))
    message = data_error_line(lambda: dataset(feats, labels).videos("val"))
    assert "trial(s) a appear in both" in message
    assert str(labels / "Train_Set" / "a.txt") in message
    assert str(labels / "Validation_Set" / "a.txt") in message
    assert "remove its annotation file from the other" in message


def test_a_test_list_naming_an_annotated_trial_is_refused(tmp_path):
    """A trial of Train_Set listed as test used to be scored as "test" with its labels."""
    feats, labels = make_features(
        tmp_path, train=("a", "b"), val=("c",), arrays=("a", "b", "c", "t")
    )
    leak = tmp_path / "test_list.txt"
    leak.write_text("t\nb\n")
    with pytest.raises(
        DataError,
        match=r"test list .* names trial\(s\) that have an annotation "
        r"file in .*Train_Set or .*Validation_Set: b; test trials must be unlabelled",
    ):
        dataset(feats, labels, test_list=str(leak))
    clean = tmp_path / "clean.txt"
    clean.write_text("t\n")
    assert dataset(feats, labels, test_list=str(clean)).trials("test") == ["t"]


def test_a_submission_template_defines_the_test_rows_as_for_affwild2(tmp_path):
    """With the organisers' sample file, the test rows are exactly the template's, in its
    order (frames past an array's end included: predict pads them); a template naming other
    videos than the test list is refused naming both; without one, one row per frame."""
    feats, labels = make_features(
        tmp_path, train=("a", "b"), val=("c",), arrays=("a", "b", "c", "t", "u")
    )
    tests = tmp_path / "test_list.txt"
    tests.write_text("t\nu\n")
    template = tmp_path / "sample.txt"
    rows = ["u/00002.jpg", "u/00001.jpg", "t/00001.jpg", f"t/{FRAMES + 3:05d}.jpg"]
    template.write_text("image_location,valence,arousal\n" + "".join(f"{r},0,0\n" for r in rows))
    ds = dataset(feats, labels, test_list=str(tests), submission_template=str(template))
    got = ds.submission_frames("test")
    assert got == {"u": [(rows[0], 1), (rows[1], 0)], "t": [(rows[2], 0), (rows[3], FRAMES + 2)]}
    plain = dataset(feats, labels, test_list=str(tests)).submission_frames("test")
    assert plain["t"] == [(f"t/{k + 1:05d}.jpg", k) for k in range(FRAMES)]
    other = tmp_path / "other.txt"
    other.write_text("t\n")
    narrow = dataset(feats, labels, test_list=str(other), submission_template=str(template))
    with pytest.raises(DataError, match=r"1 template video\(s\) not in the test list .*: u"):
        narrow.submission_frames("test")
    with pytest.raises(DataError, match=r"data\.params\.submission_template: .* does not exist"):
        dataset(feats, labels, test_list=str(tests), submission_template=str(tmp_path / "x"))


# --------------------------------------------------------------------------- 4: shared_media


def test_shared_media_falls_back_for_audio_only(tmp_path):
    # c_right (train) has no array of its own; c (val) has both
    feats, labels = make_features(tmp_path, train=("a", "c_right"), val=("c",), arrays=("a", "c"))
    message = data_error_line(lambda: dataset(feats, labels).videos("train"))
    assert message.startswith(
        f"no 'video' features for trial 'c_right': expected {feats / 'video' / 'c_right.npy'}"
    )
    assert "only for audio modalities" in message and "another person's" in message
    assert str(labels / "Train_Set" / "c_right.txt") in message

    _array(feats / "video" / "c_right.npy", FRAMES, WIDTHS["video"], seed=7)
    ds = dataset(feats, labels)
    right = {v.name: v for v in ds.videos("train")}["c_right"]
    (c,) = ds.videos("val")
    assert torch.equal(right.features["audio"], c.features["audio"])  # shared sound track
    np.testing.assert_array_equal(
        right.features["video"].numpy(), np.load(feats / "video" / "c_right.npy")
    )
    # shared_media: false never falls back, not even for audio
    with pytest.raises(DataError, match=r"no 'audio' features for video 'c_right'"):
        dataset(feats, labels, shared_media=False).videos("train")


# --------------------------------------------------------------------------- 12: row counts


def test_all_frames_rows_are_bounded_and_a_compacted_array_is_named(tmp_path):
    feats, labels = make_features(tmp_path)
    _labels(labels / "Train_Set" / "a.txt", unlabelled=(5, 7))  # two -5 rows
    _array(feats / "video" / "a.npy", FRAMES - 2, WIDTHS["video"])  # short by exactly 2
    _array(feats / "audio" / "b.npy", FRAMES + 1, WIDTHS["audio"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset(feats, labels).videos("train")
    (text,) = [str(w.message) for w in caught if "features:" in str(w.message)]
    assert f"by at most {ROW_TOLERANCE} rows" in text
    assert f"video/a.npy ({FRAMES - 2} rows, {FRAMES} frames)" in text
    assert f"audio/b.npy ({FRAMES + 1} rows, {FRAMES} frames)" in text
    assert "video/a.npy are short by exactly their number of -5" in text
    assert "data.params.rows=labelled_frames" in text

    # 7 -5 rows and an array 7 rows short: beyond the tolerance, compacted
    _labels(labels / "Train_Set" / "a.txt", unlabelled=(5, 12))
    _array(feats / "video" / "a.npy", FRAMES - 7, WIDTHS["video"])
    message = data_error_line(lambda: dataset(feats, labels).videos("train"))
    assert message.startswith(
        f"'video' feature file {feats / 'video' / 'a.npy'} has {FRAMES - 7} rows but "
        f"{labels / 'Train_Set' / 'a.txt'} has {FRAMES} label rows: more than "
        f"{ROW_TOLERANCE} rows apart"
    )
    assert "set data.params.rows=labelled_frames" in message

    # 7 rows short with no -5 row: not compacted, still refused
    _labels(labels / "Train_Set" / "a.txt")
    with pytest.raises(DataError, match=r"more than 5 rows apart .* re-extract it"):
        dataset(feats, labels).videos("train")


# --------------------------------------------------------------------------- 14: widths


def test_an_array_of_another_width_is_named_when_loading(tmp_path):
    feats, labels = make_features(tmp_path)
    _array(feats / "audio" / "b.npy", FRAMES, 16)
    ds = dataset(feats, labels)
    assert ds.feature_dims == WIDTHS  # the width most files have
    message = data_error_line(lambda: ds.videos("train"))
    assert message.startswith(
        f"feature file {feats / 'audio' / 'b.npy'} has 16 columns; the other 2 'audio' "
        f"file(s) have {WIDTHS['audio']} (e.g. {feats / 'audio' / 'a.npy'})"
    )


# --------------------------------------------------------------------------- 16: validate


def test_recipe_validate_reports_missing_folders_and_overlaps(cli_inproc, tmp_path):
    feats, labels = make_features(tmp_path)
    recipe = str(write_recipe(tmp_path, feats, labels))
    assert cli_inproc(["recipe", "validate", recipe]).returncode == 0
    absent = tmp_path / "absent"
    one_line_error(
        cli_inproc(["recipe", "validate", recipe, f"data.params.labels={absent}"]),
        f"data.params.labels: {absent} does not exist or is not a folder",
    )
    one_line_error(
        cli_inproc(["recipe", "validate", recipe, f"data.params.features_dir={absent}"]),
        f"data.params.features_dir: {absent} does not exist or is not a folder",
    )
    one_line_error(
        cli_inproc(["recipe", "validate", recipe, f"data.params.labels={feats}"]),
        f"data.params.labels: {feats} holds no Train_Set (or Training_Set) and Validation_Set",
    )
    other = tmp_path / "dup"
    feats2, labels2 = make_features(other, train=("a", "b"), val=("b",))
    one_line_error(
        cli_inproc(["recipe", "validate", str(write_recipe(other, feats2, labels2))]),
        "trial(s) b appear in both",
    )


# --------------------------------------------------------------------------- 17: weights


def _nan_state(**params) -> dict[str, torch.Tensor]:
    state = dict(plugin_backbone("visual_backbone", "face_cnn", **params).state_dict())
    state["blocks.0.weight"] = state["blocks.0.weight"].clone()
    state["blocks.0.weight"][0, 0, 0, 0] = float("nan")
    return state


def test_weights_convert_refuses_non_finite_tensors_and_a_weights_param(tmp_path):
    params = TINY_VIDEO["params"]
    src, out = tmp_path / "face_nan.pth", tmp_path / "face.safetensors"
    torch.save(_nan_state(**params), src)
    args = ["--arch", "face_cnn", "-p", "channels=[4, 8]", "-p", "dim=12", "-p", "input_size=20"]
    res = invoke(str(src), str(out), *args)
    assert isinstance(res.exception, CheckpointError), res.output
    message = str(res.exception)
    assert "\n" not in message
    assert message.startswith(f"{src}: tensor 'blocks.0.weight' (1 of 108 values are NaN")
    assert not out.exists()

    res = invoke(str(src), str(out), *args, "-p", f"weights={tmp_path / 'x.safetensors'}")
    assert isinstance(res.exception, RecipeError), res.output
    assert "\n" not in str(res.exception)
    assert "weights: not a --param of weights convert: the weights are the input file" in str(
        res.exception
    )


def test_backbone_weights_with_nan_are_refused_when_loading(tmp_path):
    params = TINY_VIDEO["params"]
    path = tmp_path / "face_nan.safetensors"
    save_file(_nan_state(**params), str(path))
    message = data_error_line(lambda: read_weights(path))
    assert message.startswith(f"backbone weights {path}: tensor 'blocks.0.weight' (1 of 108")
    with pytest.raises(FusionkitError, match=r"tensor 'blocks\.0\.weight' \(1 of 108"):
        plugin_backbone("visual_backbone", "face_cnn", weights=str(path), **params)
    module = plugin_backbone("visual_backbone", "face_cnn", **params)
    with pytest.raises(DataError, match=r"face_nan\.safetensors: tensor 'blocks\.0\.weight'"):
        load_backbone_weights(module, path, _nan_state(**params))


# --------------------------------------------------------------------------- 13: bounds


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("data.params.audio.backbone.params.channels=[-3]", "audio.backbone.params.channels.0"),
        ("data.params.audio.backbone.params.channels=[100000]", "audio.backbone.params.channels.0"),
        ("data.params.video.backbone.params.channels=[0, 8]", "video.backbone.params.channels.0"),
        (
            "data.params.video.backbone.params.seed=99999999999999999999",
            "video.backbone.params.seed",
        ),
        ("data.params.audio.backbone.params.seed=-1", "audio.backbone.params.seed"),
        (
            "data.params.audio.backbone={name: wavlm, params: {size: base, pretrained: false, "
            "seed: 99999999999999999999}}",
            "audio.backbone.params.seed",
        ),
        (
            "data.params.video.backbone={name: dinov2, params: {pretrained: false, "
            "seed: 99999999999999999999}}",
            "video.backbone.params.seed",
        ),
    ],
)
def test_backbone_channels_and_seed_are_bounded(tmp_path, override, path):
    audio = "data.params.audio.backbone=" + yaml.safe_dump(TINY_AUDIO, default_flow_style=True)
    video = "data.params.video.backbone=" + yaml.safe_dump(TINY_VIDEO, default_flow_style=True)
    with pytest.raises(RecipeError) as err:
        load_recipe(
            REPO / "recipes" / "affwild2" / "tagf.yaml",
            [f"data.params.root={tmp_path}", audio.strip(), video.strip(), override],
        )
    message = str(err.value)
    assert "\n" not in message
    assert f"data.params.{path}" in message
