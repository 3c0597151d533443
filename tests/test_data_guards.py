"""Guards for the data shipped recipes train on, the perturbations robustness sweeps apply and
grids (mutation round 10e): each test fails on a change of behaviour the suite let pass.

Numbers are checked against independent computations (numpy/torch in the test), never
against the code's own output.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import re

import numpy as np
import pydantic
import pytest
import torch
import yaml
from rich.console import Console

from fusionkit.core.errors import DataError, RecipeError
from fusionkit.core.interfaces import Video
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.perturb import AppliedPerturbation, video_generator
from fusionkit.studies.grid import expand_grid, point_tag, run_grid
from fusionkit_synthetic import SyntheticParams
from tests.conftest import REPO, tiny_recipe
from tests.test_perturbations import build_perturbation, make_video
from tests.test_sweep import grid_recipe
from tests.test_synthetic import make

TINY = {"min_frames": 16, "max_frames": 16, "audio_dim": 4, "video_dim": 4}


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, stop)`` runs where ``mask`` is True."""
    padded = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = torch.nonzero(padded[1:] - padded[:-1]).flatten().tolist()
    return list(itertools.pairwise(edges))[::2]


# --------------------------------------------------------------------------- synthetic


def test_the_documented_knob_defaults_are_the_defaults() -> None:
    """Every knob of docs/synthetic.md's table has the default the table states (the data
    every shipped recipe trains on), and the table lists every knob."""
    doc = (REPO / "docs" / "synthetic.md").read_text()
    table = doc.split("## Knobs")[1].split("\n## ")[0]
    defaults = SyntheticParams().model_dump()
    seen = set()
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        values = [v.strip().strip("`") for v in cells[1].split(",")]
        for name, value in zip(names, values, strict=True):
            seen.add(name)
            kinds = ["noise", "zero", "freeze", "silence"]
            expected = kinds if value == "all four" else yaml.safe_load(value)
            assert defaults[name] == expected, name
    assert seen == set(defaults)


def test_every_lag_in_plus_minus_lag_max_is_drawn_and_none_outside() -> None:
    """lag_max=2: each video's lag is one of the 5 integers -2..2, and all of them occur."""
    ds = make(num_train=60, lag_max=2, **TINY)
    lags = [info.lag for info in ds.info("train")]
    assert set(lags) == {-2, -1, 0, 1, 2}


def test_a_sine_lag_drift_is_the_rounded_sine_of_the_stated_amplitude_and_period() -> None:
    """lag_drift 3, period 1 s at 30 fps: each frame's lag minus the constant lag is
    rint(3 sin(2 pi t / 30 + phase)) for one phase per video (fitted here on a grid)."""
    ds = make(num_train=4, lag_max=5, lag_drift=3.0, lag_drift_period=1.0, lag_drift_kind="sine")
    phases = np.linspace(0.0, 2.0 * np.pi, 1440, endpoint=False)
    for info in ds.info("train"):
        drift = (info.frame_lag - info.lag).numpy()
        t = np.arange(drift.shape[0])
        model = np.rint(3.0 * np.sin(2.0 * np.pi * t[None, :] / 30.0 + phases[:, None]))
        assert (model == drift[None, :]).mean(axis=1).max() > 0.98
        assert drift.min() == -3 and drift.max() == 3


def test_unreliable_frames_of_some_kinds_are_those_kinds_spans_only() -> None:
    """info.unreliable(m, kinds) marks the frames of m's spans of those kinds, not others."""
    ds = make(reliability_rate=0.4, reliability_span=0.5)
    checked = set()
    for info in ds.info("train"):
        n = info.latent.shape[0]
        for m, kind in itertools.product(("audio", "video"), ("noise", "zero")):
            expected = torch.zeros(n, dtype=torch.bool)
            for s in info.reliability:
                if s.modality == m and s.kind == kind:
                    expected[s.start : s.stop] = True
                    checked.add((m, kind))
            assert torch.equal(info.unreliable(m, (kind,)), expected)
    assert len(checked) == 4


