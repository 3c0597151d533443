"""Feature z-scoring: statistics of the training split only, stored in the run, applied the same
way to every split, to reloaded runs and to streaming input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.data import DataWarning, Normalizer
from fusionkit.engine.evaluate import evaluate_splits
from fusionkit.engine.files import load_tensors
from fusionkit.engine.runs import NORMALIZATION_FILE, RunDir
from fusionkit.engine.session import build_session, load_run
from fusionkit.engine.streaming import StreamingPredictor
from fusionkit.engine.train import Trainer
from tests.conftest import TinyDataset, TinyParams, tiny_recipe


def _train(tmp_path, registry, **data):
    raw = tiny_recipe(tmp_path, epochs=2)
    raw["data"].update(data)
    rc = validate_recipe(raw, "r.yaml", registry)
    with RunDir.create(rc, registry) as run:
        result = Trainer(build_session(rc, registry), run).fit()
    return rc, run.path, result


def test_statistics_are_the_training_split_moments_over_present_frames():
    videos = TinyDataset(TinyParams()).videos("train")
    absent = videos[0].features["audio"].shape[0]
    videos[0] = dataclasses.replace(
        videos[0], present={"audio": torch.arange(absent) % 3 != 0}
    )  # a third of its audio frames are not observed: they must not count
    norm = Normalizer.fit(videos, ["audio", "video"])
    audio = torch.cat(
        [videos[0].features["audio"][videos[0].present["audio"]]]
        + [v.features["audio"] for v in videos[1:]]
    ).double()
    torch.testing.assert_close(norm.mean["audio"].double(), audio.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        norm.std["audio"].double(), audio.std(0, unbiased=False), atol=1e-6, rtol=0
    )


def test_a_dimension_constant_in_training_is_centred_not_blown_up():
    """std 0 used to be clamped to 1e-6, so a value of 0.05 in another split reached the model
    as 50,000 (exit 0, wrong predictions)."""
    videos = TinyDataset(TinyParams()).videos("train")
    videos = [
        dataclasses.replace(v, features={**v.features, "audio": v.features["audio"].clone()})
        for v in videos
    ]
    for v in videos:
        v.features["audio"][:, 1] = 3.0
    with pytest.warns(DataWarning, match=r"1 of \d+ audio dimension\(s\) are constant.*e\.g\. 1\b"):
        norm = Normalizer.fit(videos, ["audio"])
    x = torch.zeros(2, videos[0].features["audio"].shape[1])
    x[:, 1] = 3.05
    out = norm.apply("audio", x)
    torch.testing.assert_close(out[:, 1], torch.full((2,), 0.05), atol=1e-5, rtol=0)
    assert float(norm.std["audio"][0]) > 1e-3  # the varying dimensions keep their own scale


def test_a_run_stores_train_statistics_and_applies_them_to_every_split(tmp_path, registry):
    _, path, result = _train(tmp_path, registry, normalize="zscore")
    tensors, _ = load_tensors(path / NORMALIZATION_FILE)
    train = TinyDataset(TinyParams()).videos("train")
    feats = torch.cat([v.features["video"] for v in train]).double()
    torch.testing.assert_close(tensors["mean/video"].double(), feats.mean(0), atol=1e-6, rtol=0)
    assert NORMALIZATION_FILE in RunDir(path).marker().files  # part of the completed run

    loaded = load_run(path, registry=registry)
    store = loaded.session.store("val")
    raw_val = torch.cat([v.features["video"] for v in TinyDataset(TinyParams()).videos("val")])
    expected = (raw_val - tensors["mean/video"]) / tensors["std/video"]
    torch.testing.assert_close(store.features["video"], expected)
    again, _, _ = evaluate_splits(loaded.session, ["val", "test"])
    assert again == result.metrics  # the reloaded run normalises exactly as training did


def test_auto_follows_the_dataset_default_and_none_leaves_features_alone(tmp_path, registry):
    rc = validate_recipe(tiny_recipe(tmp_path), "r.yaml", registry)
    assert build_session(rc, registry).zscore  # no stated default: extracted-feature rule
    raw = tiny_recipe(tmp_path)
    raw["data"]["normalize"] = "none"
    session = build_session(validate_recipe(raw, "r.yaml", registry), registry)
    assert not session.zscore and session.fit_normalizer() is None
    raw["data"] = {"name": "synthetic", "params": {"num_train": 2, "num_val": 1, "num_test": 1}}
    assert not build_session(validate_recipe(raw, "r.yaml", registry), registry).zscore


def test_a_run_missing_its_statistics_refuses_to_load(tmp_path, registry):
    from fusionkit.core.errors import CheckpointError

    _, path, _ = _train(tmp_path, registry, normalize="zscore")
    (path / NORMALIZATION_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"has no normalization\.safetensors"):
        load_run(path, registry=registry)


def test_streaming_normalises_pushed_frames_like_the_offline_store(tmp_path, registry):
    _, path, _ = _train(tmp_path, registry, normalize="zscore")
    session = load_run(path, registry=registry).session
    video = TinyDataset(TinyParams()).videos("test")[0]
    store = session.store("test")
    n = 40
    with torch.no_grad():
        offline = session.model(
            {m: store.features[m][None, :n] for m in ("audio", "video")},
            torch.ones(1, n, dtype=torch.bool),
        ).pred[0]
    sp = StreamingPredictor(session.model, {"audio": 6, "video": 5}, n, session.normalizer)
    streamed = torch.stack(
        [sp.push({m: video.features[m][t] for m in ("audio", "video")}) for t in range(n)]
    )  # the tiny model is per-frame: streaming equals the offline pass
    torch.testing.assert_close(streamed, offline, atol=1e-5, rtol=1e-5)


def test_absent_zero_frames_stay_zero_after_zscoring_and_every_other_row_is_normalised():
    """A zero row on an absent frame is the dataset's "nothing here": z-scored, it would
    become a large -mean/std row for non-negative (ReLU) features. A present row of zeros (a
    neutral face's action units) and an absent row the dataset filled otherwise (the previous
    face) are z-scored like any other."""
    import numpy as np

    from fusionkit.core.interfaces import Video
    from fusionkit.engine.data import FrameStore, Normalizer

    g = torch.Generator().manual_seed(0)
    n = 200
    x = (2 + 0.5 * torch.randn(n, 4, generator=g)).clamp_min(0)
    present = torch.ones(n, dtype=torch.bool)
    present[::5] = False
    x[::10] = 0  # absent, zero-filled
    x[5::10] = x[4::10]  # absent, filled with the previous frame
    x[3::10] = 0  # present zeros
    v = Video("v", {"video": x}, torch.zeros(n, 2), torch.ones(n, dtype=torch.bool),
              present={"video": present})  # fmt: skip
    norm = Normalizer.fit([v], ["video"])
    store = FrameStore([v], ["video"], [0, 1], 64, 48, normalizer=norm)
    ref = x.double().numpy()
    seen = ref[present.numpy()]
    mean, std = seen.mean(0), seen.std(0)  # population statistics over present frames
    want = (ref - mean) / std
    want[::10] = 0.0
    np.testing.assert_allclose(store.features["video"].numpy(), want, atol=1e-5)
    assert bool(store.features["video"][3].abs().gt(0).all())  # present zeros are z-scored
    # a run saved before this rule keeps its own: absent rows z-scored like any other
    old = Normalizer.from_tensors(norm.tensors(), {})
    old_store = FrameStore([v], ["video"], [0, 1], 64, 48, normalizer=old)
    np.testing.assert_allclose(old_store.features["video"].numpy(), (ref - mean) / std, atol=1e-5)
    again = Normalizer.from_tensors(norm.tensors(), norm.metadata())
    assert again.absent_stay_zero and not old.absent_stay_zero
