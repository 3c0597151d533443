"""Training trust: a resume onto other data, the threads of a resumed run, the advice after a
divergence, unlabelled rows that hold NaN, and settings under which nothing could train."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import yaml

import fusionkit.engine.train as train_mod
from fusionkit.core.errors import CheckpointError, RecipeError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.data import FrameStore
from fusionkit.engine.metrics import ccc_loss
from fusionkit.engine.runs import METRICS_FILE, STATE_FILE, RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.train import Diverged, Trainer, restore_threads
from tests.conftest import TinyDataset, TinyParams, tiny_recipe


class Changed:
    """A dataset whose ``split`` has its audio features scaled (features re-extracted) or its
    unlabelled label rows set to NaN."""

    def __init__(self, base, split: str, audio_scale: float = 1.0, nan_unlabelled=False):
        self.base, self.split = base, split
        self.audio_scale, self.nan_unlabelled = audio_scale, nan_unlabelled
        self.feature_dims, self.targets = base.feature_dims, base.targets

    def splits(self):
        return self.base.splits()

    def videos(self, split):
        out = self.base.videos(split)
        if split != self.split:
            return out
        changed = []
        for v in out:
            labels = v.labels.clone()
            if self.nan_unlabelled:
                labels[~v.label_mask] = math.nan
            feats = {**v.features, "audio": v.features["audio"] * self.audio_scale}
            changed.append(dataclasses.replace(v, features=feats, labels=labels))
        return changed


def stop_after_first(epoch, record):
    if epoch == 1:
        raise KeyboardInterrupt


def interrupted(tmp_path, registry, **training):
    """A tiny run stopped after its first epoch, reopened and locked."""
    rc = validate_recipe(tiny_recipe(tmp_path, epochs=3, **training), "tiny", registry)
    run = RunDir.create(rc, registry)
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_session(rc, registry), run, on_epoch_end=stop_after_first).fit()
    run.unlock()
    return rc, RunDir.open(run.path).lock()


def files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    ("split", "role"), [("train", "train split 'train'"), ("val", "val split 'val'")]
)
def test_resume_onto_changed_data_is_refused_and_keeps_the_run(tmp_path, registry, split, role):
    rc, run = interrupted(tmp_path, registry)
    before = files(run.path)
    session = build_session(rc, registry)
    session.dataset = session.train_dataset = Changed(session.dataset, split, audio_scale=10.0)
    with pytest.raises(CheckpointError, match="resuming would mix the two") as err:
        Trainer(session, run).fit(resume=True)
    assert role in str(err.value) and "1 finished epoch(s)" in str(err.value)
    assert files(run.path) == before  # nothing trained, nothing written
    run.unlock()


def test_resume_onto_the_same_data_passes_the_check(tmp_path, registry):
    rc, run = interrupted(tmp_path, registry)
    out = Trainer(build_session(rc, registry), run).fit(resume=True)
    run.unlock()
    assert out.best_epoch is not None and len(out.history) == 3


def test_content_hash_covers_features_beyond_the_fingerprint():
    videos = TinyDataset(TinyParams(videos=2)).videos("train")
    a = FrameStore(videos, ["audio", "video"], [0, 1], window=64, hop=48)
    scaled = Changed(TinyDataset(TinyParams(videos=2)), "train", audio_scale=1.0 + 1e-6)
    b = FrameStore(scaled.videos("train"), ["audio", "video"], [0, 1], window=64, hop=48)
    assert a.fingerprint() == b.fingerprint()  # labels and videos alike
    assert a.content_sha256() != b.content_sha256()
    assert (
        a.content_sha256()
        == FrameStore(videos, ["audio", "video"], [0, 1], 64, 48).content_sha256()
    )


def test_labels_fingerprint_is_the_hash_of_the_concatenated_split():
    """The fingerprint recorded in metrics.json, hashed video by video (no store needed), is
    the digest of the split's names, then its whole label mask, then its whole float32 target
    matrix (0 where unlabelled), as earlier versions computed it from the concatenated store."""
    import hashlib

    from fusionkit.core.interfaces import Video
    from fusionkit.engine.data import labels_fingerprint

    videos = TinyDataset(TinyParams(videos=3)).videos("val")
    labels = videos[1].labels.double()
    labels[10:15] = float("nan")  # unlabelled rows may hold anything
    videos[1] = Video(videos[1].name, videos[1].features, labels, videos[1].label_mask)
    for cols in ([0, 1], [1]):
        h = hashlib.sha256()
        h.update("".join(f"{v.name}\t{v.num_frames}\n" for v in videos).encode())
        mask = torch.cat([v.label_mask for v in videos])
        h.update(mask.numpy().tobytes())
        y = torch.cat([v.labels[:, cols] for v in videos]).float()
        h.update(torch.where(mask[:, None], y, torch.zeros(())).numpy().tobytes())
        assert labels_fingerprint(videos, cols) == h.hexdigest()
        assert FrameStore(videos, ["audio"], cols, 64, 48).fingerprint() == h.hexdigest()
    relabelled = [dataclasses.replace(v, labels=v.labels * 0.5) for v in videos]
    assert labels_fingerprint(relabelled, [0, 1]) != labels_fingerprint(videos, [0, 1])


@pytest.fixture
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_a_resumed_run_trains_on_with_the_threads_of_its_first_epoch(
    tmp_path, registry, one_thread
):
    rc, run = interrupted(tmp_path, registry)  # first epoch on 1 thread
    torch.set_num_threads(2)  # resumed where more cores are free
    restore_threads(run)
    assert torch.get_num_threads() == 1
    out = Trainer(build_session(rc, registry), run).fit(resume=True)
    run.unlock()
    assert json.loads((run / METRICS_FILE).read_text())["cpu_threads"] == 1
    assert out.best_epoch is not None


def test_a_run_resumed_with_other_threads_says_its_numbers_will_differ(
    tmp_path, registry, one_thread
):
    rc, run = interrupted(tmp_path, registry)
    torch.set_num_threads(2)  # training.num_threads pinned elsewhere, or fewer cores now
    with pytest.warns(UserWarning, match="trained with 1 CPU thread.*continues with 2"):
        Trainer(build_session(rc, registry), run).fit(resume=True)
    run.unlock()


def nan_loss_from_epoch(monkeypatch, epoch: int) -> None:
    """The training loss becomes NaN from ``epoch`` on (a model that diverges there)."""
    seen = {"epochs": 0}
    commit = Trainer._commit_epoch

    def counting(self, *args, **kwargs):
        seen["epochs"] += 1
        return commit(self, *args, **kwargs)

    def loss(pred, target, mask):
        out = ccc_loss(pred, target, mask)
        return out * math.nan if seen["epochs"] + 1 >= epoch else out

    monkeypatch.setattr(Trainer, "_commit_epoch", counting)
    monkeypatch.setattr(train_mod, "ccc_loss", loss)


@pytest.mark.parametrize(("epoch", "kept"), [(2, "last finished epoch (1)"), (1, "no epoch had")])
def test_divergence_names_what_the_run_keeps(tmp_path, registry, monkeypatch, epoch, kept):
    nan_loss_from_epoch(monkeypatch, epoch)
    rc = validate_recipe(tiny_recipe(tmp_path, epochs=3), "tiny", registry)
    with RunDir.create(rc, registry) as run, pytest.raises(Diverged) as err:
        Trainer(build_session(rc, registry), run).fit()
    assert f"loss is not finite at epoch {epoch}" in str(err.value) and kept in str(err.value)


def test_after_a_divergence_the_cli_says_start_a_new_run_not_resume(
    tmp_path, registry, monkeypatch, cli
):
    nan_loss_from_epoch(monkeypatch, 2)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "runs", epochs=3, num_threads=1)))
    code, _, err = cli("run", recipe, "-q")
    assert code == 2 and "loss is not finite at epoch 2" in err
    assert "resuming it repeats the same steps: start a new run" in err
    assert "resume with" not in err
    assert (tmp_path / "runs" / "tiny" / STATE_FILE).is_file()  # the finished epoch is kept


def test_nan_in_unlabelled_rows_trains_as_zeros_there(tmp_path, registry):
    """The Video contract lets unlabelled rows hold anything; NaN there changes nothing."""
    results = []
    for nan in (False, True):
        rc = validate_recipe(tiny_recipe(tmp_path / str(nan), epochs=2), "tiny", registry)
        session = build_session(rc, registry)
        session.dataset = session.train_dataset = Changed(
            session.dataset, "train", nan_unlabelled=nan
        )
        with RunDir.create(rc, registry) as run:
            results.append(Trainer(session, run).fit())
    plain, nans = results
    assert all(math.isfinite(h["train_loss"]) for h in nans.history)
    assert [h["train_loss"] for h in nans.history] == [h["train_loss"] for h in plain.history]
    assert nans.metrics == plain.metrics


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"data": {"window": 1, "hop": 1}}, "data.window"),
        ({"training": {"lr": 1e-3, "plateau": {"min_lr": 1e-3}}}, "training.plateau.min_lr"),
    ],
)
def test_settings_under_which_nothing_trains_are_refused(tmp_path, registry, change, key):
    raw = tiny_recipe(tmp_path)
    for section, values in change.items():
        raw[section].update(values)
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        validate_recipe(raw, "tiny", registry)


def test_a_run_resumed_on_another_number_of_processes_is_refused(tmp_path, registry):
    from fusionkit.engine.distributed import Dist
    from fusionkit.engine.runs import resume_command

    rc, run = interrupted(tmp_path, registry)  # one process
    before = files(run.path)
    two = Dist(rank=0, world_size=2)  # as torchrun --nproc_per_node 2 would resume it
    with pytest.raises(CheckpointError, match="trains on 1 process") as err:
        Trainer(build_session(rc, registry), run, dist=two).fit(resume=True)
    assert f"Resume it as it was: fusionkit resume {run.path}" in str(err.value)
    assert files(run.path) == before
    run.unlock()
    assert (
        resume_command(run.path, 2) == f"torchrun --nproc_per_node 2 -m fusionkit resume {run.path}"
    )


def test_threads_are_shared_among_the_processes_of_a_torchrun_job(
    tmp_path, monkeypatch, cli, one_thread
):
    import fusionkit.engine.session as session_mod

    monkeypatch.setattr(session_mod, "available_cores", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this machine
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # it would cap the default too
    raw = tiny_recipe(tmp_path / "runs", epochs=1)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, out, err = cli("run", recipe)
    assert code == 0, err
    assert "2 CPU thread(s)" in out and torch.get_num_threads() == 2


def test_a_state_that_predates_the_process_count_resumes_and_records_it(tmp_path, registry):
    """Older states do not say how many processes trained them: not assumed to be one."""
    from safetensors.torch import save_file

    from fusionkit.engine.distributed import Dist
    from fusionkit.engine.files import load_tensors

    rc, run = interrupted(tmp_path, registry)
    tensors, meta = load_tensors(run / STATE_FILE)
    trainer_meta = json.loads(meta["trainer"])
    del trainer_meta["world_size"]
    save_file(tensors, str(run / STATE_FILE), {**meta, "trainer": json.dumps(trainer_meta)})

    class RankZero(Dist):  # rank 0 of 2 whose peer takes part in each collective
        def broadcast(self, value, src=0):
            return value

    trainer = Trainer(build_session(rc, registry), run, dist=RankZero(rank=0, world_size=2))
    trainer.restore()
    assert trainer.state.world_size == 2 and trainer.state.epochs_done == 1
    run.unlock()


def test_a_refused_resume_prints_only_its_own_advice(tmp_path, registry, monkeypatch, cli):
    from fusionkit.engine.distributed import Dist

    raw = tiny_recipe(tmp_path / "runs", epochs=3, num_threads=1)
    rc = validate_recipe(raw, "tiny", registry)
    run = RunDir.create(rc, registry)
    with pytest.raises(KeyboardInterrupt):
        Trainer(build_session(rc, registry), run, on_epoch_end=stop_after_first).fit()
    run.unlock()
    monkeypatch.setattr(Dist, "from_env", classmethod(lambda cls, device: cls(0, 2)))
    code, _, err = cli("resume", run.path)
    assert code == 2 and "trains on 1 process(es) and this is 2" in err
    assert f"Resume it as it was: fusionkit resume {run.path}" in err
    assert "resume with" not in err  # no second, contradicting command


def test_grid_points_resumed_say_and_use_the_threads_of_their_first_epochs(
    tmp_path, registry, monkeypatch, one_thread
):
    from types import SimpleNamespace

    import fusionkit.engine.session as session_mod
    import fusionkit.engine.train as train_module
    from fusionkit.engine.train import resumed_threads
    from fusionkit.studies.grid import _point_threads

    monkeypatch.setattr(session_mod, "available_cores", lambda: 4)
    monkeypatch.setattr(train_module, "available_cores", lambda: 4)
    import fusionkit.studies.grid as grid_mod

    monkeypatch.setattr(grid_mod, "available_cores", lambda: 4)
    rc, run = interrupted(tmp_path, registry)  # its first epoch on 1 thread
    run.unlock()
    assert resumed_threads(run) == 1
    point = SimpleNamespace(tag=run.path.name, recipe=rc)
    assert _point_threads(point, run.path.parent, share=4) == 1  # what the header says
    fresh = SimpleNamespace(tag="not-started", recipe=rc)
    assert _point_threads(fresh, run.path.parent, share=4) == 4


def test_eval_of_a_run_evaluated_on_more_threads_than_here_says_so(tmp_path, registry, cli):
    raw = tiny_recipe(tmp_path / "runs", epochs=1)
    rc = validate_recipe(raw, "tiny", registry)
    with RunDir.create(rc, registry) as run:
        Trainer(build_session(rc, registry), run).fit()
    metrics = json.loads((run / METRICS_FILE).read_text())
    metrics["cpu_threads"] = 4096  # evaluated on a large machine
    (run / METRICS_FILE).write_text(json.dumps(metrics))
    code, out, err = cli("eval", run.path, "--split", "val")
    assert code in (0, 1)  # compared either way (fewer threads may change the last digits)
    assert "was evaluated with 4096 CPU threads" in err
    assert "(4096 recorded, capped at" in " ".join(out.split() + err.split())
    assert "training.num_threads" not in err
