"""Guards on core rules whose breakage gave wrong numbers or files without any error:
override order and repeats, which recipe keys count as training settings, streaming with a
normaliser or a head that is not frame-local."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from fusionkit.core.errors import CheckpointError, DataError
from fusionkit.core.overrides import apply_overrides, parse_overrides
from fusionkit.core.recipe import PerturbationSpec, validate_recipe
from fusionkit.engine.checkpoint import TrainState, load_state, save_state
from fusionkit.engine.data import Normalizer
from fusionkit.engine.distributed import Dist
from fusionkit.engine.perturb import PerturbedDataset, build_perturbation
from fusionkit.engine.predict import RunPredictions, submission_rows, write_submission
from fusionkit.engine.runs import BEST_FILE, STATE_FILE, RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.streaming import StreamingPredictor
from fusionkit.engine.train import Trainer
from fusionkit.studies.grid import expand_grid, run_grid
from tests.conftest import (
    TinyDataset,
    TinyParams,
    assert_streams_trailing_windows,
    eval_model,
    stream_frames,
    tiny_recipe,
)

DIMS = {"audio": 6, "video": 5}


# ----------------------------------------------------------------------------- overrides


def test_a_component_name_is_set_before_its_params_at_the_same_depth():
    """``model.gate.name=tagf 'model.gate.params={temperature: 0.5}'``: both paths are three
    deep. If the new name were applied after the params, switching the component would drop
    the params the same command just set, and the run would train with the defaults."""
    raw = {"model": {"gate": {"name": "last", "params": {}}}}
    want = {"name": "tagf", "params": {"temperature": 0.5}}
    for items in (
        {"model.gate.params": {"temperature": 0.5}, "model.gate.name": "tagf"},
        {"model.gate.name": "tagf", "model.gate.params": {"temperature": 0.5}},
    ):
        assert apply_overrides(raw, items)["model"]["gate"] == want
    cli = ["model.gate.params={temperature: 0.5}", "model.gate.name=tagf"]
    assert apply_overrides(raw, cli)["model"]["gate"] == want


def test_a_path_given_twice_on_the_command_line_keeps_its_last_value():
    """``training.lr=0.1 ... training.lr=0.002``: the later item is the one the user meant
    (as with any command-line option); keeping the first trains with the other rate."""
    items = parse_overrides(["training.lr=0.1", "training.epochs=3", "training.lr=0.002"])
    assert items == {"training.lr": 0.002, "training.epochs": 3}
    raw = apply_overrides({"training": {"lr": 1.0}}, ["training.lr=0.1", "training.lr=0.002"])
    assert raw["training"]["lr"] == 0.002


def test_grid_points_do_not_share_the_mappings_their_overrides_set(tmp_path, registry):
    """A variant that sets a whole mapping (``model.gate: {name: tagf}``) crossed with a sweep
    inside it: each point gets its own copy. Shared, the later point's value would be
    written into the earlier point's recipe mapping and into the grid's ``variants`` (which
    grid.json records), so the files would name another temperature than the one trained."""

    raw = tiny_recipe(tmp_path)
    raw["variants"] = {"t": {"model.gate": {"name": "tagf"}}}
    raw["sweep"] = {"model.gate.params.temperature": [0.1, 0.5]}
    rc = validate_recipe(raw, "grid.yaml", registry)
    points = expand_grid(rc, registry)
    assert [p.tag for p in points] == ["t_temperature-0.1", "t_temperature-0.5"]
    for p, want in zip(points, (0.1, 0.5), strict=True):
        assert p.recipe.raw["model"]["gate"] == {"name": "tagf", "params": {"temperature": want}}
        assert p.recipe.model.gate.params.temperature == want
    assert rc.variants == {"t": {"model.gate": {"name": "tagf"}}}


# ----------------------------------------------------------------------------- training view


def _sha(raw: dict, registry) -> str:
    return validate_recipe(raw, "tiny", registry).training_sha256()


def test_evaluation_settings_count_as_training_settings_but_robustness_does_not(tmp_path, registry):
    """The training hash decides whether a run (or a grid point) made by one recipe may be
    resumed or counted as done under another. Only the output location, the grid axes, the
    description, plugin strictness, the robustness sweeps and the speed-only CUDA-graphs switch
    may change without changing it (docs/recipes.md). If evaluation settings were left out, a
    grid re-run with other evaluation splits would keep the old points as done, without the
    new split's numbers."""
    base = tiny_recipe(tmp_path)
    rc = validate_recipe(base, "tiny", registry)
    dumped = rc.model_dump(mode="json")
    want = {k: v for k, v in dumped.items() if k not in ("output", "sweep", "variants")}
    want = {k: v for k, v in want.items() if k not in ("description", "strict_plugins")}
    want["evaluation"] = {k: v for k, v in dumped["evaluation"].items() if k != "robustness"}
    want["training"] = {k: v for k, v in dumped["training"].items() if k != "cuda_graphs"}
    assert rc.training_view() == want
    text = json.dumps(want, sort_keys=True, separators=(",", ":"))
    assert rc.training_sha256() == hashlib.sha256(text.encode()).hexdigest()

    same = _sha(base, registry)
    for path, value in (
        ("evaluation.splits", ["val"]),
        ("evaluation.batch_size", 3),
        ("evaluation.save_predictions", False),
        ("training.lr", 0.001),
        ("data.params.seed", 1),
    ):
        assert _sha(apply_overrides(base, {path: value}), registry) != same, path
    robust = [{"perturbation": "noise", "axis": "snr_db", "values": [0]}]
    for path, value in (
        ("evaluation.robustness", robust),
        ("output.dir", str(tmp_path / "elsewhere")),
        ("description", "other words"),
        ("strict_plugins", True),
    ):
        assert _sha(apply_overrides(base, {path: value}), registry) == same, path


