"""DDP through torchrun with the gloo backend on 2 CPU processes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from fusionkit.engine.data import window_starts
from tests.conftest import TinyDataset, TinyParams, tiny_plugin_env, tiny_recipe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fusionkit(*args: str, env: dict, cwd, nproc: int = 1) -> subprocess.CompletedProcess:
    """``python -m fusionkit ARGS``, under torchrun with ``nproc`` processes when > 1."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port())] if nproc > 1 else []  # fmt: skip
    return subprocess.run(
        [sys.executable, *launcher, "-m", "fusionkit", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_torchrun_two_gloo_processes_match_one_process_with_double_batch(tmp_path):
    env = tiny_plugin_env(tmp_path, OMP_NUM_THREADS="1")
    raw = tiny_recipe(tmp_path / "runs", epochs=3)
    # BatchNorm statistics and dropout masks are per process; without them the two set-ups
    # compute the same gradients (mean over the same windows), up to float summation order.
    raw["model"]["head"]["params"] = {"hidden": 8, "dropout": 0.0, "batchnorm": False}
    raw["training"].update(num_threads=1)
    videos = TinyDataset(TinyParams(seed=0)).videos("train")
    n_win = sum(len(window_starts(v.num_frames, 64, 48)) for v in videos)
    assert n_win % 2 == 0, "pick data so that both processes see disjoint halves"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    ddp = fusionkit(
        "run", str(recipe), "output.name=ddp", "training.batch_size=4", "-q",
        env=env, cwd=tmp_path, nproc=2,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = fusionkit(
        "run", str(recipe), "output.name=single", "training.batch_size=8", "-q",
        env=env, cwd=tmp_path,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]  # one dir, rank 0's
    a = json.loads((runs / "ddp" / "metrics.json").read_text())
    b = json.loads((runs / "single" / "metrics.json").read_text())
    for split in ("val", "test"):
        for key in ("ccc_valence", "ccc_arousal", "ccc_mean"):
            assert a["splits"][split][key] == pytest.approx(b["splits"][split][key], abs=1e-4)
    la = [h["train_loss"] for h in a["history"]]
    lb = [h["train_loss"] for h in b["history"]]
    assert la == pytest.approx(lb, abs=1e-4)
    # resuming the finished data-parallel run: no process trains it again (rank 1 used to start
    # training alone and crash once rank 0 had returned)
    again = fusionkit("resume", str(runs / "ddp"), "-q", env=env, cwd=tmp_path, nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "complete already; nothing to do" in again.stdout
    assert json.loads((runs / "ddp" / "metrics.json").read_text()) == a


def join_tiny_job(rank: int, world: int, port: int, raw: dict):
    """As process ``rank`` of a ``world``-process gloo job on this machine (spawned): join it
    and build the Trainer of recipe ``raw`` in the run folder rank 0 creates. Returns the
    trainer and the run folder when this process created it (rank 0), else None."""
    import os
    from datetime import timedelta

    import torch.distributed as tdist

    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.distributed import Dist
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer
    from tests.conftest import make_registry

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", timeout=timedelta(seconds=120))  # never a long hang
    registry = make_registry()
    rc = validate_recipe(raw, "r.yaml", registry)
    dist = Dist.from_env("cpu")
    made = RunDir.create(rc, registry) if dist.is_main else None
    run = made or RunDir(dist.broadcast(None))
    if made:
        dist.broadcast(str(made.path))
    return Trainer(build_session(rc, registry), run, dist=dist), made


def leave_tiny_job() -> None:
    """Leave the job of :func:`join_tiny_job` in step with the other ranks: the trainers (and
    their DDP wrappers, which hold the process group) are collected and every rank has finished
    its work before the group goes, so no rank tears down communication threads at interpreter
    exit or while a peer still writes (either can abort a process with SIGABRT)."""
    import gc

    import torch.distributed as tdist

    gc.collect()
    tdist.barrier()
    tdist.destroy_process_group()


def _train_rank(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    """One rank of a data-parallel tiny run (spawned): writes its per-epoch validation
    CCC-means and learning rates to ``out/rank<N>.json``."""
    from pathlib import Path

    trainer, _ = join_tiny_job(rank, world, port, raw)
    seen: list[dict] = []
    groups = trainer.optimizer.param_groups
    trainer.on_epoch_end = lambda epoch, record: seen.append(
        {"val": record["val_ccc_mean"], "lr": groups[0]["lr"]}
    )
    trainer.fit()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    del trainer
    leave_tiny_job()


def test_every_rank_validates_the_same_model_with_batchnorm(tmp_path):
    """Each rank updates BatchNorm statistics on its own shard; validation must still see one
    model everywhere, or the ranks disagree on the LR schedule and early stopping (a hang, or
    replicas trained at different rates)."""
    import torch.multiprocessing as mp

    raw = tiny_recipe(tmp_path / "runs", epochs=4, num_threads=1, batch_size=2, early_stopping=50)
    raw["model"]["head"]["params"] = {"hidden": 8, "dropout": 0.2, "batchnorm": True}
    raw["training"]["plateau"] = {"patience": 0, "factor": 0.5}
    mp.spawn(_train_rank, args=(2, free_port(), raw, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == 4
    assert ranks[0] == ranks[1]  # the same scores, so the same schedule, on every rank
