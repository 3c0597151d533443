"""Perturbations: determinism, out-of-place application, exact semantics, recipe checks."""

from __future__ import annotations

import math

import pytest
import torch

from fusionkit.core.errors import DataError, RecipeError
from fusionkit.core.interfaces import Perturbation, Video
from fusionkit.core.recipe import PerturbationSpec, validate_recipe
from fusionkit.core.registry import get_registry
from fusionkit.engine.data import Normalizer
from fusionkit.engine.perturb import PerturbedDataset, perturbation_revision, shift_index
from fusionkit.engine.perturb import build_perturbation as build_spec
from tests.conftest import TinyDataset, TinyParams, tiny_recipe

# one setting per built-in perturbation that changes a video
CHANGING = {
    "shift": {"k": 4},
    "jitter": {"max_k": 20},
    "frame_drop": {"p": 0.3},
    "noise": {"snr_db": 5.0},
    "modality_dropout": {"p": 0.5},
    "span_dropout": {"rate": 0.4, "span": 7},
}
RANDOM = ["jitter", "frame_drop", "noise", "modality_dropout", "span_dropout"]


def build_perturbation(name, params, seed=0, registry=None):
    """Validate ``{name, params, seed}`` as a recipe would, then build it."""
    registry = registry or get_registry()
    spec = PerturbationSpec.model_validate(
        {"name": name, "params": params, "seed": seed}, context={"registry": registry}
    )
    return build_spec(spec, registry)


def make_video(name: str, n: int = 200, seed: int = 0) -> Video:
    g = torch.Generator().manual_seed(seed)
    return Video(
        name,
        {"audio": torch.randn(n, 4, generator=g), "video": torch.randn(n, 3, generator=g)},
        torch.rand(n, 2, generator=g) * 2 - 1,
        torch.ones(n, dtype=torch.bool),
    )


def videos(k: int = 12, n: int = 200) -> list[Video]:
    return [make_video(f"v{i:02d}", n, seed=i) for i in range(k)]


def apply(name, params, vids, seed=0, registry=None):
    pert = build_perturbation(name, params, seed, registry)
    return [pert(v) for v in vids]


def same(a: list[Video], b: list[Video]) -> bool:
    return all(
        torch.equal(x.features[m], y.features[m])
        for x, y in zip(a, b, strict=True)
        for m in x.features
    )


def test_builtins_are_registered_and_satisfy_the_protocol(registry):
    assert set(CHANGING) <= set(registry.names("perturbation"))
    for name, params in CHANGING.items():
        assert isinstance(build_perturbation(name, params, registry=registry).fn, Perturbation)


@pytest.mark.parametrize("name", sorted(CHANGING))
def test_out_of_place(name, registry):
    vids = videos(4)
    before = [{m: x.clone() for m, x in v.features.items()} for v in vids]
    labels = [v.labels.clone() for v in vids]
    dicts = [v.features for v in vids]
    out = apply(name, CHANGING[name], vids, registry=registry)
    for v, b, lab, d in zip(vids, before, labels, dicts, strict=True):
        assert v.features is d and set(d) == set(b)
        for m in b:
            assert torch.equal(v.features[m], b[m]), f"{name} modified {v.name}/{m} in place"
        assert torch.equal(v.labels, lab)
    assert all(o is not v and o.features is not v.features for o, v in zip(out, vids, strict=True))
    assert not same(out, vids)


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_same_result_other_seed_other_result(name, registry):
    vids = videos()
    a = apply(name, CHANGING[name], vids, seed=3, registry=registry)
    b = apply(name, CHANGING[name], vids, seed=3, registry=registry)
    c = apply(name, CHANGING[name], vids, seed=4, registry=registry)
    assert same(a, b)
    assert not same(a, c)


@pytest.mark.parametrize("name", RANDOM)
def test_a_video_draw_depends_on_neither_order_nor_subset(name, registry):
    vids = videos()
    forward = apply(name, CHANGING[name], vids, seed=1, registry=registry)
    backward = apply(name, CHANGING[name], vids[::-1], seed=1, registry=registry)[::-1]
    alone = apply(name, CHANGING[name], vids[5:6], seed=1, registry=registry)
    assert same(forward, backward)
    assert same(forward[5:6], alone)