def test_split_sizes_follow_their_own_knob_and_splits_hold_different_videos() -> None:
    """num_val and num_test each size their own split, and no two splits share a video."""
    ds = make(num_train=2, num_val=3, num_test=5, **TINY)
    assert [len(ds.videos(s)) for s in ("train", "val", "test")] == [2, 3, 5]
    firsts = {s: [v.features["video"] for v in ds.videos(s)] for s in ds.splits()}
    for (s, xs), (t, ys) in itertools.combinations(firsts.items(), 2):
        for x, y in itertools.product(xs, ys):
            assert not torch.equal(x, y), f"{s} and {t} share a video"


def test_equal_min_and_max_frames_give_videos_of_exactly_that_length() -> None:
    """min_frames == max_frames is a valid fixed length."""
    ds = make(num_train=3, **TINY)
    assert {v.num_frames for s in ds.splits() for v in ds.videos(s)} == {16}


def test_a_modality_dropout_span_is_absent_and_flagged_exactly_on_its_zeroed_frames() -> None:
    """A dropout span (features all zero) has present False and the unreliable flag there,
    and only there."""
    ds = make(modality_dropout=1.0)
    for v, info in zip(ds.videos("train"), ds.info("train"), strict=True):
        for m, span in (("audio", info.audio_dropout), ("video", info.video_dropout)):
            zero = (v.features[m] == 0).all(dim=1)
            assert _runs(zero) == [span]
            assert torch.equal(v.present[m], ~zero)
            assert torch.equal(v.flags[f"{m} unreliable"], zero)


def test_audio_and_video_feature_noise_are_independent_draws() -> None:
    """The i.i.d. feature noise of audio and video is uncorrelated (own random streams)."""
    quiet = make(num_train=2, audio_noise=0.0, video_noise=0.0)
    noisy = make(num_train=2, audio_noise=1.0, video_noise=1.0)
    for a, b in zip(quiet.videos("train"), noisy.videos("train"), strict=True):
        na = (b.features["audio"] - a.features["audio"]).double().flatten().numpy()
        nv = (b.features["video"] - a.features["video"]).double().flatten().numpy()
        assert abs(np.std(na) - 1.0) < 0.05 and abs(np.std(nv) - 1.0) < 0.05
        k = min(na.size, nv.size)
        assert abs(np.corrcoef(na[:k], nv[:k])[0, 1]) < 0.1


def test_no_reliability_span_starts_at_the_first_frame() -> None:
    """Spans start at frame >= 1 (a frozen span repeats the frame before it), even when the
    first gap is short; a frozen span repeats that frame."""
    ds = make(
        num_train=12,
        reliability_rate=0.9,
        reliability_span=0.1,
        reliability_kinds=["freeze"],
        **TINY,
    )
    spans = [s for info in ds.info("train") for s in info.reliability]
    assert spans and min(s.start for s in spans) >= 1


def test_either_modality_puts_about_half_of_the_spans_on_audio() -> None:
    """reliability_modality 'either': each span is audio or video with probability 1/2."""
    ds = make(num_train=12, reliability_rate=0.5, reliability_span=0.2)
    spans = [s.modality for info in ds.info("train") for s in info.reliability]
    assert len(spans) > 200
    assert 0.4 < spans.count("audio") / len(spans) < 0.6


def test_unlabeled_runs_are_at_least_five_frames_long() -> None:
    """Unlabeled frames come in runs of 5-30 frames (longer only where runs merge); a run
    cut by the end of the video may be shorter."""
    ds = make(num_train=40, unlabeled_rate=0.2)
    lengths = []
    for v in ds.videos("train"):
        for start, stop in _runs(~v.label_mask):
            if stop < v.num_frames:
                lengths.append(stop - start)
    assert len(lengths) > 50 and min(lengths) >= 5