# ----------------------------------------------------------------------------- streaming


def _frames(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=g) * 3 + 2 for m, d in DIMS.items()}


def test_streaming_z_scores_every_pushed_frame_with_the_run_statistics(tmp_path, registry):
    """A run trained on z-scored features must be streamed z-scored too: a frame-by-frame
    model (``linear`` encoders, concat, last, regression) gives, at frame t, the model on
    ``(x - mean) / std`` read at t. Skipping the normaliser feeds raw features to a model
    trained on standardised ones and streams other numbers without any error."""
    model = eval_model(tmp_path, registry)
    n = 30
    xs = _frames(n)
    g = torch.Generator().manual_seed(5)
    mean = {m: torch.randn(d, generator=g) for m, d in DIMS.items()}
    std = {m: torch.rand(d, generator=g) + 0.5 for m, d in DIMS.items()}
    sp = StreamingPredictor(model, DIMS, context=8, normalizer=Normalizer(mean, std))
    online = stream_frames(sp, xs, n)
    z = {m: ((x - mean[m]) / std[m])[None] for m, x in xs.items()}
    with torch.no_grad():
        offline = model(z, torch.ones(1, n, dtype=torch.bool)).pred[0]
    torch.testing.assert_close(online, offline, atol=1e-5, rtol=1e-5)


def test_a_head_that_is_not_frame_local_streams_the_newest_frame(tmp_path, registry):
    """When no component after the encoders is frame-local (a plugin head without
    ``frame_local``), the whole trailing window goes through the head and the prediction for
    frame t is the head's output at the window's last frame (module docstring). Reading any
    other position of that window returns the prediction of an older frame."""
    model = eval_model(tmp_path, registry, fusion={"name": "rjca", "params": {"recursions": 2}})
    for part in (model.fusion, model.gate, model.head):
        part.frame_local = False
    n, c = 24, 8
    xs = _frames(n, seed=1)
    sp = StreamingPredictor(model, DIMS, context=c)
    assert sp.local_from == 3
    online = stream_frames(sp, xs, n)
    assert_streams_trailing_windows(model, xs, online, c, (0, 3, c - 1, c, n - 1))