def test_shift_semantics_exact_indices(registry):
    n = 50
    ramp = torch.arange(n, dtype=torch.float32)[:, None]
    v = Video("x", {"audio": ramp.repeat(1, 2), "video": ramp.clone()}, torch.zeros(n, 2),
              torch.ones(n, dtype=torch.bool))  # fmt: skip
    late = build_perturbation("shift", {"modality": "audio", "k": 3}, registry=registry)(v)
    early = build_perturbation("shift", {"modality": "audio", "k": -3}, registry=registry)(v)
    # +k: frame i shows original frame i - k (edge padded at the start)
    assert late.features["audio"][:, 0].tolist() == [max(i - 3, 0) for i in range(n)]
    assert early.features["audio"][:, 0].tolist() == [min(i + 3, n - 1) for i in range(n)]
    assert torch.equal(late.features["video"], v.features["video"])  # the other stream stays
    assert torch.equal(late.labels, v.labels)
    assert shift_index(4, 10).tolist() == [0, 0, 0, 0]
    assert shift_index(4, -10).tolist() == [3, 3, 3, 3]


def test_jitter_is_a_per_video_shift_within_range(registry):
    n = 80
    ramp = torch.arange(n, dtype=torch.float32)[:, None]
    vids = [
        Video(f"v{i}", {"audio": ramp, "video": ramp}, torch.zeros(n, 2), torch.ones(n, dtype=bool))
        for i in range(60)
    ]
    shifts = []
    for out in apply("jitter", {"max_k": 5}, vids, registry=registry):
        a = out.features["audio"][:, 0]
        k = int(a[40] - 40) * -1  # frame 40 shows 40 - k
        assert torch.equal(a, ramp[shift_index(n, k), 0])
        shifts.append(k)
    assert set(shifts) == set(range(-5, 6))  # 60 draws cover the 11 integers


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 30.0])
def test_noise_has_the_requested_snr(snr_db, registry):
    n = 100_000
    t = torch.arange(n, dtype=torch.float64)[:, None]
    x = (torch.sin(t / 50 + torch.arange(3)) * 2 + 0.5).float()
    v = Video("long", {"audio": x, "video": x}, torch.zeros(n, 2), torch.ones(n, dtype=bool))
    out = build_perturbation("noise", {"modalities": ["audio"], "snr_db": snr_db}, 0, registry)(v)
    noise = (out.features["audio"].double() - x.double()).pow(2).mean()
    signal = x.double().var(0, unbiased=False).mean()  # the offset 0.5 is not signal
    measured = 10 * math.log10(float(signal / noise))
    assert measured == pytest.approx(snr_db, abs=0.05)
    assert torch.equal(out.features["video"], x)


def test_noise_power_and_noise_are_on_present_frames_only(registry):
    """Absent frames (zero features, no face) used to count in the signal power, lowering the
    noise, and got noise themselves."""
    n = 40_000
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64).float() * 2 + 1
    present = torch.arange(n) % 2 == 0
    x[~present] = 0.0
    v = Video("p", {"audio": x, "video": x}, torch.zeros(n, 2), torch.ones(n, dtype=bool),
              present={"audio": present})  # fmt: skip
    out = build_perturbation("noise", {"modalities": ["audio"], "snr_db": 10.0}, 0, registry)(v)
    diff = (out.features["audio"] - x).double()
    assert torch.equal(diff[~present], torch.zeros_like(diff[~present]))
    signal = x[present].double().var(0, unbiased=False).mean()
    measured = 10 * math.log10(float(signal / diff[present].pow(2).mean()))
    assert measured == pytest.approx(10.0, abs=0.1)


@pytest.mark.parametrize("n", [45, 73, 100, 301])
@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_span_dropout_drops_the_stated_fraction_of_frames(n, rate, registry):
    """It used to drop round(rate x blocks) whole blocks: on 73 frames (span 30) rate 0.1
    dropped nothing and rates 0.5 and 0.75 the same two thirds."""
    v = make_video("s", n=n)
    for seed in range(5):
        spans = build_perturbation("span_dropout", {"rate": rate, "span": 30}, seed, registry)(v)
        zero = (spans.features["audio"] == 0).all(dim=1)
        assert int(zero.sum()) == math.floor(rate * n + 0.5)
        starts = torch.nonzero(zero[1:] & ~zero[:-1]).flatten() + 1
        starts = starts.tolist() + ([0] if zero[0] else [])
        assert all(s % 30 == 0 for s in starts), "every span starts at a block boundary"


