"""Shared fixtures: a tiny in-test dataset registered next to the installed plugins.

Tests run torch on one thread (and so do the processes they start): on a busy 2-core machine
two threads per process can be many times slower than one.
"""

from __future__ import annotations

import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # xdist sets a terminal size of 80 x 24 in its
    # workers, which would fix the width of every console fusionkit prints with; the tests
    # that read tables set COLUMNS themselves, as in a serial run
    for _name in ("COLUMNS", "LINES"):
        os.environ.pop(_name, None)
import textwrap
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from pydantic import BaseModel, Field

from fusionkit.core.interfaces import Video
from fusionkit.core.registry import Registry, load_registry

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


class TinyParams(BaseModel):
    model_config = {"extra": "forbid"}
    seed: int = 0
    videos: int = Field(5, ge=1)


class TinyDataset:
    """Random-walk latents observed by two noisy modalities; a few unlabelled frames."""

    feature_dims: ClassVar[dict[str, int]] = {"audio": 6, "video": 5}
    targets = ("valence", "arousal")

    def __init__(self, params: TinyParams) -> None:
        self.params = params

    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "test")

    def videos(self, split: str) -> list[Video]:
        offset = {"train": 0, "val": 1, "test": 2}[split]
        g = torch.Generator().manual_seed(self.params.seed * 10 + offset)
        out = []
        for i in range(self.params.videos):
            n = int(torch.randint(120, 400, (1,), generator=g))
            lat = (torch.cumsum(torch.randn(n, 2, generator=g) * 0.15, 0)).tanh()
            audio = lat[:, 1:2].repeat(1, 6) + 0.4 * torch.randn(n, 6, generator=g)
            video = lat[:, 0:1].repeat(1, 5) + 0.4 * torch.randn(n, 5, generator=g)
            mask = torch.ones(n, dtype=torch.bool)
            mask[10:15] = False
            out.append(Video(f"{split}_{i}", {"audio": audio, "video": video}, lat, mask))
        return out


def make_registry() -> Registry:
    reg = load_registry(strict=True)
    reg.add("dataset", "tiny", build=TinyDataset, params=TinyParams, summary="test data")
    return reg


@pytest.fixture(scope="session")
def registry() -> Registry:
    return make_registry()


def tiny_recipe(tmp_path: Path, **training) -> dict:
    return {
        "name": "tiny",
        "data": {"name": "tiny", "params": {"seed": 0}, "window": 64, "hop": 48},
        "model": {
            "encoders": {
                "audio": {"name": "linear", "params": {"dim": 8}},
                "video": {"name": "linear", "params": {"dim": 8}},
            },
            "fusion": {"name": "concat"},
            "gate": {"name": "last"},
            "head": {"name": "regression", "params": {"hidden": 8, "dropout": 0.2}},
        },
        "training": {"epochs": 4, "batch_size": 4, "lr": 3e-3, "seed": 0, **training},
        "evaluation": {"splits": ["val", "test"], "batch_size": 8},
        "output": {"dir": str(tmp_path)},
    }


def make_distribution(root: Path, dist: str, module: str, source: str) -> None:
    """Install a throwaway distribution (dist-info + module) into ``root`` on sys.path."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"  # PEP 427 escaping
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[fusionkit]\n{module} = {module}\n")


TINY_PLUGIN = """
from fusionkit.plugin import hookimpl
from tests.conftest import TinyDataset, TinyParams

@hookimpl
def fusionkit_register_components(registry):
    registry.add("dataset", "tiny", build=TinyDataset, params=TinyParams)
"""


def tiny_plugin_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a `fusionkit` subprocess that sees the `tiny` dataset as an installed
    third-party plugin (a throwaway distribution on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    make_distribution(site, "fk-tiny", "fk_tiny", TINY_PLUGIN)
    return dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", **extra)


def hears_ctrl_c() -> None:
    """``preexec_fn`` for a subprocess a test interrupts with SIGINT: SIGINT back to its default.

    A test runner started as a background job of a script (``pytest ... &`` in a subshell, as
    some CI and agent shells do) runs with SIGINT ignored, and its children inherit that across
    exec (POSIX): such a ``fusionkit`` process rightly ignores SIGINT, as a background job
    should, and a test of its Ctrl-C behaviour would wait for a stop that never comes."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def flagged_gate_recipe(tmp_path: Path) -> dict:
    """A two-seed grid (folder ``tmp_path / "tiny"``) of a gated model (``modality_stack`` +
    ``moe_gate``) on synthetic data whose unreliable spans are flagged frames."""
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["data"] = {
        "name": "synthetic",
        "params": {"seed": 5, "num_train": 2, "num_val": 1, "num_test": 3, "min_frames": 100,
                   "max_frames": 140, "audio_dim": 8, "video_dim": 8, "reliability_rate": 0.4},
        "window": 64,
        "hop": 48,
    }  # fmt: skip
    raw["model"]["fusion"] = {"name": "modality_stack", "params": {"dim": 8}}
    raw["model"]["gate"] = {"name": "moe_gate", "params": {"hidden": 8, "reliability_hidden": 8}}
    raw["sweep"] = {"training.seed": [0, 1]}
    return raw


