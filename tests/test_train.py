"""Training, resume, evaluation reproducibility and run directories (tiny in-test dataset)."""

from __future__ import annotations

import json

import pytest
import torch

from fusionkit.core.errors import CheckpointError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.checkpoint import load_weights
from fusionkit.engine.data import FrameStore, window_starts
from fusionkit.engine.evaluate import evaluate_splits, predict
from fusionkit.engine.runs import BEST_FILE, METRICS_FILE, STATE_FILE, RunDir
from fusionkit.engine.session import build_session, load_run
from fusionkit.engine.train import Trainer
from tests.conftest import TinyDataset, TinyParams, tiny_recipe


def train(tmp_path, registry, resume=False, run_dir=None, hook=None, **training):
    rc = validate_recipe(tiny_recipe(tmp_path, **training), "tiny", registry)
    run = run_dir or RunDir.create(rc, registry)
    session = build_session(rc, registry)
    result = Trainer(session, run, on_epoch_end=hook).fit(resume=resume)
    run.unlock()
    return result, run.path


def session_of(tmp_path, registry, raw=None):
    rc = validate_recipe(raw or tiny_recipe(tmp_path), "tiny", registry)
    return build_session(rc, registry)


@pytest.mark.parametrize(
    ("n", "expected"), [(50, [0]), (64, [0]), (65, [0, 1]), (160, [0, 48, 96])]
)
def test_window_starts_cover_every_frame(n, expected):
    starts = window_starts(n, 64, 48)
    assert starts == expected
    covered = set()
    for s in starts:
        covered |= set(range(s, min(s + 64, n)))
    assert covered == set(range(n))


def test_frame_store_pads_and_masks():
    videos = TinyDataset(TinyParams(videos=2)).videos("train")
    store = FrameStore(videos, ["audio", "video"], [0, 1], window=500, hop=400)
    batch = store.batch(torch.arange(store.num_windows))
    for i, v in enumerate(videos):
        n = v.num_frames
        assert batch.mask[i, :n].all() and not batch.mask[i, n:].any()
        assert torch.equal(batch.inputs["audio"][i, :n], v.features["audio"])
        assert (batch.inputs["audio"][i, n:] == 0).all()
        assert torch.equal(batch.target_mask[i, :n], v.label_mask)
        assert not batch.target_mask[i, n:].any()


def test_prediction_averages_overlapping_windows(tmp_path, registry):
    """Frame predictions equal the mean over all windows that contain the frame."""
    tr = session_of(tmp_path, registry)
    videos = tr.dataset.videos("val")[:1]
    store = FrameStore(videos, ["audio", "video"], [0, 1], window=64, hop=48)
    got = predict(tr.model, store, batch_size=3).pred
    tr.model.eval()
    n = videos[0].num_frames
    acc, cnt = torch.zeros(n, 2), torch.zeros(n, 1)
    with torch.no_grad():
        for s in window_starts(n, 64, 48):
            e = min(s + 64, n)
            x = {m: videos[0].features[m][s:e][None] for m in ("audio", "video")}
            acc[s:e] += tr.model(x, torch.ones(1, e - s, dtype=torch.bool)).pred[0]
            cnt[s:e] += 1
    torch.testing.assert_close(got, acc / cnt, atol=1e-5, rtol=1e-5)