def test_modality_dropout_and_span_dropout(registry):
    v = make_video("a", n=1000)
    gone = build_perturbation("modality_dropout", {"modalities": ["audio"], "p": 1.0}, 0, registry)(
        v
    )
    assert torch.count_nonzero(gone.features["audio"]) == 0
    assert torch.equal(gone.features["video"], v.features["video"])
    kept = build_perturbation("modality_dropout", {"p": 0.0}, 0, registry)(v)
    assert same([kept], [v])

    spans = build_perturbation("span_dropout", {"rate": 0.5, "span": 10}, 0, registry)(v)
    for m in ("audio", "video"):
        zero = (spans.features[m] == 0).all(dim=1)
        assert int(zero.sum()) == 500
        blocks = zero.reshape(100, 10)
        assert bool((blocks.all(1) | ~blocks.any(1)).all()), "spans are whole aligned blocks"
    a0 = (spans.features["audio"] == 0).all(1)
    assert not torch.equal(a0, (spans.features["video"] == 0).all(1))  # independent per stream
    joint = build_perturbation("span_dropout", {"rate": 0.5, "span": 10, "same_spans": True}, 0,
                               registry)(v)  # fmt: skip
    assert torch.equal((joint.features["audio"] == 0).all(1), (joint.features["video"] == 0).all(1))


def test_dropped_frames_are_absent_so_z_scoring_keeps_them_neutral(registry):
    """Frames removed by modality_dropout and span_dropout are marked absent (on top of the
    video's own absences): z-scoring keeps a fill of 0 at 0, the value of a frame the data
    never had, instead of -mean / std; the frames kept are z-scored as before."""
    v = make_video("a", n=400)
    v.features["audio"] = v.features["audio"] * 2.0 + 3.0  # mean 3: -mean/std is far from 0
    own = torch.ones(400, dtype=torch.bool)
    own[:50] = False  # absent in the data already (no face, say)
    v.present["audio"] = own
    norm = Normalizer.fit([v], ["audio", "video"])
    clean = norm.apply("audio", v.features["audio"], own)
    gone = build_perturbation("modality_dropout", {"modalities": ["audio"], "p": 1.0}, 0, registry)
    out = gone(v)
    assert not bool(out.present["audio"].any()) and "video" not in out.present
    z_gone = norm.apply("audio", out.features["audio"], out.present["audio"])
    assert torch.count_nonzero(z_gone) == 0
    assert torch.equal(v.present["audio"], own)  # the input video is untouched
    spans = build_perturbation("span_dropout", {"modalities": ["audio"], "rate": 0.5, "span": 10},
                               0, registry)(v)  # fmt: skip
    dropped = (spans.features["audio"] == 0).all(1)
    assert int(dropped.sum()) == 200
    assert torch.equal(spans.present["audio"], own & ~dropped)
    z = norm.apply("audio", spans.features["audio"], spans.present["audio"])
    assert torch.count_nonzero(z[dropped]) == 0
    torch.testing.assert_close(z[~dropped], clean[~dropped])


def test_the_revisions_of_the_dropouts_mark_the_absent_frames(registry):
    """Robustness files computed before dropped frames were marked absent are recomputed:
    the revisions moved on (modality_dropout 2, span_dropout 3)."""
    assert perturbation_revision("modality_dropout", registry) == 2
    assert perturbation_revision("span_dropout", registry) == 3


def test_frame_drop_freezes_the_last_kept_frame(registry):
    n = 20_000
    ramp = torch.arange(n, dtype=torch.float32)[:, None]
    v = Video("f", {"audio": ramp, "video": ramp}, torch.zeros(n, 2), torch.ones(n, dtype=bool))
    out = build_perturbation("frame_drop", {"p": 0.25}, 0, registry)(v)
    src = out.features["audio"][:, 0]
    assert src[0] == 0
    assert bool((src <= ramp[:, 0]).all()) and bool((src[1:] >= src[:-1]).all())
    frozen = float((src[1:] == src[:-1]).float().mean())
    assert frozen == pytest.approx(0.25, abs=0.015)


