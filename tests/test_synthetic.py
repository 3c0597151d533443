"""Tests of the embedded ``synthetic`` dataset plugin."""

from __future__ import annotations

import itertools

import numpy as np
import pydantic
import pytest
import torch

from fusionkit.core.errors import DataError
from fusionkit.core.interfaces import Dataset, Video
from fusionkit.core.registry import get_registry
from fusionkit_synthetic import SyntheticDataset, SyntheticParams, build

SMALL = {"num_train": 6, "num_val": 3, "num_test": 3, "min_frames": 150, "max_frames": 300}


def make(**kw: object) -> SyntheticDataset:
    return build(SyntheticParams(**{**SMALL, **kw}))


def all_tensors(ds: SyntheticDataset) -> list[torch.Tensor]:
    out = []
    for split in ds.splits():
        for v in ds.videos(split):
            out += [v.features["audio"], v.features["video"], v.labels, v.label_mask]
    return out


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Concordance correlation coefficient (population moments)."""
    mx, my = x.mean(), y.mean()
    return float(2 * np.mean((x - mx) * (y - my)) / (x.var() + y.var() + (mx - my) ** 2))


# --------------------------------------------------------------------------- contract


def test_registered_as_dataset_plugin() -> None:
    comp = get_registry().get("dataset", "synthetic")
    assert comp.params is SyntheticParams
    ds = comp.build(comp.params.model_validate({"num_train": 2, "num_val": 1, "num_test": 1}))
    assert isinstance(ds, Dataset)
    assert len(ds.videos("train")) == 2


def test_shapes_dtypes_and_names() -> None:
    ds = make(audio_dim=8, video_dim=12, fps=25.0)
    assert ds.feature_dims == {"audio": 8, "video": 12}
    assert ds.targets == ("valence", "arousal")
    assert ds.splits() == ("train", "val", "test")
    counts = {"train": 6, "val": 3, "test": 3}
    for split in ds.splits():
        videos = ds.videos(split)
        assert [v.name for v in videos] == [f"syn_{split}_{i:03d}" for i in range(counts[split])]
        for v in videos:
            assert isinstance(v, Video)
            n = v.num_frames
            assert 150 <= n <= 300
            assert v.features["audio"].shape == (n, 8)
            assert v.features["video"].shape == (n, 12)
            assert v.features["audio"].dtype == torch.float32
            assert v.features["video"].dtype == torch.float32
            assert v.labels.shape == (n, 2) and v.labels.dtype == torch.float32
            assert v.label_mask.shape == (n,) and v.label_mask.dtype == torch.bool
            assert v.fps == 25.0
            assert torch.equal(v.frame_ids, torch.arange(n))
            assert all(torch.isfinite(t).all() for t in v.features.values())


def test_lengths_vary_between_videos() -> None:
    lengths = {v.num_frames for v in make().videos("train")}
    assert len(lengths) > 1


def test_unknown_split_raises_data_error() -> None:
    with pytest.raises(DataError, match=r"'dev'.*train, val, test"):
        make().videos("dev")


def test_params_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        SyntheticParams.model_validate({"lag_maxx": 3})
    with pytest.raises(pydantic.ValidationError, match="min_frames"):
        SyntheticParams(min_frames=500, max_frames=400)
    with pytest.raises(pydantic.ValidationError):
        SyntheticParams(audio_noise=-0.1)
    with pytest.raises(pydantic.ValidationError):
        SyntheticParams(frame_drop=1.0)
    for name, field in SyntheticParams.model_fields.items():
        assert field.description, f"{name} lacks a description"


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_bitwise_identical() -> None:
    a, b = all_tensors(make(seed=3)), all_tensors(make(seed=3))
    assert len(a) == len(b)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_different_seed_differs() -> None:
    a, b = make(seed=3).videos("train"), make(seed=4).videos("train")
    for x, y in zip(a, b, strict=True):
        assert x.num_frames != y.num_frames or not torch.equal(x.labels, y.labels)
        n = min(x.num_frames, y.num_frames)
        assert not torch.equal(x.features["video"][:n], y.features["video"][:n])


def test_splits_are_independent_and_order_free() -> None:
    ds = make()
    train, val = ds.videos("train"), ds.videos("val")
    # Different streams: no video of one split reappears in another.
    train_labels = {tuple(v.labels[:20, 0].tolist()) for v in train}
    assert not any(tuple(v.labels[:20, 0].tolist()) in train_labels for v in val)
    # Generating a split alone (or after others) gives the same videos.
    fresh_val = make().videos("val")
    for x, y in zip(val, fresh_val, strict=True):
        assert torch.equal(x.features["audio"], y.features["audio"])
    # The number of train videos does not change val.
    other = make(num_train=2).videos("val")
    assert all(torch.equal(x.labels, y.labels) for x, y in zip(val, other, strict=True))


def test_videos_are_cached() -> None:
    ds = make()
    assert ds.videos("test")[0] is ds.videos("test")[0]


# --------------------------------------------------------------------------- labels


def test_labels_bounded_and_valence_skewed_positive() -> None:
    ds = make(num_train=24, unlabeled_rate=0.0)
    labels = torch.cat([v.labels for v in ds.videos("train")])
    assert labels.abs().max() <= 1.0
    assert labels.std(0).min() > 0.1  # not degenerate
    assert labels[:, 0].mean() > 0.0  # Aff-Wild2-like positive valence bias
    assert labels[:, 1].median() > 0.0  # arousal mostly positive
    for info in ds.info("val"):
        assert info.latent.abs().max() <= 1.0
        assert info.speech.min() >= 0.0 and info.speech.max() <= 1.0
    for v in ds.videos("train"):
        # smooth: frame-to-frame steps are small compared with the range
        assert (v.labels[1:] - v.labels[:-1]).abs().max() < 0.1


def test_unlabeled_rate_masks_runs() -> None:
    ds = make(unlabeled_rate=0.1)
    videos = ds.videos("train")
    masks = torch.cat([v.label_mask for v in videos])
    assert 0.03 < (~masks).float().mean() < 0.2
    for v, info in zip(videos, ds.info("train"), strict=True):
        assert torch.all(v.labels[~v.label_mask] == 0)
        assert torch.equal(v.labels[v.label_mask], info.latent[v.label_mask])
    clean = make(unlabeled_rate=0.0)
    assert all(bool(v.label_mask.all()) for s in clean.splits() for v in clean.videos(s))


# --------------------------------------------------------------------------- knobs


def test_lag_shifts_audio_only() -> None:
    quiet = {"audio_noise": 0.0, "video_noise": 0.0}
    aligned, lagged = make(lag_max=0, **quiet), make(lag_max=9, **quiet)
    lags = [info.lag for info in lagged.info("train")]
    assert all(-9 <= k <= 9 for k in lags) and any(k != 0 for k in lags)
    assert all(info.lag == 0 for info in aligned.info("train"))
    for a, b, k in zip(aligned.videos("train"), lagged.videos("train"), lags, strict=True):
        n = a.num_frames
        src = torch.clamp(torch.arange(n) - k, 0, n - 1)  # frame i observes i - lag
        assert torch.equal(b.features["audio"], a.features["audio"][src])
        assert torch.equal(b.features["video"], a.features["video"])
        assert torch.equal(b.labels, a.labels)
        if k != 0:
            assert not torch.equal(b.features["audio"], a.features["audio"])


def _repeat_fraction(x: torch.Tensor) -> float:
    return float((x[1:] == x[:-1]).all(dim=1).float().mean())


def test_frame_drop_freezes_frames() -> None:
    for v in make(frame_drop=0.0).videos("train"):
        assert _repeat_fraction(v.features["audio"]) == 0.0
        assert _repeat_fraction(v.features["video"]) == 0.0
    videos = make(frame_drop=0.3).videos("train")
    for modality in ("audio", "video"):
        x = torch.cat([v.features[modality] for v in videos])
        assert 0.2 < _repeat_fraction(x) < 0.4
    # Frozen rows differ between the modalities (independent draws).
    v = videos[0]
    assert not torch.equal(
        (v.features["audio"][1:] == v.features["audio"][:-1]).all(1),
        (v.features["video"][1:] == v.features["video"][:-1]).all(1),
    )


def test_modality_dropout_zeroes_spans() -> None:
    ds = make(modality_dropout=1.0)
    for v, info in zip(ds.videos("train"), ds.info("train"), strict=True):
        n = v.num_frames
        for modality, span in (("audio", info.audio_dropout), ("video", info.video_dropout)):
            assert span is not None
            start, stop = span
            assert n // 10 <= stop - start <= n // 2
            zero = (v.features[modality] == 0).all(dim=1)
            assert zero[start:stop].all()
            assert zero.sum() == stop - start  # nothing else is zero
    for v in make(modality_dropout=0.0).videos("train"):
        assert not (v.features["audio"] == 0).all(dim=1).any()
        assert not (v.features["video"] == 0).all(dim=1).any()


def test_noise_knobs_are_per_modality() -> None:
    base, noisy = make(), make(video_noise=2.0)
    for a, b in zip(base.videos("val"), noisy.videos("val"), strict=True):
        assert torch.equal(a.features["audio"], b.features["audio"])
        assert b.features["video"].std() > 1.5 * a.features["video"].std()


# --------------------------------------------------------------------------- difficulty


def _ridge_ccc(
    train: list[Video], test: list[Video], modalities: tuple[str, ...], context: int = 2
) -> np.ndarray:
    """CCC (valence, arousal) on ``test`` of ridge regression over a +-context window."""

    def design(videos: list[Video]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for v in videos:
            f = np.concatenate([v.features[m].numpy() for m in modalities], 1).astype(np.float64)
            n = f.shape[0]
            rows = [f[np.clip(np.arange(n) + o, 0, n - 1)] for o in range(-context, context + 1)]
            keep = v.label_mask.numpy()
            xs.append(np.concatenate([*rows, np.ones((n, 1))], 1)[keep])
            ys.append(v.labels.numpy().astype(np.float64)[keep])
        return np.concatenate(xs), np.concatenate(ys)

    x, y = design(train)
    w = np.linalg.solve(x.T @ x + 100.0 * np.eye(x.shape[1]), x.T @ y)
    xt, yt = design(test)
    pred = xt @ w
    return np.array([ccc(pred[:, k], yt[:, k]) for k in range(2)])


def test_modality_asymmetry_and_fusion_gain() -> None:
    ds = build(SyntheticParams(num_train=24, num_val=12, min_frames=300, max_frames=600))
    train, val = ds.videos("train"), ds.videos("val")
    audio = _ridge_ccc(train, val, ("audio",))
    video = _ridge_ccc(train, val, ("video",))
    both = _ridge_ccc(train, val, ("audio", "video"))
    valence, arousal = 0, 1
    assert video[valence] > audio[valence] + 0.3, (audio, video)
    assert audio[arousal] > video[arousal] + 0.15, (audio, video)
    assert video[valence] > video[arousal] + 0.2, video
    assert audio[arousal] > audio[valence] + 0.2, audio
    assert both.mean() > max(audio.mean(), video.mean()) + 0.08, (audio, video, both)
    assert both.mean() < 0.9, both  # not saturated


# --------------------------------------------------------------------------- drift, reliability

QUIET = {"audio_noise": 0.0, "video_noise": 0.0}
NEW_KNOBS_OFF = {
    "lag_drift": 0.0,
    "reliability_rate": 0.0,
}
#: The other new knobs only shape what the two above switch on; set away from their defaults.
NEW_KNOBS_SHAPE = {
    "lag_drift_period": 3.0,
    "lag_drift_kind": "walk",
    "reliability_span": 0.5,
    "reliability_modality": "audio",
    "reliability_kinds": ["zero"],
    "reliability_noise": 7.0,
}


def _videos_equal(a: Video, b: Video) -> bool:
    return (
        a.name == b.name
        and set(a.features) == set(b.features)
        and all(torch.equal(a.features[m], b.features[m]) for m in a.features)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.label_mask, b.label_mask)
        and set(a.present) == set(b.present)
        and all(torch.equal(a.present[m], b.present[m]) for m in a.present)
    )


@pytest.mark.parametrize("base", [{}, {"lag_max": 9, "modality_dropout": 0.5, "frame_drop": 0.2}])
def test_new_knobs_off_give_the_same_tensors(base: dict) -> None:
    """Drift and reliability switched off (whatever their shape knobs) change nothing."""
    ref = make(**base)
    for extra in (NEW_KNOBS_OFF, {**NEW_KNOBS_OFF, **NEW_KNOBS_SHAPE}):
        ds = make(**base, **extra)
        for split in ds.splits():
            pairs = zip(ref.videos(split), ds.videos(split), strict=True)
            assert all(_videos_equal(a, b) for a, b in pairs), (split, extra)
            for a, b in zip(ref.info(split), ds.info(split), strict=True):
                assert b.reliability == ()
                assert torch.equal(b.frame_lag, torch.full_like(b.frame_lag, a.lag))
                assert b.lag == a.lag and torch.equal(a.speech, b.speech)


@pytest.mark.parametrize("kind", ["sine", "walk"])
def test_lag_drift_shifts_audio_by_the_per_frame_lag(kind: str) -> None:
    drift = {"lag_drift": 6.0, "lag_drift_period": 4.0, "lag_drift_kind": kind}
    aligned, constant = make(**QUIET), make(lag_max=3, **QUIET)
    drifting = make(lag_max=3, **drift, **QUIET)
    steps = []
    for a, c, d, ci, di in zip(
        aligned.videos("train"),
        constant.videos("train"),
        drifting.videos("train"),
        constant.info("train"),
        drifting.info("train"),
        strict=True,
    ):
        n = a.num_frames
        lag = di.frame_lag
        assert lag.shape == (n,) and lag.dtype == torch.int64
        assert di.lag == ci.lag  # the drift does not move the constant lag
        assert (lag - di.lag).abs().max() <= 6  # bounded drift around it
        assert len(set(lag.tolist())) > 1  # it changes within the video...
        steps.append((lag[1:] - lag[:-1]).abs().max())  # ...slowly
        src = torch.clamp(torch.arange(n) - lag, 0, n - 1)
        assert torch.equal(d.features["audio"], a.features["audio"][src])
        assert torch.equal(d.features["video"], a.features["video"])
        assert torch.equal(d.labels, a.labels)
        assert torch.equal(d.features["video"], c.features["video"])
    assert max(steps) <= 1  # never more than one frame of lag change per frame


def test_lag_drift_lags_the_speech_track_too() -> None:
    aligned, drifting = make(), make(lag_drift=8.0, lag_drift_period=3.0)
    for a, d in zip(aligned.info("val"), drifting.info("val"), strict=True):
        n = a.latent.shape[0]
        src = torch.clamp(torch.arange(n) - d.frame_lag, 0, n - 1)
        assert torch.equal(d.speech, a.speech[src])
        assert torch.equal(d.latent, a.latent)


def _spans(ds: SyntheticDataset, split: str = "train") -> list[list[tuple[int, int]]]:
    return [[(s.start, s.stop) for s in info.reliability] for info in ds.info(split)]


def test_reliability_spans_cover_about_the_rate_without_overlap() -> None:
    ds = make(num_train=12, reliability_rate=0.3, reliability_span=1.0)
    covered = total = 0
    modalities = set()
    for v, info in zip(ds.videos("train"), ds.info("train"), strict=True):
        n = v.num_frames
        spans = info.reliability
        for s in spans:
            assert 1 <= s.start < s.stop <= n
            assert s.kind in ("noise", "zero", "freeze", "silence")
            assert s.kind != "silence" or s.modality == "audio"
            modalities.add(s.modality)
        for s, t in itertools.pairwise(spans):
            assert s.stop <= t.start  # time order, no overlap: one modality at a time
        covered += int((info.unreliable("audio") | info.unreliable("video")).sum())
        total += n
    assert 0.2 < covered / total < 0.4
    assert modalities == {"audio", "video"}  # 'either' picks both


@pytest.mark.parametrize("kind", ["noise", "zero", "freeze", "silence"])
def test_each_reliability_kind_changes_only_its_spans(kind: str) -> None:
    knobs = {"reliability_rate": 0.3, "reliability_span": 1.0, "reliability_kinds": [kind]}
    if kind == "silence":
        knobs["reliability_modality"] = "audio"
    base, ds = make(speech_ratio=1.0), make(speech_ratio=1.0, **knobs)
    # The kind (and modality) knobs never move a span.
    assert _spans(ds) == _spans(make(reliability_rate=0.3, reliability_span=1.0))
    energy = {"base": 0.0, "span": 0.0}
    seen: set[str] = set()
    for a, b, info in zip(base.videos("train"), ds.videos("train"), ds.info("train"), strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.label_mask, b.label_mask)
        assert all(s.kind == kind for s in info.reliability)
        for m in ("audio", "video"):
            hit = info.unreliable(m)
            x, y = a.features[m], b.features[m]
            assert torch.equal(x[~hit], y[~hit])  # outside its spans: bitwise unchanged
            absent = kind in ("zero", "freeze") and bool(hit.any())
            assert (m in b.present) == absent
            if absent:
                assert torch.equal(b.present[m], ~hit)
            for s in (s for s in info.reliability if s.modality == m):
                seen.add(m)
                rows = slice(s.start, s.stop)
                if kind == "zero":
                    assert bool((y[rows] == 0).all())
                elif kind == "freeze":
                    assert bool((y[rows] == y[s.start - 1]).all())
                    assert torch.equal(y[s.start - 1], x[s.start - 1])
                elif kind == "noise":
                    assert 2.5 < float((y[rows] - x[rows]).std()) < 3.5  # reliability_noise 3
                else:
                    energy["base"] += float(x[rows].pow(2).sum())
                    energy["span"] += float(y[rows].pow(2).sum())
    assert seen == ({"audio"} if kind == "silence" else {"audio", "video"})
    if kind == "silence":  # the voice is muted: only room and feature noise remain
        assert energy["span"] < 0.8 * energy["base"]


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_reliability_modality_leaves_the_other_one_alone(modality: str) -> None:
    base = make()
    ds = make(reliability_rate=0.4, reliability_modality=modality)
    other = "video" if modality == "audio" else "audio"
    kinds = set()
    for a, b, info in zip(base.videos("train"), ds.videos("train"), ds.info("train"), strict=True):
        assert info.reliability and all(s.modality == modality for s in info.reliability)
        kinds |= {s.kind for s in info.reliability}
        assert torch.equal(a.features[other], b.features[other])
        assert other not in b.present
    assert ("silence" in kinds) == (modality == "audio")


def test_reliability_params_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="twice"):
        SyntheticParams(reliability_kinds=["zero", "zero"])
    with pytest.raises(pydantic.ValidationError, match="audio only"):
        SyntheticParams(reliability_kinds=["silence"])
    SyntheticParams(reliability_kinds=["silence"], reliability_modality="audio")
    with pytest.raises(pydantic.ValidationError):
        SyntheticParams(reliability_rate=0.95)
    with pytest.raises(pydantic.ValidationError):
        SyntheticParams(lag_drift_kind="square")


def test_dataset_with_every_new_knob_conforms() -> None:
    from fusionkit.plugin import check_component

    params = {
        **SMALL,
        "num_train": 3,
        "num_val": 2,
        "num_test": 2,
        "lag_max": 4,
        "lag_drift": 5.0,
        "lag_drift_kind": "walk",
        "reliability_rate": 0.4,
    }
    check_component("dataset", "synthetic", params).assert_ok()
