"""Guards for the training and evaluation path where a wrong number would come out with exit
0: gradient clipping, the plateau schedule and its floor, the steps and window order of an
epoch, the mean training loss, which weights are evaluated, the history columns, the
predictions files and the precision a run records. Each test compares with a computation of
its own (numpy CCC, windows counted from the video lengths), not with the code's output."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import fusionkit.engine.train as train_mod
from fusionkit.engine.data import FrameStore
from fusionkit.engine.evaluate import predict
from fusionkit.engine.metrics import ccc_loss
from fusionkit.engine.runs import BEST_FILE, METRICS_FILE
from fusionkit.engine.train import Trainer
from tests.conftest import TinyDataset, TinyParams, np_ccc, tiny_recipe
from tests.test_train import _padded_trainer
from tests.test_training_rules import scripted_validation, start

WINDOW, HOP, BATCH = 64, 48, 4  # tiny_recipe's


def windows_by_hand(lengths) -> int:
    """Windows of ``WINDOW`` frames every ``HOP`` frames, the last one end-aligned."""
    return sum(1 if n <= WINDOW else math.ceil((n - WINDOW) / HOP) + 1 for n in lengths)


def train_lengths() -> list[int]:
    return [v.num_frames for v in TinyDataset(TinyParams()).videos("train")]


def grads_after_one_step(tmp_path, registry, **training):
    tr, store, windows = _padded_trainer(tmp_path, registry, "concat", **training)
    torch.manual_seed(7)  # the same dropout masks in every call
    tr.optimizer.zero_grad(set_to_none=True)
    tr.backward_step(tr.model, store, windows)
    return [p.grad.clone() for p in tr.model.parameters()]


def test_gradient_clipping_scales_the_gradient_down_to_the_clip_norm(tmp_path, registry):
    """``training.grad_clip`` rescales the whole gradient to that L2 norm (when larger)."""
    free = grads_after_one_step(tmp_path / "a", registry, grad_clip=None)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in free))
    clip = norm / 4
    clipped = grads_after_one_step(tmp_path / "b", registry, grad_clip=clip)
    for g, c in zip(free, clipped, strict=True):
        torch.testing.assert_close(c, g * (clip / norm), rtol=1e-4, atol=1e-9)
    loose = grads_after_one_step(tmp_path / "c", registry, grad_clip=norm * 2)
    for g, c in zip(free, loose, strict=True):
        torch.testing.assert_close(c, g)


def test_the_plateau_schedule_cuts_the_rate_by_its_factor_down_to_min_lr(
    tmp_path, registry, monkeypatch
):
    """Each epoch without a gain in validation CCC (patience 0) multiplies the rate by
    ``plateau.factor``, never below ``plateau.min_lr``; a gain keeps it."""
    scores = [0.5, 0.4, 0.45, 0.3, 0.2, 0.6, 0.7]
    scripted_validation(monkeypatch, scores)
    lr, factor, floor = 0.008, 0.25, 0.0004
    plateau = {"patience": 0, "factor": factor, "min_lr": floor}
    _, run, trainer = start(
        tmp_path, registry, epochs=len(scores), lr=lr, early_stopping=50, plateau=plateau
    )
    result = trainer.fit()
    run.unlock()
    want, rate, best = [], lr, -math.inf
    for s in scores:
        want.append(rate)
        if s > best:
            best = s
        else:
            rate = max(rate * factor, floor)
    assert [h["lr"] for h in result.history] == pytest.approx(want, rel=1e-12)
    assert min(want) == floor  # the floor was reached


def test_an_epoch_trains_every_window_once_in_a_new_order_and_logs_its_mean_loss(
    tmp_path, registry, monkeypatch
):
    """One epoch is ``ceil(windows / batch_size)`` steps over every training window once (a
    new order each epoch), in training mode, each step from a fresh gradient; its
    ``train_loss`` is the mean of the steps' losses."""
    calls = []
    backward_step = Trainer.backward_step

    def spy(self, fwd, store, windows):
        fresh = all(p.grad is None for p in self.model.parameters())
        loss = backward_step(self, fwd, store, windows)
        calls.append((windows.tolist(), float(loss), self.model.training, fresh))
        return loss

    monkeypatch.setattr(Trainer, "backward_step", spy)
    _, run, trainer = start(tmp_path, registry, epochs=2, early_stopping=10, batch_size=5)
    result = trainer.fit()
    run.unlock()
    n = windows_by_hand(train_lengths())
    steps = math.ceil(n / 5)
    assert n % 5 and len(calls) == 2 * steps  # a last, partial batch too
    orders = []
    for e in range(2):
        epoch = calls[e * steps : (e + 1) * steps]
        orders.append([w for c in epoch for w in c[0]])
        assert sorted(orders[-1]) == list(range(n))
        mean = np.mean([c[1] for c in epoch])
        assert result.history[e]["train_loss"] == pytest.approx(mean, rel=1e-6)
    assert orders[0] != orders[1]
    assert all(c[2] for c in calls)  # dropout on, also after the epoch-1 validation
    assert all(c[3] for c in calls)  # no gradient carried over from the step before