def test_a_silent_span_keeps_the_lagged_room_noise() -> None:
    """With a lag, audio on a silence span is the room noise of the lagged timeline: where the
    lagged speech is off it equals the audio of the same dataset without silence spans."""
    knobs = {"audio_noise": 0.0, "lag_max": 9, "reliability_modality": "audio"}
    plain = make(**knobs)
    silent = make(
        **knobs, reliability_rate=0.4, reliability_span=1.0, reliability_kinds=["silence"]
    )
    checked = 0
    for a, b, info in zip(
        plain.videos("train"), silent.videos("train"), silent.info("train"), strict=True
    ):
        quiet = info.unreliable("audio") & (info.speech < 1e-6)
        if info.lag != 0:
            checked += int(quiet.sum())
        torch.testing.assert_close(b.features["audio"][quiet], a.features["audio"][quiet])
    assert checked > 100


def test_the_speaking_fraction_follows_speech_ratio() -> None:
    """speech_ratio 0.6: about 60 % of the frames carry speech, not all of them."""
    ds = make(num_train=24, min_frames=600, max_frames=1200, speech_ratio=0.6)
    infos = ds.info("train")
    talking = torch.cat([info.speech > 0.5 for info in infos]).float().mean()
    assert 0.4 < float(talking) < 0.8
    assert 0.4 < float(np.mean([info.speech_ratio for info in infos])) < 0.8


# --------------------------------------------------------------------------- perturbations


def test_noise_power_is_the_mean_over_dimensions_of_their_variances(registry):
    """Dimensions of unequal variance: the noise variance is mean_d var_t(x) / 10**(snr/10),
    the same in every dimension (not set by the loudest one)."""
    n = 50_000
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    x = (torch.randn(n, 3, generator=g, dtype=torch.float64) * scale + 2.0).float()
    v = Video("d", {"audio": x, "video": x}, torch.zeros(n, 2), torch.ones(n, dtype=torch.bool))
    out = build_perturbation("noise", {"modalities": ["audio"], "snr_db": 6.0}, 0, registry)(v)
    noise = (out.features["audio"].double() - x.double()).numpy()
    expected = np.var(x.double().numpy(), axis=0).mean() / 10**0.6
    assert np.var(noise, axis=0) == pytest.approx([expected] * 3, rel=0.03)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("modality_dropout", {"modalities": ["audio"], "p": 1.0, "fill": -5.0}),
        ("span_dropout", {"modalities": ["audio"], "rate": 0.3, "span": 10, "fill": -5.0}),
    ],
)
def test_dropped_frames_take_the_fill_value(name, params, registry):
    """A dropped frame holds `fill` in every feature, not 0."""
    v = make_video("f", n=200)
    out = build_perturbation(name, params, 0, registry)(v)
    dropped = (out.features["audio"] == -5.0).all(dim=1)
    expected = 200 if name == "modality_dropout" else 60
    assert int(dropped.sum()) == expected
    kept = ~dropped
    assert torch.equal(out.features["audio"][kept], v.features["audio"][kept])
    assert torch.equal(out.features["video"], v.features["video"])


def test_frame_drop_refuses_a_probability_of_one(registry):
    """frame_drop p must be below 1 (p = 1 would freeze the whole modality on frame 0)."""
    with pytest.raises(pydantic.ValidationError, match="less than 1"):
        build_perturbation("frame_drop", {"p": 1.0}, 0, registry)
    build_perturbation("frame_drop", {"p": 0.99}, 0, registry)


def test_a_video_generator_depends_on_the_seed_the_perturbation_and_the_video():
    """Two perturbations (or seeds, or videos) never share random draws; the same three
    give the same draws."""

    def draws(*key: object) -> torch.Tensor:
        return torch.rand(8, generator=video_generator(*key))

    assert torch.equal(draws(3, "noise", "v"), draws(3, "noise", "v"))
    for other in ((4, "noise", "v"), (3, "span_dropout", "v"), (3, "noise", "w")):
        assert not torch.equal(draws(3, "noise", "v"), draws(*other))