def user_cli(monkeypatch, capsys, registry: Registry):
    """Generator for a fixture that runs the `fusionkit` entry point in this process as a user
    does (errors as one line, exit 2) with ``registry`` installed; each call returns (exit
    code, stdout, stderr with whitespace collapsed). Use as ``yield from user_cli(...)``."""
    import sys

    import fusionkit.cli.root as root
    import fusionkit.core.registry as fk_registry

    fk_registry.clear_registry_cache()
    monkeypatch.setattr(fk_registry, "load_registry", lambda strict=None: registry)

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["fusionkit", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            root.main()
        out = capsys.readouterr()
        return info.value.code or 0, out.out, " ".join(out.err.split())

    yield invoke
    fk_registry.clear_registry_cache()


@pytest.fixture
def cli(monkeypatch, capsys, registry):
    """The `fusionkit` entry point in this process with the `tiny` dataset (:func:`user_cli`);
    a test module that needs other components defines its own ``cli``."""
    yield from user_cli(monkeypatch, capsys, registry)


def np_ccc(x, y) -> float:
    """Lin's CCC with population moments, in numpy, written independently of fusionkit."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cov = np.mean((x - x.mean()) * (y - y.mean()))
    return float(2 * cov / (x.var() + y.var() + (x.mean() - y.mean()) ** 2))


def tiny_stream_run(
    parent: Path,
    registry: Registry,
    *,
    data: dict | None = None,
    frames: int = 60,
    **training,
):
    """A complete 1-epoch tiny run under ``parent/runs`` with a causal ``tcn`` audio encoder
    and z-scored features (``data`` updates the data block, e.g. its window), and the first
    ``frames`` frames of its first test video saved as ``parent/video.safetensors``:
    ``(run path, features file, the whole video)``."""
    from safetensors.torch import save_file

    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer

    raw = tiny_recipe(parent / "runs", epochs=1, **training)
    raw["model"]["encoders"]["audio"] = {"name": "tcn", "params": {"channels": [4, 4]}}
    raw["data"].update(normalize="zscore", **(data or {}))
    rc = validate_recipe(raw, "r.yaml", registry)
    with RunDir.create(rc, registry) as run:
        Trainer(build_session(rc, registry), run).fit()
    video = TinyDataset(TinyParams()).videos("test")[0]
    feats = parent / "video.safetensors"
    save_file({m: x[:frames].contiguous() for m, x in video.features.items()}, str(feats))
    return run.path, feats, video


def eval_model(tmp_path: Path, registry: Registry, window: int = 64, **model):
    """The tiny recipe's model (``model`` updates its model block) in eval mode, built with
    seed 0 for the tiny dataset's feature sizes, ``data.window`` = ``data.hop`` = ``window``."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.model import build_model

    raw = tiny_recipe(tmp_path)
    raw["data"].update(window=window, hop=window)
    raw["model"].update(model)
    rc = validate_recipe(raw, "tiny", registry)
    torch.manual_seed(0)
    return build_model(rc, dict(TinyDataset.feature_dims), registry).eval()


def stream_frames(sp, xs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """Push the first ``n`` frames of ``xs`` through a streaming predictor, one at a time."""
    return torch.stack([sp.push({m: x[t] for m, x in xs.items()}) for t in range(n)])


def assert_streams_trailing_windows(model, xs, online, context: int, times) -> None:
    """Each streamed prediction ``online[t]`` is the model's offline prediction for the last
    frame of the window of (at most) ``context`` frames that ends at frame ``t``."""
    with torch.no_grad():
        for t in times:
            lo = max(0, t - context + 1)
            win = {m: x[lo : t + 1][None] for m, x in xs.items()}
            ref = model(win, torch.ones(1, t + 1 - lo, dtype=torch.bool)).pred[0, -1]
            torch.testing.assert_close(online[t], ref, atol=1e-5, rtol=1e-5)


class CliResult:
    """What an in-process `fusionkit` call gave: exit status, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli_inproc(monkeypatch, capsys):
    """Run the CLI in this process (no interpreter start-up) with the in-test `tiny`
    dataset registered, like the installed plugins."""
    import sys

    import fusionkit.core.registry as fk_registry

    fk_registry.clear_registry_cache()
    monkeypatch.setattr(fk_registry, "load_registry", lambda strict=None: make_registry())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def run(args):
        from fusionkit.cli import root

        monkeypatch.setattr(sys, "argv", ["fusionkit", *args])
        capsys.readouterr()
        try:
            root.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    yield run
    fk_registry.clear_registry_cache()