def test_a_non_finite_loss_names_the_first_bad_step_of_the_epoch(tmp_path, registry, monkeypatch):
    """The divergence message names the epoch's first step whose loss was not finite."""
    count = [0]

    def loss(pred, target, mask):
        count[0] += 1
        out = ccc_loss(pred, target, mask)
        return out * math.nan if count[0] in (2, 3) else out

    monkeypatch.setattr(train_mod, "ccc_loss", loss)
    _, run, trainer = start(tmp_path, registry, epochs=1)
    steps = math.ceil(windows_by_hand(train_lengths()) / BATCH)
    try:
        with pytest.raises(train_mod.Diverged) as err:
            trainer.fit()
    finally:
        run.unlock()
    assert f"loss is not finite at epoch 1, step 2 of {steps};" in str(err.value)


def scripted_scores(monkeypatch, scores):
    """Each epoch's validation: (valence, arousal) CCC from ``scores`` (training is real)."""
    it = iter(scores)

    def validate(self, val, epoch):
        v, a = next(it)
        return {"ccc_mean": (v + a) / 2, "ccc_valence": v, "ccc_arousal": a}

    monkeypatch.setattr(Trainer, "_validate", validate)


def test_the_best_epochs_weights_are_evaluated_and_its_scores_recorded(
    tmp_path, registry, monkeypatch
):
    """After training, the weights of the best epoch (not the last) are saved, evaluated on
    every split and written to the predictions files; history.csv and metrics.json keep
    each epoch's per-target validation CCC and the best epoch's mean."""
    scores = [(0.5, 0.3), (0.8, 0.6), (0.2, 0.1)]
    scripted_scores(monkeypatch, scores)
    _, run, trainer = start(tmp_path, registry, epochs=3, early_stopping=10)
    snap = {}
    trainer.on_epoch_end = lambda e, _: snap.__setitem__(
        e, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    )
    trainer.fit()
    run.unlock()
    stored = json.loads((run / METRICS_FILE).read_text())
    assert stored["best_epoch"] == 2
    assert stored["best_val_ccc_mean"] == pytest.approx(0.7)
    assert stored["train_seconds"] == pytest.approx(sum(h["seconds"] for h in stored["history"]))
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    for row, (v, a) in zip(rows, scores, strict=True):
        assert float(row["val_ccc_valence"]) == pytest.approx(v)
        assert float(row["val_ccc_arousal"]) == pytest.approx(a)
        assert float(row["val_ccc_mean"]) == pytest.approx((v + a) / 2)
    best = load_file(str(run / BEST_FILE))
    assert all(torch.equal(best[k], snap[2][k]) for k in snap[2])
    # the test split, predicted here with the epoch-2 weights and scored with numpy
    trainer.model.load_state_dict(snap[2])
    videos = TinyDataset(TinyParams()).videos("test")
    saved = load_file(str(run / "predictions/test.safetensors"))
    preds, targets = [], []
    ref = predict(trainer.model, trainer.session.store("test"), batch_size=8).pred
    offsets = np.cumsum([0] + [v.num_frames for v in videos])
    for i, v in enumerate(videos):
        keep = v.label_mask.numpy()
        assert np.array_equal(saved[f"label_mask/{v.name}"].numpy().astype(bool), keep)
        want = torch.where(v.label_mask[:, None], v.labels, 0.0)
        torch.testing.assert_close(saved[f"target/{v.name}"], want)
        torch.testing.assert_close(saved[f"pred/{v.name}"], ref[offsets[i] : offsets[i + 1]])
        preds.append(saved[f"pred/{v.name}"].numpy()[keep])
        targets.append(v.labels.numpy()[keep])
    pred, target = np.concatenate(preds), np.concatenate(targets)
    test = stored["splits"]["test"]
    assert test["n_frames"] == sum(int(v.label_mask.sum()) for v in videos)
    for j, t in enumerate(("valence", "arousal")):
        assert test[f"ccc_{t}"] == pytest.approx(np_ccc(pred[:, j], target[:, j]), rel=1e-6)
        rmse = float(np.sqrt(((pred[:, j] - target[:, j]) ** 2).mean()))
        assert test[f"rmse_{t}"] == pytest.approx(rmse, rel=1e-6)
        assert test[f"pcc_{t}"] == pytest.approx(np.corrcoef(pred[:, j], target[:, j])[0, 1])
    assert test["ccc_mean"] == pytest.approx((test["ccc_valence"] + test["ccc_arousal"]) / 2)


