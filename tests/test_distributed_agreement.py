"""Data-parallel training (torchrun / DDP, gloo on the CPU): the processes agree on what
stops them, rank 0 alone repairs the run folder, and a launch environment that cannot work
is refused in one line."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import tiny_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interrupted_two_process_run(tmp_path: Path, registry) -> Path:
    """A run interrupted after epoch 1 whose state says it trains on 2 processes (as a torchrun
    job's state does: `world_size` 2, one RNG state per rank), killed after its new best
    weights were committed in the state but before `model.next.safetensors` was renamed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer

    raw = tiny_recipe(tmp_path / "runs", epochs=3, num_threads=1)
    rc = validate_recipe(raw, "r.yaml", registry)

    def stop(epoch, record):
        raise KeyboardInterrupt

    with RunDir.create(rc, registry) as run:
        with pytest.raises(KeyboardInterrupt):
            Trainer(build_session(rc, registry), run, on_epoch_end=stop).fit()
        path = run.path
    state = path / "state.safetensors"
    tensors = load_file(state)
    with safe_open(str(state), "pt") as fh:
        meta = dict(fh.metadata())
    trainer = json.loads(meta["trainer"])
    trainer["world_size"] = 2
    meta["trainer"] = json.dumps(trainer)
    cpu = tensors.pop("rng.cpu")
    tensors.update({"rng.cpu.0": cpu, "rng.cpu.1": cpu.clone()})
    save_file(tensors, state, metadata=meta)
    shutil.copy(path / "model.safetensors", path / "model.next.safetensors")
    return path


def test_a_non_main_rank_does_not_write_the_run_directory_on_resume(tmp_path, registry):
    """docs/recipes.md: "Rank 0 alone writes the run directory". Rank 1 of a resumed torchrun
    job (here with rank 0 already done: its collectives are no-ops) must leave the files as
    they are; when it renames `model.next.safetensors` itself, the two ranks race on one file
    (with weights large enough to hash for a second, rank 1 ends in a FileNotFoundError)."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.distributed import Dist
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer

    path = _interrupted_two_process_run(tmp_path, registry)

    class RankOne(Dist):  # rank 1 of 2, whose peer has finished its part of each collective
        def barrier(self) -> None:
            pass

        def broadcast(self, value, src=0):
            return value

    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    rc = validate_recipe(yaml.safe_load((path / "recipe.yaml").read_text()), "r.yaml", registry)
    trainer = Trainer(build_session(rc, registry), RunDir(path), dist=RankOne(1, 2, 1))
    trainer.restore()
    after = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert after == before


def _diverging_rank(rank: int, port: int, raw: dict, out: str) -> None:
    """One rank of a 2-process tiny run in which rank 1 alone gets a non-finite loss (and so
    non-finite gradients, which DDP averages into both replicas) at the last step of epoch 1.
    Writes what the rank raised to ``out/rank<N>.json``."""
    import fusionkit.engine.train as train_mod
    from fusionkit.engine.train import Trainer
    from tests.test_distributed import join_tiny_job, leave_tiny_job

    trainer, made = join_tiny_job(rank, 2, port, raw)
    calls = {"n": 0, "last": -1}
    original_epoch, original_loss = Trainer._train_epoch, train_mod.ccc_loss

    def train_epoch(self, step, train, epoch, steps):
        calls["n"], calls["last"] = 0, steps if epoch == 1 else -1
        return original_epoch(self, step, train, epoch, steps)

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = original_loss(*args, **kwargs)
        return value * math.nan if rank == 1 and calls["n"] == calls["last"] else value

    trainer._train_epoch = train_epoch.__get__(trainer)
    train_mod.ccc_loss = loss
    try:
        trainer.fit()
        seen = {"type": None, "message": ""}
    except Exception as exc:
        seen = {"type": type(exc).__name__, "message": str(exc)}
    finally:
        if made:
            made.unlock()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    del trainer, train_epoch  # the bound epoch function holds the trainer in a cycle
    train_mod.ccc_loss = original_loss
    leave_tiny_job()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_a_non_finite_loss_on_one_rank_stops_every_rank_as_diverged(tmp_path):
    """Rank 1's last step of epoch 1 is non-finite; rank 0's losses are all finite but the
    averaged gradients make both replicas non-finite. Every rank must stop with the same
    divergence (whose message says a resume repeats the same steps), not rank 0 with a
    collective error that the CLI answers with 'resume with: torchrun ...'."""
    import torch.multiprocessing as mp

    raw = tiny_recipe(tmp_path / "runs", epochs=2, num_threads=1, batch_size=2)
    mp.spawn(_diverging_rank, args=(free_port(), raw, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["type"] == "Diverged"  # rank 1 saw its own non-finite loss
    assert ranks[0]["type"] == "Diverged", ranks[0]
    assert ranks[0]["message"] == ranks[1]["message"]
    assert re.search(r"epoch 1, step (\d+) of \1 \(process 1 of 2\)", ranks[0]["message"])


@pytest.mark.parametrize(
    "env", [{"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "0"}], ids=["no-rank", "no-master"]
)
def test_an_incomplete_torchrun_environment_is_one_error_line(tmp_path, cli, monkeypatch, env):
    """WORLD_SIZE without RANK (or without MASTER_ADDR) is refused in one line naming the
    missing variable and torchrun, before any run folder exists."""
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "runs", epochs=1, num_threads=1)))
    code, _out, err = cli("run", recipe, "-q")
    assert code == 2
    missing = "RANK" if "RANK" not in env else "MASTER_ADDR"
    assert missing in err and "torchrun" in err
    assert not (tmp_path / "runs").exists()


def test_only_run_and_resume_run_under_torchrun(tmp_path, cli, monkeypatch):
    """Every process of a launch runs the whole command: a command that is not a training job
    (here `runs list`) is refused in each, in one line, instead of racing its siblings for the
    same files and locks."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _out, err = cli("runs", "list", tmp_path)
    assert code == 2
    assert "fusionkit runs runs as one process; only `run` and `resume` train under torchrun" in (
        " ".join(err.split())
    )
    assert "(rank 1)" in err


def test_rank_seeds_are_distinct_from_other_runs_seeds():
    """Rank 0 keeps the run's seed; a rank > 0 gets a hash of (seed, rank), so that no rank of
    one run draws the stream of another run's rank 0 (`seed + 7919 * rank` did)."""
    from fusionkit.engine.distributed import Dist

    seeds = {s: [Dist(r, 4).seed(s) for r in range(4)] for s in range(0, 40_000, 7919)}
    for s, per_rank in seeds.items():
        assert per_rank[0] == s
        assert len(set(per_rank)) == 4
    assert Dist(1, 2).seed(0) not in {s for s in range(100_000)}  # not another run's seed
    assert Dist(1, 2).seed(0) == Dist(1, 2).seed(0)  # the same run, the same stream


def test_explicit_threads_over_the_machines_cores_are_warned_about(monkeypatch):
    """`training.num_threads` in each of the processes of one machine: more threads than
    cores in all is warned about with the count that fits."""
    from fusionkit.engine import session

    monkeypatch.setattr(session, "available_cores", lambda: 2)
    old = torch.get_num_threads()
    try:
        with pytest.warns(
            UserWarning,
            match=r"num_threads=2 in each of the 2 processes .* 4 "
            r"threads on 2 cores.*training\.num_threads=1",
        ):
            assert session.set_threads(2, share=2) == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert session.set_threads(1, share=2) == 1
    finally:
        torch.set_num_threads(old)