def test_a_perturbation_that_changes_the_length_or_returns_no_video_is_refused():
    """What a plugin perturbation returns is checked: a Video, of the same number of frames."""
    v = make_video("clip", n=50)

    def cut(video: Video, generator: torch.Generator) -> Video:
        return dataclasses.replace(
            video,
            features={m: x[:40] for m, x in video.features.items()},
            labels=video.labels[:40],
            label_mask=video.label_mask[:40],
        )

    with pytest.raises(DataError, match=r"'cut' changed video 'clip' from 50 to 40 frames"):
        AppliedPerturbation("cut", None, 0, cut)(v)
    with pytest.raises(DataError, match=r"'raw' returned dict, not a Video"):
        AppliedPerturbation("raw", None, 0, lambda video, g: dict(video.features))(v)


def test_an_unknown_modality_error_names_the_video(registry):
    """The error for a missing modality says which video lacks it."""
    with pytest.raises(DataError, match=r"shift: video 'clip7' has no modality 'speech'"):
        build_perturbation("shift", {"modality": "speech", "k": 1}, 0, registry)(
            make_video("clip7")
        )


# --------------------------------------------------------------------------- grids


def test_a_boolean_axis_value_names_its_point_in_lower_case():
    """Point names spell booleans as YAML does (true/false), like every other value."""
    assert point_tag({"data.params.flag": True, "training.seed": 0}) == "flag-true_seed-0"
    assert point_tag({"variant": "a", "model.gate.params.on": False}) == "a_on-false"


def test_an_empty_sweep_axis_is_refused_not_run_as_an_empty_grid(tmp_path, registry):
    """`sweep: {training.seed: []}` would make a grid of no points that 'succeeds'."""
    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1], "data.hop": []})
    with pytest.raises(RecipeError, match=r"sweep.data.hop: needs a non-empty list"):
        expand_grid(rc, registry=registry)


def test_a_point_that_failed_then_succeeded_keeps_no_error_in_grid_json(
    tmp_path, registry, monkeypatch
):
    """A rerun that finishes a failed point records it done, without the old error."""
    import fusionkit.studies.grid as grid_mod

    rc = grid_recipe(tmp_path, registry, {"training.seed": [0]})
    real = grid_mod._run_point

    def boom(recipe, threads, registry=None):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(grid_mod, "_run_point", boom)
    assert "simulated crash" in run_grid(rc, registry=registry)["runs"]["seed-0"]["error"]
    monkeypatch.setattr(grid_mod, "_run_point", real)
    run_grid(rc, registry=registry)
    saved = json.loads((tmp_path / "tiny" / "grid.json").read_text())
    assert saved["runs"]["seed-0"] == {"values": {"training.seed": 0}, "status": "done"}


def test_a_long_point_name_is_cut_to_100_characters_without_a_dangling_separator():
    """Point names are at most 100 characters and do not end in the '_' cut off after it."""
    tag = point_tag({"data.params.b": "y" * 97, "training.seed": 1})
    assert tag == "b-" + "y" * 97


def test_a_grid_of_more_than_max_points_is_refused_before_any_point_is_built(
    tmp_path, registry, monkeypatch
):
    """The point limit counts the product of the axes and refuses one point too many."""
    import fusionkit.studies.grid as grid_mod

    monkeypatch.setattr(grid_mod, "MAX_POINTS", 5)
    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1, 2], "data.hop": [32, 48]})
    with pytest.raises(RecipeError, match=r"sweep: 6 points; a grid has at most 5"):
        expand_grid(rc, registry=registry)
    rc = grid_recipe(tmp_path, registry, {"training.seed": [0, 1, 2, 3, 4]})
    assert len(expand_grid(rc, registry=registry)) == 5