def test_training_improves_and_writes_run_dir(tmp_path, registry):
    result, run_dir = train(tmp_path, registry, epochs=6)
    for name in (
        STATE_FILE,
        BEST_FILE,
        METRICS_FILE,
        "recipe.yaml",
        "run.json",
        "history.csv",
        "predictions/val.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    hist = result.history
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert result.metrics["val"]["ccc_mean"] > 0.3
    stored = json.loads((run_dir / METRICS_FILE).read_text())
    assert stored["splits"]["test"] == result.metrics["test"]
    assert not list(run_dir.rglob("*.tmp"))


def test_resume_after_interrupt_matches_uninterrupted(tmp_path, registry):
    full, _ = train(tmp_path / "a", registry, epochs=5)

    def interrupt(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    rc = validate_recipe(tiny_recipe(tmp_path / "b", epochs=5), "tiny", registry)
    run = RunDir.create(rc, registry)
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_session(rc, registry), run, on_epoch_end=interrupt).fit()
    run.unlock()
    assert not (run / METRICS_FILE).exists()
    again = RunDir.open(run.path).lock()
    again.check_same_training(rc, registry)
    out = Trainer(build_session(rc, registry), again).fit(resume=True)
    assert out.metrics == full.metrics
    assert [h["train_loss"] for h in out.history] == [h["train_loss"] for h in full.history]


def test_resume_refuses_a_different_recipe(tmp_path, registry):
    rc = validate_recipe(tiny_recipe(tmp_path, epochs=1), "tiny", registry)
    run = RunDir.create(rc, registry)
    other = validate_recipe(tiny_recipe(tmp_path, epochs=1, lr=0.5), "tiny", registry)
    with pytest.raises(CheckpointError, match=r"training\.lr"):
        RunDir.open(run.path).check_same_training(other, registry)


def test_new_run_never_overwrites_existing(tmp_path, registry):
    rc = validate_recipe(tiny_recipe(tmp_path), "tiny", registry)
    first = RunDir.create(rc, registry).path
    (first / "keep.txt").write_text("x")
    second = RunDir.create(rc, registry).path
    assert second != first and (first / "keep.txt").read_text() == "x"


def test_reloaded_weights_reproduce_metrics_exactly(tmp_path, registry):
    result, run_dir = train(tmp_path, registry, epochs=3)
    loaded = load_run(run_dir, registry=registry)
    again, _, _ = evaluate_splits(loaded.session, ["val", "test"])
    assert again == result.metrics


def test_seeded_runs_are_identical_and_seed_matters(tmp_path, registry):
    a, _ = train(tmp_path / "a", registry, epochs=2, seed=1)
    b, _ = train(tmp_path / "b", registry, epochs=2, seed=1)
    c, _ = train(tmp_path / "c", registry, epochs=2, seed=2)
    assert a.metrics == b.metrics
    assert a.metrics != c.metrics


def test_corrupt_checkpoint_is_named(tmp_path, registry):
    _result, run_dir = train(tmp_path, registry, epochs=1)
    (run_dir / BEST_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=BEST_FILE):
        load_weights(run_dir / BEST_FILE, session_of(tmp_path, registry).model)


@pytest.mark.parametrize(
    "model",
    [
        {},  # per-frame baseline
        {"fusion": {"name": "rjca"}, "gate": {"name": "tagf_temporal"}},  # mixes frames in time
    ],
)
def test_padding_content_does_not_change_predictions(tmp_path, registry, model):
    """Garbage written into padded frames must not change predictions on real frames, also
    for components that attend across time (RJCA's correlation, a BiLSTM over time)."""
    raw = tiny_recipe(tmp_path)
    raw["model"].update(model)
    tr = session_of(tmp_path, registry, raw)
    tr.model.eval()
    videos = tr.dataset.videos("val")[:2]
    store = FrameStore(videos, ["audio", "video"], [0, 1], window=500, hop=400)
    batch = store.batch(torch.arange(store.num_windows))
    dirty = {
        m: torch.where(batch.mask[..., None], x, torch.full_like(x, 99.0))
        for m, x in batch.inputs.items()
    }
    with torch.no_grad():
        clean = tr.model(batch.inputs, batch.mask).pred
        noisy = tr.model(dirty, batch.mask).pred
    torch.testing.assert_close(clean[batch.mask], noisy[batch.mask])


def test_written_files_have_normal_permissions(tmp_path, registry):
    import os

    _, run_dir = train(tmp_path, registry, epochs=1)
    mask = os.umask(0)
    os.umask(mask)
    for name in (METRICS_FILE, BEST_FILE, "recipe.yaml"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_resume_accepts_a_saved_recipe_lacking_newer_default_fields(tmp_path, registry):
    import yaml

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=1), "tiny", registry)
    run = RunDir.create(rc, registry)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    del saved["evaluation"]["save_predictions"]  # as if written by an older fusionkit
    (run / "recipe.yaml").write_text(yaml.safe_dump(saved))
    again = RunDir.open(run.path)
    again.check_same_training(again.recipe(registry), registry)  # the same training: resumable
    again.check_same_training(rc, registry)


def test_weights_of_another_architecture_are_named_precisely(tmp_path, registry):
    _, run_dir = train(tmp_path, registry, epochs=1)
    raw = tiny_recipe(tmp_path)
    raw["model"]["head"]["params"]["hidden"] = 16
    other = session_of(tmp_path, registry, raw)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch head\.bn\.bias: file \(8,\) vs model \(16,\)"
    ):
        load_weights(run_dir / BEST_FILE, other.model)


MODELS = {  # every built-in encoder, fusion, gate and head, in released-like compositions
    "concat": ("linear", "concat", "last", {}),
    "tcn-rjca": ("tcn", "rjca", "last", {"mode": "agnostic"}),
    "bilstm-grjca": ("bilstm", "rjca", "grjca", {}),
    "tagf-faithful": ("linear", "rjca", "tagf", {"mode": "faithful", "length": 500}),
    "tagf_temporal": ("tcn", "rjca", "tagf_temporal", {}),
}