# ----------------------------------------------------------------------------- resume


def test_the_training_state_brings_back_the_scheduler_and_optimizer_as_they_were(tmp_path):
    """Resume is exact only if the plateau scheduler comes back with its best score and bad
    epoch count: a fresh one takes the first resumed epoch as an improvement and keeps a
    learning rate that the uninterrupted run would have cut (or cuts it later)."""

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "max", factor=0.5, patience=1)
        return model, opt, sched

    model, opt, sched = fresh()
    for score in (0.5, 0.7, 0.6):  # best 0.7, one bad epoch so far
        opt.zero_grad()
        model(torch.ones(4, 3)).pow(2).sum().backward()
        opt.step()
        sched.step(score)
    rng = {"cpu": torch.get_rng_state()}
    save_state(tmp_path / "s.safetensors", model, opt, sched, TrainState(recipe_sha256="x"), rng)

    model2, opt2, sched2 = fresh()
    _, rng2 = load_state(tmp_path / "s.safetensors", model2, opt2, sched2)
    assert torch.equal(rng2["cpu"], rng["cpu"])
    for a, b in zip(opt.state.values(), opt2.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    lrs = []
    for s in (sched, sched2):
        s.step(0.65)  # the second bad epoch in a row: patience 1 is exceeded, lr halves
        lrs.append(s.optimizer.param_groups[0]["lr"])
    assert lrs == [0.05, 0.05]


def test_an_interrupted_grid_point_continues_after_its_last_finished_epoch(
    tmp_path, registry, monkeypatch
):
    """Re-running a grid resumes an interrupted point from its last finished epoch
    (docs/ablations.md) with the numbers of an uninterrupted grid; retraining it from epoch 1
    would repeat finished work (and, with a wall-clock limit, never finish long points)."""

    def grid(where):
        raw = tiny_recipe(where, epochs=3)
        raw["sweep"] = {"training.seed": [0]}
        return validate_recipe(raw, "grid.yaml", registry)

    whole = run_grid(grid(tmp_path / "whole"), registry=registry)
    real, trained, stopped = Trainer._train_epoch, [], []

    def spy(self, fwd, train, epoch, steps):
        trained.append(epoch)
        if trained == [1, 2] and not stopped:
            stopped.append(epoch)
            raise KeyboardInterrupt
        return real(self, fwd, train, epoch, steps)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    rc = grid(tmp_path / "cut")
    try:
        run_grid(rc, registry=registry)
    except KeyboardInterrupt:
        pass
    assert trained == [1, 2]
    trained.clear()
    record = run_grid(rc, registry=registry)
    assert trained == [2, 3]
    assert record["runs"]["seed-0"]["status"] == "done"
    out = json.loads((tmp_path / "cut/tiny/seed-0/metrics.json").read_text())
    ref = json.loads((tmp_path / "whole/tiny/seed-0/metrics.json").read_text())
    assert out["splits"] == ref["splits"] and whole["runs"]["seed-0"]["status"] == "done"


# ----------------------------------------------------------------------------- perturbations


def test_several_perturbations_apply_in_the_listed_order_to_every_split_they_name(registry):
    """``PerturbedDataset`` applies its perturbations in order (a shift then noise is not
    noise then a shift: the noise would move with the frames) and each split gets its own
    videos; a cache shared between splits would hand the test split's videos to val."""

    def built(name, params, seed):
        spec = PerturbationSpec.model_validate(
            {"name": name, "params": params, "seed": seed}, context={"registry": registry}
        )
        return build_perturbation(spec, registry)

    base = TinyDataset(TinyParams())
    shift = built("shift", {"modality": "video", "k": 4}, 0)
    noise = built("noise", {"snr_db": 0.0}, 1)
    data = PerturbedDataset(base, [shift, noise])
    for split in ("val", "test"):
        got = data.videos(split)
        assert [v.name for v in got] == [v.name for v in base.videos(split)]
        for v, clean in zip(got, base.videos(split), strict=True):
            want, other = noise(shift(clean)), shift(noise(clean))
            assert not torch.equal(want.features["video"], other.features["video"])
            for m in DIMS:
                assert torch.equal(v.features[m], want.features[m])


def test_a_fixed_length_fusion_streams_its_first_frames_with_the_padding_masked(tmp_path, registry):
    """Until ``length`` frames have arrived, a fixed-length fusion (``rjca`` faithful) sees the
    frames so far padded at the end, and the padding is masked (module docstring): frame t
    then equals the model on that padded window with a mask of t + 1 valid frames, read at
    t. Unmasked padding lets the zero rows into the temporal gate's recurrence
    (``tagf_temporal``), which moves every early frame by up to ~1e-4."""
    rjca = {"name": "rjca", "params": {"mode": "faithful", "length": 8, "recursions": 2}}
    model = eval_model(tmp_path, registry, window=8, fusion=rjca, gate={"name": "tagf_temporal"})
    n, c = 12, 8
    xs = _frames(n, seed=2)
    sp = StreamingPredictor(model, DIMS, context=30)
    assert sp.context == c
    online = stream_frames(sp, xs, n)
    with torch.no_grad():
        for t in range(c - 1):
            win = {
                m: torch.cat([x[: t + 1], x.new_zeros(c - t - 1, x.shape[1])])[None]
                for m, x in xs.items()
            }
            mask = (torch.arange(c) <= t)[None]
            ref = model(win, mask).pred[0, t]
            torch.testing.assert_close(online[t], ref, atol=1e-6, rtol=0)
        for t in (c - 1, n - 1):
            win = {m: x[t - c + 1 : t + 1][None] for m, x in xs.items()}
            ref = model(win, torch.ones(1, c, dtype=torch.bool)).pred[0, -1]
            torch.testing.assert_close(online[t], ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- predict CSV


def _run(name, targets, ids, labels="L", rows=None):

    ids = torch.tensor(ids)
    pred = torch.stack([ids * 0.01 + j for j in range(len(targets))], 1).float()
    return RunPredictions(
        Path(name), targets, ("valence", "arousal"), {"v1": (ids, pred)}, rows, {"v1": labels}
    )


def test_a_per_frame_file_names_each_frame_by_its_own_id_and_fills_a_missing_target(tmp_path):
    """Without official rows the file has one ``video,frame,<targets>`` line per frame, the
    frame column being the frame's id (a dataset may skip ids), and ``--missing-value x``
    writes x in a column no run predicts: another frame number pairs every value with the
    wrong frame, and another fill value changes the numbers a scorer reads."""

    out = tmp_path / "p.csv"
    write_submission([_run("val", ("valence",), [0, 1, 2, 7])], out, missing_value=-5.0)
    lines = out.read_text().splitlines()
    assert lines == [
        "video,frame,valence,arousal",
        "v1,0,0.000000,-5.000000",
        "v1,1,0.010000,-5.000000",
        "v1,2,0.020000,-5.000000",
        "v1,7,0.070000,-5.000000",
    ]


def test_runs_whose_labels_differ_are_not_merged(tmp_path):
    """Two runs that saw the same videos and frame ids but other labels read other data (e.g.
    another dataset seed); merging their columns would pair predictions of different data."""

    runs = [_run("val", ("valence",), [0, 1], "A"), _run("aro", ("arousal",), [0, 1], "B")]
    with pytest.raises(DataError, match="other labels"):
        write_submission(runs, tmp_path / "p.csv")


# ----------------------------------------------------------------------------- sharding


def test_every_rank_runs_the_same_number_of_steps_and_every_window_is_trained(tmp_path):
    """Under torchrun each rank trains ``windows_per_rank`` windows of its shard per epoch
    (the step count comes from it). Together the ranks cover every window of the epoch's
    permutation, and only its first ``ceil(n / N) * N - n`` windows twice (docs/recipes.md).
    A step count from ``n // N`` drops the last windows of every rank's shard."""

    for n in (10, 11, 13):
        for world in (2, 3, 4):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
            shards = [Dist(rank=r, world_size=world).shard(perm) for r in range(world)]
            per_rank = -(-n // world)
            for r, shard in enumerate(shards):
                assert Dist(rank=r, world_size=world).windows_per_rank(n) == per_rank
                assert len(shard) == per_rank
            counts = Counter(int(i) for s in shards for i in s)
            assert set(counts) == set(range(n))
            twice = {i for i, c in counts.items() if c == 2}
            assert twice == {int(i) for i in perm[: per_rank * world - n]}  # the first ones
            assert max(counts.values()) <= 2


def test_each_rank_resumes_with_its_own_rng_state():
    """Rank 0 saves every rank's RNG state, suffixed by rank; on resume each rank must take
    its own back. Taking rank 0's on every rank gives all ranks one dropout stream, so the
    resumed run differs from the uninterrupted one (docs/recipes.md: resume is exact)."""

    saved = {f"cpu.{r}": torch.full((3,), r, dtype=torch.uint8) for r in range(3)}
    saved["cuda.2"] = torch.full((2,), 9, dtype=torch.uint8)
    for rank in range(3):
        own = Dist(rank=rank, world_size=3).own_rng(saved)
        assert torch.equal(own["cpu"], torch.full((3,), rank, dtype=torch.uint8))
        assert ("cuda" in own) == (rank == 2)
    single = {"cpu": torch.zeros(3, dtype=torch.uint8)}
    assert Dist().own_rng(single) is single


def test_an_official_row_before_the_first_predicted_frame_gets_the_first_prediction():
    """``submission_rows``: each listed frame gets the row of the last frame id <= it,
    clamped to the video; a listed frame before the first id (a dataset whose ids start
    later) gets the first prediction, not the video's last one by a wrapped index."""

    ids = [3, 4, 6, 9]
    pred = torch.tensor([30.0, 40.0, 60.0, 90.0])
    frames = [0, 2, 3, 5, 6, 8, 9, 12]
    want = [pred[max([0] + [i for i, f in enumerate(ids) if f <= k])].item() for k in frames]
    assert submission_rows(torch.tensor(ids), pred, frames).tolist() == want
    assert want[:2] == [30.0, 30.0]


def test_a_training_state_of_another_recipe_is_not_resumed(tmp_path, registry):
    """The training state records the hash of the recipe that wrote it. A run folder whose
    state (and best weights) come from a run of another recipe (files copied between runs)
    must be refused on resume: continuing would train the other run's weights and optimizer
    under this recipe and report the mix as this recipe's result."""

    def stop(epoch, record):
        raise KeyboardInterrupt

    runs = []
    for name, lr in (("a", 3e-3), ("b", 1e-3)):
        rc = validate_recipe(tiny_recipe(tmp_path / name, epochs=2, lr=lr), "tiny", registry)
        run = RunDir.create(rc, registry)
        with pytest.raises(KeyboardInterrupt):
            Trainer(build_session(rc, registry), run, on_epoch_end=stop).fit()
        run.unlock()
        runs.append((rc, run.path))
    (_, a), (rc_b, b) = runs
    for f in (STATE_FILE, BEST_FILE):
        shutil.copyfile(a / f, b / f)
    again = RunDir.open(b).lock()
    with pytest.raises(CheckpointError, match="different recipe"):
        Trainer(build_session(rc_b, registry), again).fit(resume=True)