def test_a_worker_reports_a_crashing_point_as_failed_with_its_traceback(monkeypatch):
    """In a -j N worker, a point that raises any exception is sent back as failed with the
    traceback (the worker keeps serving); it must not kill the worker and lose the error."""
    import fusionkit.studies.grid as grid_mod

    class Pipe:
        def __init__(self):
            self.inbox, self.sent = ["first", "second", None], []

        def recv(self):
            return self.inbox.pop(0)

        def send(self, outcome):
            self.sent.append(outcome)

    def crash(recipe, threads):
        if recipe == "first":
            raise ZeroDivisionError("plugin divided by zero")
        return {"splits": {}}

    monkeypatch.setattr(grid_mod, "_run_point", crash)
    pipe = Pipe()
    grid_mod._serve_points(pipe, 1)
    (status, error), second = pipe.sent
    assert status == "failed" and "ZeroDivisionError: plugin divided by zero" in error
    assert second == ("done", {"splits": {}})


def test_a_resumed_point_is_announced_with_the_threads_it_resumes_with(
    tmp_path, registry, monkeypatch
):
    """-j 2 on 4 cores: a point interrupted after its first epoch, which trained with 1 thread,
    resumes with 1 thread, and the grid's header says 1 (not the worker's share of 2)."""
    import fusionkit.engine.session as session_mod
    import fusionkit.studies.grid as grid_mod
    from fusionkit.engine.train import Trainer

    for mod in (grid_mod, session_mod):
        monkeypatch.setattr(mod, "available_cores", lambda: 4)
    raw = tiny_recipe(tmp_path / "runs", epochs=2)
    raw["data"]["params"]["videos"] = 1
    raw["sweep"] = {"training.seed": [0]}
    rc = validate_recipe(raw, "grid.yaml", registry)
    real = Trainer._train_epoch

    def stop_in_epoch_2(self, fwd, train, epoch, steps):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(self, fwd, train, epoch, steps)

    out = io.StringIO()
    try:
        monkeypatch.setattr(Trainer, "_train_epoch", stop_in_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            run_grid(rc, workers=4, registry=registry)  # a share of 1 thread
        monkeypatch.setattr(Trainer, "_train_epoch", real)
        console = Console(file=out, width=300, color_system=None)
        run_grid(rc, workers=2, console=console, registry=registry)
    finally:
        torch.set_num_threads(1)
    assert "1 to run with 2 worker(s), 1 thread(s) each" in out.getvalue()
    metrics = json.loads((tmp_path / "runs" / "tiny" / "seed-0" / "metrics.json").read_text())
    assert metrics["cpu_threads"] == 1


def test_a_point_that_fails_before_its_first_epoch_leaves_no_run_folder(
    tmp_path, registry, monkeypatch
):
    """A point that crashes in its first epoch is recorded failed and its run folder (no
    finished epoch) is removed, so it is neither reported nor mistaken for an earlier run."""
    from fusionkit.engine.train import Trainer

    def crash(self, fwd, train, epoch, steps):
        raise RuntimeError("plugin crashed in epoch 1")

    monkeypatch.setattr(Trainer, "_train_epoch", crash)
    rc = grid_recipe(tmp_path, registry, {"training.seed": [0]})
    record = run_grid(rc, registry=registry)
    assert record["runs"]["seed-0"]["status"] == "failed"
    assert "plugin crashed in epoch 1" in record["runs"]["seed-0"]["error"]
    assert not (tmp_path / "tiny" / "seed-0").exists()


def test_folders_that_are_not_runs_are_not_listed_as_stale(tmp_path, registry):
    """Only run folders that are no longer points count as stale (not e.g. a figures folder)."""
    rc = grid_recipe(tmp_path, registry, {"training.seed": [0]})
    run_grid(rc, registry=registry)
    (tmp_path / "tiny" / "figures").mkdir()
    assert run_grid(rc, registry=registry)["stale"] == []


def test_a_worker_killed_by_sigkill_is_reported_as_maybe_out_of_memory():
    """A worker that died names its signal, with the out-of-memory hint for SIGKILL only."""
    from fusionkit.studies.grid import _signal_name

    assert _signal_name(-9) == "SIGKILL (out of memory?)"
    assert _signal_name(-15) == "SIGTERM"
    assert _signal_name(1) == "exit status 1"