def _padded_trainer(tmp_path, registry, model, **training):
    """A Trainer for MODELS[model] on the tiny data, with windows longer than every video."""
    encoder, fusion, gate, fusion_params = MODELS[model]
    raw = tiny_recipe(tmp_path, **training)
    enc_params = {"tcn": {"channels": [8, 8]}, "bilstm": {"hidden": 4}}.get(encoder, {"dim": 8})
    raw["model"].update(
        encoders={m: {"name": encoder, "params": enc_params} for m in ("audio", "video")},
        fusion={"name": fusion, "params": fusion_params},
        gate={"name": gate},
    )
    raw["data"].update(window=500, hop=400)  # longer than every video: padded windows
    rc = validate_recipe(raw, "tiny", registry)
    tr = Trainer(build_session(rc, registry), RunDir(tmp_path / "r"))
    store = FrameStore(
        tr.session.dataset.videos("train"), ["audio", "video"], [0, 1], 500, 400, tr.device
    )
    windows = torch.arange(4, device=tr.device)
    assert store.batch(windows).mask.logical_not().any()  # the batch does contain padding
    tr.model.train()
    return tr, store, windows


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_training_step_never_waits_for_the_device(tmp_path, registry, model, grad_clip):
    """Gathering a batch (with padded windows), forward, loss and backward dispatch no op that
    reads a tensor value on the host: on a GPU the host would stall every step."""
    from fusionkit.testing import host_syncs

    tr, store, windows = _padded_trainer(tmp_path, registry, model, grad_clip=grad_clip)
    found = host_syncs(lambda: tr.backward_step(tr.model, store, windows))
    assert found == []
    assert all(p.grad is not None for p in tr.model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", sorted(MODELS))
def test_training_step_never_waits_for_the_device_on_cuda(tmp_path, registry, model):
    """The same on a GPU, judged by CUDA itself: sync debug mode 'error' raises on any
    synchronising call (bf16 autocast, as `precision: auto` trains there)."""
    tr, store, windows = _padded_trainer(tmp_path, registry, model, device="cuda", grad_clip=1.0)
    tr.backward_step(tr.model, store, windows)  # warm-up: library handles, cuDNN plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.backward_step(tr.model, store, windows)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compile_option_trains_through_torch_compile(tmp_path, registry, monkeypatch):
    """training.compile wraps the training forward in torch.compile with the chosen mode (the
    test swaps in dynamo's eager backend: no C++ toolchain, same arithmetic as eager)."""
    real_compile, calls = torch.compile, []

    def recording(model, mode=None, **kw):
        calls.append(mode)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", recording)
    torch._dynamo.reset()
    compiled, run_dir = train(
        tmp_path / "c", registry, epochs=2, compile=True, compile_mode="reduce-overhead"
    )
    eager, _ = train(tmp_path / "e", registry, epochs=2)
    assert calls == ["reduce-overhead"]
    assert json.loads((run_dir / METRICS_FILE).read_text())["compile"] is True
    for split in ("val", "test"):
        for key, value in eager.metrics[split].items():
            assert compiled.metrics[split][key] == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_history_grows_epoch_by_epoch_and_tensorboard_logs_it(tmp_path, registry):
    """history.csv is rewritten after every epoch (read here mid-run), and the optional
    TensorBoard logger writes the same scalars."""
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []

    def read_mid_run(epoch, record):
        with (tmp_path / "tiny" / "history.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        seen.append([int(r["epoch"]) for r in rows])
        assert float(rows[-1]["train_loss"]) == pytest.approx(record["train_loss"])

    result, run_dir = train(
        tmp_path, registry, hook=read_mid_run, epochs=3, loggers=["tensorboard"]
    )
    assert seen == [[1], [1, 2], [1, 2, 3]]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    points = events.Scalars("val_ccc_mean")
    assert [p.step for p in points] == [1, 2, 3]
    assert [p.value for p in points] == pytest.approx([h["val_ccc_mean"] for h in result.history])


def test_history_lr_is_the_rate_each_epoch_trained_with(tmp_path, registry):
    """The plateau scheduler steps after validation; the logged rate used to be the next
    epoch's (an epoch trained at 1.0 was shown as 0.5)."""
    raw = tiny_recipe(tmp_path, epochs=6, lr=2.0, early_stopping=10)
    raw["training"]["plateau"] = {"patience": 0, "factor": 0.5}
    rc = validate_recipe(raw, "tiny", registry)
    run = RunDir.create(rc, registry)
    trainer = Trainer(build_session(rc, registry), run)
    seen: dict[int, set[float]] = {}
    epochs = iter(range(1, 100))
    current = [next(epochs)]
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: seen.setdefault(current[0], set()).add(opt.param_groups[0]["lr"])
    )
    trainer.on_epoch_end = lambda *_: current.__setitem__(0, next(epochs))
    trainer.fit()
    run.unlock()
    rows = (run.path / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = {int(r.split(",")[0]): float(r.split(",")[header.index("lr")]) for r in rows[1:]}
    assert all(len(rates) == 1 for rates in seen.values()), seen
    assert logged == {e: rates.pop() for e, rates in seen.items()}
    assert len(set(logged.values())) > 1  # the plateau step did lower the rate