@pytest.mark.parametrize(("precision", "autocast"), [("bf16", True), ("fp32", False)])
def test_a_run_trains_in_the_precision_it_records(tmp_path, registry, precision, autocast):
    """``training.precision: bf16`` trains under bf16 autocast (on the CPU too) and
    metrics.json says ``bf16``; ``fp32`` neither."""
    _, run, trainer = start(tmp_path, registry, epochs=1, precision=precision)
    seen = []
    trainer.model.register_forward_pre_hook(
        lambda m, _: seen.append(torch.is_autocast_enabled("cpu")) if m.training else None
    )
    trainer.fit()
    run.unlock()
    assert seen and set(seen) == {autocast}
    assert json.loads((run / METRICS_FILE).read_text())["precision"] == precision


def test_the_results_table_puts_each_number_under_its_own_header():
    """The table printed at the end of a run (and by eval) shows each split's CCC per target,
    the CCC mean, PCC and RMSE under their own headers, and the frames scored."""
    from rich.console import Console

    from fusionkit.cli._common import metrics_table

    names = ["ccc_valence", "ccc_arousal", "ccc_mean", "pcc_valence", "pcc_arousal"]
    names += ["rmse_valence", "rmse_arousal"]
    splits = {
        s: {k: round(0.1 * (i + 1) + 0.01 * j, 4) for i, k in enumerate(names)} | {"n_frames": n}
        for j, (s, n) in enumerate([("val", 321), ("test", 1234)])
    }
    con = Console(width=240, record=True)
    con.print(metrics_table("tiny", splits, ["valence", "arousal"]))
    lines = con.export_text().splitlines()

    def cells(line):
        return [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]

    header = cells(next(line for line in lines if "split" in line))
    assert header == ["split", "CCC-V", "CCC-A", "CCC-mean", "PCC-V", "PCC-A", "RMSE-V", "RMSE-A"]
    for split, m in splits.items():
        row = cells(next(line for line in lines if cells(line)[:1] == [split]))
        assert row[1:] == [f"{m[k]:.4f}" for k in names]
    assert "frames: val 321, test 1234" in " ".join(lines)


def test_a_run_says_where_it_trains_and_ends_with_its_best_epoch_and_folder(
    tmp_path, monkeypatch, cli
):
    """``fusionkit run`` prints the run and its folder first, and at the end the results
    titled with the best epoch (not the last) and the run directory; exit 0. A warning on
    the way is one line on standard error."""
    scripted_scores(monkeypatch, [(0.6, 0.4), (0.2, 0.1)])
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "runs", epochs=2)))
    threads = torch.get_num_threads()
    try:  # more threads than cores: a warning, and the cores are used
        code, out, err = cli("run", recipe, "-q", "training.num_threads=1024")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert err.startswith("warning: training.num_threads=1024 exceeds the ")
    assert "warnings.warn" not in err and ".py" not in err  # no source excerpt
    run = tmp_path / "runs" / "tiny"
    lines = out.splitlines()
    assert lines[0] == f"fusionkit run tiny -> {run}"
    assert "tiny (best epoch 1)" in out
    assert lines[-1] == f"run directory: {run}"


def test_every_video_is_cut_into_windows_every_hop_frames_the_last_one_end_aligned():
    """``data.hop`` spaces the windows of each video; the last window ends on its last frame,
    and each window holds the video's own frames."""
    videos = TinyDataset(TinyParams()).videos("train")
    store = FrameStore(videos, ["audio", "video"], [0, 1], WINDOW, HOP)
    assert store.num_windows == windows_by_hand(v.num_frames for v in videos)
    for i, v in enumerate(videos):
        n = v.num_frames
        k = math.ceil((n - WINDOW) / HOP) + 1
        idx = (store.win_video == i).nonzero().flatten()
        assert store.win_start[idx].tolist() == [j * HOP for j in range(k - 1)] + [n - WINDOW]
        batch = store.batch(idx)
        assert batch.mask.all()
        for b, s in enumerate(store.win_start[idx].tolist()):
            assert torch.equal(batch.inputs["audio"][b], v.features["audio"][s : s + WINDOW])