def test_unknown_modality_names_the_fix(registry):
    with pytest.raises(DataError, match=r"no modality 'speech'.*has: audio, video"):
        build_perturbation("shift", {"modality": "speech", "k": 1}, 0, registry)(make_video("x"))


def test_perturbed_dataset_only_touches_its_splits(registry):
    base = TinyDataset(TinyParams())
    pert = build_perturbation("noise", {"snr_db": 0.0}, 0, registry)
    data = PerturbedDataset(base, [pert], splits=["test"])
    assert data.videos("val") is base.videos("val") or same(data.videos("val"), base.videos("val"))
    assert not same(data.videos("test"), base.videos("test"))
    assert data.videos("test") is data.videos("test")  # cached: one draw per split


def test_recipe_perturbations_are_validated(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["training"]["perturbations"] = [{"name": "jiter", "params": {"max_k": 3}}]
    raw["evaluation"]["robustness"] = [
        {"perturbation": "shift", "axis": "kk", "values": [1]},
        {"perturbation": "noise", "axis": "snr_db", "values": [10, "loud"]},
    ]
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw, "r.yaml", registry)
    text = str(err.value)
    assert "training.perturbations.0.name: unknown perturbation 'jiter'" in text
    assert "did you mean 'jitter'" in text
    assert "evaluation.robustness.0.axis: 'shift' has no param 'kk'" in text
    assert "evaluation.robustness.1.values.1: 'loud' -> snr_db" in text


def test_training_perturbations_apply_to_the_train_split_only(tmp_path, registry):
    from fusionkit.engine.session import build_session

    raw = tiny_recipe(tmp_path)
    raw["training"]["perturbations"] = [{"name": "noise", "params": {"snr_db": 0.0}, "seed": 2}]
    session = build_session(validate_recipe(raw, "r", registry), registry)
    clean = TinyDataset(TinyParams())
    assert not same(session.train_dataset.videos("train"), clean.videos("train"))
    assert same(session.train_dataset.videos("val"), clean.videos("val"))
    assert same(session.dataset.videos("train"), clean.videos("train"))  # evaluation: clean


@pytest.mark.parametrize("name", ["frame_drop", "noise", "modality_dropout", "span_dropout"])
def test_a_modality_draws_the_same_whichever_others_are_perturbed(name, registry):
    """The video stream of a condition that perturbs video alone and of one that perturbs
    audio and video must be the same draws: otherwise 'video only' and 'both' are not paired
    conditions (their difference mixes the effect with other random numbers)."""
    vids = videos(6)
    alone = apply(name, {**CHANGING[name], "modalities": ["video"]}, vids, 3, registry)
    both = apply(name, {**CHANGING[name], "modalities": ["audio", "video"]}, vids, 3, registry)
    assert any(
        not torch.equal(a.features["video"], v.features["video"])
        for a, v in zip(alone, vids, strict=True)
    )
    for a, b in zip(alone, both, strict=True):
        assert torch.equal(a.features["video"], b.features["video"])


def test_a_robustness_sweep_that_removes_a_modality_does_not_warn_of_absent_data(
    tmp_path, registry, recwarn
):
    """Removing a modality is what a modality_dropout sweep is for: its stores do not warn
    that videos have no audio at all (a training split that lacks it still does)."""
    from fusionkit.core.recipe import RobustnessSpec
    from fusionkit.engine.data import AbsentModalityWarning
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer
    from fusionkit.studies.robustness import run_sweep

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=1, num_threads=1), "r.yaml", registry)
    with RunDir.create(rc, registry) as run:
        session = build_session(rc, registry)
        Trainer(session, run).fit()
        spec = RobustnessSpec.model_validate(
            {"perturbation": "modality_dropout", "params": {"modalities": ["audio"]}, "axis": "p",
             "values": [1.0]},
            context={"registry": registry},
        )  # fmt: skip
        recwarn.clear()
        run_sweep(session, run, spec)
    assert not [w for w in recwarn if issubclass(w.category, AbsentModalityWarning)]
    data = PerturbedDataset(session.dataset, [build_perturbation(
        "modality_dropout", {"modalities": ["audio"]}, 0, registry)], ["test"])  # fmt: skip
    with pytest.warns(AbsentModalityWarning, match="have no audio at all"):
        session.store("test", data)