def test_frame_gate_weights_are_averaged_over_the_windows_that_cover_the_frame(tmp_path, registry):
    """A frame's prediction and gate weights (saved in the predictions files) are the mean
    over the windows that cover it, every window of the split included (here the last batch
    holds one window): softmax weights still sum to 1 on frames two windows cover."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.session import build_session

    raw = tiny_recipe(tmp_path)
    raw["model"]["fusion"] = {"name": "modality_stack", "params": {"dim": 8}}
    raw["model"]["gate"] = {"name": "moe_gate", "params": {"hidden": 8, "reliability_hidden": 8}}
    session = build_session(validate_recipe(raw, "tiny", registry), registry)
    store = session.store("test")
    out = predict(session.model, store, batch_size=store.num_windows - 1)
    assert len(store.win_start) > len(store.names)  # windows overlap
    ((stream, weights),) = out.gate_weights.items()
    assert weights.shape[0] == store.num_frames and weights.shape[1] == 2
    torch.testing.assert_close(weights.sum(-1), torch.ones(store.num_frames))
    # by hand: each window alone through the model, summed per frame, divided by the count
    videos = TinyDataset(TinyParams()).videos("test")
    first = np.cumsum([0] + [v.num_frames for v in videos])
    acc, gates = torch.zeros(store.num_frames, 2), torch.zeros(store.num_frames, 2)
    cnt = torch.zeros(store.num_frames, 1)
    with torch.no_grad():
        for i, v in enumerate(videos):
            n = v.num_frames
            starts = [j * HOP for j in range(math.ceil((n - WINDOW) / HOP))] + [n - WINDOW]
            for s in starts:
                x = {m: v.features[m][s : s + WINDOW][None] for m in ("audio", "video")}
                o = session.model(x, torch.ones(1, WINDOW, dtype=torch.bool))
                lo = int(first[i]) + s
                acc[lo : lo + WINDOW] += o.pred[0]
                gates[lo : lo + WINDOW] += o.gate_weights[stream][0]
                cnt[lo : lo + WINDOW] += 1
    torch.testing.assert_close(out.pred, acc / cnt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, gates / cnt, atol=1e-5, rtol=1e-5)


def test_non_finite_validation_predictions_stop_training_before_a_best_epoch_is_picked(
    tmp_path, registry
):
    """A model whose validation predictions are not finite stops with the epoch named; no
    best weights are chosen on a NaN score."""
    import dataclasses

    _, run, trainer = start(tmp_path, registry, epochs=2)
    trainer.model.register_forward_hook(
        lambda m, _, out: None if m.training else dataclasses.replace(out, pred=out.pred * math.nan)
    )
    try:
        with pytest.raises(
            train_mod.Diverged, match="validation predictions are not finite after epoch 1"
        ):
            trainer.fit()
    finally:
        run.unlock()
    assert not (run / BEST_FILE).exists()


def test_split_metrics_are_computed_in_double_precision():
    """CCC, PCC and RMSE of a split are float64 computations of its float32 predictions
    (numpy agrees to 1e-10; float32 sums over many frames would not)."""
    from fusionkit.engine.metrics import regression_metrics

    g = torch.Generator().manual_seed(3)
    target = (torch.randn(200_000, 2, generator=g) * 0.3).tanh()
    pred = 0.6 * target + 0.2 + 0.3 * torch.randn(200_000, 2, generator=g)
    got = regression_metrics(pred, target, ("valence", "arousal"))
    p, t = pred.double().numpy(), target.double().numpy()
    for j, name in enumerate(("valence", "arousal")):
        assert got[f"ccc_{name}"] == pytest.approx(np_ccc(p[:, j], t[:, j]), rel=1e-10)
        assert got[f"pcc_{name}"] == pytest.approx(np.corrcoef(p[:, j], t[:, j])[0, 1], rel=1e-10)
        rmse = np.sqrt(((p[:, j] - t[:, j]) ** 2).mean())
        assert got[f"rmse_{name}"] == pytest.approx(rmse, rel=1e-10)


def test_padding_has_target_zero_and_no_frame_index():
    """Padded frames of a window longer than its video have target 0 (what
    ``mask_padding: false`` trains them towards), no label and frame index -1."""
    videos = TinyDataset(TinyParams(videos=2)).videos("train")
    store = FrameStore(videos, ["audio", "video"], [0, 1], window=500, hop=400)
    batch = store.batch(torch.arange(store.num_windows))
    assert bool((store.targets[0] != 0).all())  # what a padded row would read otherwise
    for i, v in enumerate(videos):
        n = v.num_frames
        assert n < 500
        assert (batch.targets[i, n:] == 0).all() and not batch.target_mask[i, n:].any()
        assert (batch.frame_index[i, n:] == -1).all()
        labelled = torch.where(v.label_mask[:, None], v.labels, 0.0)
        torch.testing.assert_close(batch.targets[i, :n], labelled)


def test_only_absent_rows_that_are_all_zero_stay_zero_after_zscoring():
    """An absent frame filled with zeros stays 0; an absent frame with any non-zero value
    (e.g. the previous face repeated, with one zero feature) is z-scored like the rest."""
    from fusionkit.engine.data import Normalizer

    mean, std = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 0.5])
    norm = Normalizer({"video": mean}, {"video": std})
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    present = torch.tensor([False, False, True])
    got = norm.apply("video", x, present)
    want = (x - mean) / std
    want[0] = 0.0
    torch.testing.assert_close(got, want)


def test_a_grid_with_a_failed_point_exits_1_and_names_the_point(tmp_path, monkeypatch, cli):
    """``fusionkit run`` of a grid whose point failed says which and exits 1 (a script or a
    scheduler must not take the grid for done), after the other points finished."""
    validate = Trainer._validate

    def seed_1_diverges(self, val, epoch):
        if self.recipe.training.seed == 1:
            raise train_mod.Diverged("training stopped: the loss is not finite (scripted)")
        return validate(self, val, epoch)

    monkeypatch.setattr(Trainer, "_validate", seed_1_diverges)
    raw = tiny_recipe(tmp_path / "runs", epochs=1)
    raw["sweep"] = {"training.seed": [0, 1]}
    recipe = tmp_path / "grid.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, _, err = cli("run", recipe, "-q")
    assert code == 1, err
    assert "1 run(s) failed: seed-1" in err
    assert (tmp_path / "runs" / "tiny" / "seed-0" / METRICS_FILE).is_file()


def test_a_run_failing_after_its_folder_was_made_and_before_epoch_1_leaves_no_folder(
    tmp_path, monkeypatch, cli
):
    """A run that fails once its folder exists but before its first epoch finished (here:
    its data is refused) removes the folder, so that a retry gets the same name."""
    from fusionkit.core.errors import DataError

    def refuse(self, train, val):
        assert (tmp_path / "runs" / "tiny" / "recipe.yaml").is_file()  # the folder exists
        raise DataError("split 'val' is refused (scripted)")

    monkeypatch.setattr(Trainer, "_check_labels", refuse)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "runs", epochs=1)))
    code, _, err = cli("run", recipe, "-q")
    assert code == 2 and "error: split 'val' is refused (scripted)" in err
    assert not (tmp_path / "runs" / "tiny").exists()


def test_only_a_process_of_a_multi_process_launch_tags_its_errors_with_its_rank(monkeypatch):
    """``error (rank N):`` under torchrun with several processes; a single process (also
    ``WORLD_SIZE=1``) says plain ``error:``."""
    from fusionkit.cli.root import _rank_tag

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _rank_tag() == ""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _rank_tag() == " (rank 1)"


def test_non_finite_validation_predictions_name_their_likely_cause(tmp_path, registry):
    """When validation predictions are not finite, the message says what the model and data
    show: nothing broken (lower lr), overflowed running statistics (an extreme input, not
    the learning rate), or extreme validation features (scale or fix them)."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=1, num_threads=1), "r.yaml", registry)
    with RunDir.create(rc, registry) as run:
        trainer = Trainer(build_session(rc, registry), run)
        val = trainer.session.store(rc.data.val_split)
        assert trainer._divergence_cause(val) == "lower training.lr or set training.grad_clip"
        with torch.no_grad():
            trainer.model.head.bn.running_var.fill_(float("inf"))
        why = trainer._divergence_cause(val)
        assert "head.bn.running_var" in why and "running statistics" in why
        assert "training.lr" not in why
        val.features["audio"][3, 0] = 3e38
        why = trainer._divergence_cause(val)
        assert "validation features reach extreme values (audio 3.0e+38)" in why
