"""The conformance kit: every built-in component passes it, and it catches broken components."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn

from fusionkit.core.errors import PluginError
from fusionkit.core.interfaces import GateOutput, Video
from fusionkit.core.registry import (
    EmptyParams,
    PluginLoadWarning,
    load_registry,
    raise_for_failures,
)
from fusionkit.testing import (
    ConformanceReport,
    check_component,
    check_dataset,
    check_encoder,
    check_fusion,
    check_gate,
    check_head,
    check_perturbation,
)
from tests.conftest import REPO
from tests.test_plugins import make_distribution

REGISTRY = load_registry(strict=True)
BUILTINS = [c for c in REGISTRY.components() if c.distribution == "fusionkit"]


def _failure(report: ConformanceReport, check: str) -> str:
    """The message of failed check ``check``; fails the test if it did not fail."""
    result = {r.check: r for r in report.results}[check]
    assert result.status == "fail", report.format()
    return result.message


# ------------------------------------------------------------------ built-ins conform


#: Smaller than default params where the defaults only cost time.
FAST_PARAMS = {
    ("dataset", "synthetic"): {
        "num_train": 3,
        "num_val": 2,
        "num_test": 2,
        "min_frames": 40,
        "max_frames": 80,
    }
}


@pytest.mark.parametrize("comp", BUILTINS, ids=[f"{c.kind}-{c.name}" for c in BUILTINS])
def test_builtin_component_conforms(comp):
    """Every built-in passes (a dataset whose params have no defaults is reported as skipped)."""
    params = FAST_PARAMS.get((comp.kind, comp.name))
    report = check_component(comp.kind, comp.name, params, registry=REGISTRY)
    report.assert_ok()
    assert report.distribution == "fusionkit"
    if comp.kind in {"encoder", "fusion", "gate", "head"}:
        statuses = {r.check: r.status for r in report.results}
        assert statuses["shapes"] == statuses["gradients"] == statuses["masking"] == "pass"


@pytest.mark.parametrize(
    ("kind", "name", "params"),
    [
        ("fusion", "rjca", {"mode": "faithful", "length": 20}),
        ("fusion", "rjca", {"share_weights": True, "recursions": 3, "correlation": "mean"}),
        ("encoder", "tcn", {"channels": [8, 16], "batchnorm": False}),
        ("gate", "tagf_temporal", {"source": "mean", "relu": True}),
        ("head", "regression", {"batchnorm": False, "tanh": False}),
    ],
)
def test_builtin_variants_conform(kind, name, params):
    check_component(kind, name, params, registry=REGISTRY).assert_ok()


def test_released_unmasked_rjca_is_reported_as_leaking_padding():
    """``mask_padding: false`` reproduces the released code, which sums over padded frames."""
    report = check_component("fusion", "rjca", {"mask_padding": False}, registry=REGISTRY)
    msg = _failure(report, "masking")
    assert "fusion 'rjca': output" in msg and "only padded frames changed" in msg


# --------------------------------------------------------------- the kit catches faults


class NoParams(BaseModel):
    model_config: ClassVar = {"extra": "forbid"}


class FlatFusion(nn.Module):
    """Returns (B, T, D) instead of the (B, T, S, D) stack."""

    num_steps, fixed_length = 1, None

    def __init__(self, in_dims: dict[str, int]) -> None:
        super().__init__()
        self.out_dims = dict(in_dims)
        self.proj = nn.ModuleDict({m: nn.Linear(d, d) for m, d in in_dims.items()})

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {m: self.proj[m](x) for m, x in feats.items()}


def test_wrong_fusion_shape_names_stream_axes_and_shape():
    report = check_fusion(lambda p, *, in_dims: FlatFusion(in_dims), NoParams(), name="flat")
    msg = _failure(report, "shapes")
    want = "fusion 'flat': expected output stream 'audio' (B=1, T=1, S=1, D=16); got (1, 1, 16)"
    assert msg == want
    assert {r.status for r in report.results[3:]} == {"skip"}


class LeakyFusion(FlatFusion):
    """Adds the mean over *all* frames (padding included) to every frame."""

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {m: (x + x.mean(dim=1, keepdim=True)).unsqueeze(2) for m, x in feats.items()}


def test_padding_leak_is_caught():
    report = check_fusion(lambda p, *, in_dims: LeakyFusion(in_dims), NoParams(), name="leaky")
    assert "only padded frames changed" in _failure(report, "masking")
    assert "only padded frames changed" in _failure(report, "masking-train")
    # the unused `proj` Linear gets no gradient
    assert "no gradient (unused in forward?): proj.audio.weight" in _failure(report, "gradients")


class SigmoidGate(nn.Module):
    """Weights in (0, 1) that do not sum to 1."""

    def __init__(self, in_dims: dict[str, int], num_steps: int) -> None:
        super().__init__()
        self.score = nn.ModuleDict({s: nn.Linear(d, 1) for s, d in in_dims.items()})
        self.out_dim = sum(in_dims.values())

    def forward(self, stacks: dict[str, Tensor], mask: Tensor) -> GateOutput:
        weights = {s: torch.sigmoid(self.score[s](x)).squeeze(-1) for s, x in stacks.items()}
        feats = [(weights[s].unsqueeze(-1) * x).sum(2) for s, x in sorted(stacks.items())]
        return GateOutput(torch.cat(feats, dim=-1), weights)


def test_gate_weights_must_sum_to_one():
    build = lambda p, *, in_dims, num_steps: SigmoidGate(in_dims, num_steps)  # noqa: E731
    msg = _failure(check_gate(build, NoParams(), name="sig"), "shapes")
    assert msg.startswith("gate 'sig': weights of stream 'audio' must sum to 1 over the S=3 steps")


class Quirky(nn.Module):
    """Encoder with the classic mistakes, each switchable."""

    def __init__(self, in_dim: int, fault: str) -> None:
        super().__init__()
        self.fault = fault
        self.lin = nn.Linear(in_dim, 4)
        self.out_dim = 4
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self.offset = torch.randn(4, generator=gen if fault == "unseeded" else None)
        if fault == "unseeded":
            self.register_buffer("noise", self.offset.clone())

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x) + self.offset
        if self.fault == "inplace":
            x.mul_(2)
        if self.fault == "batchmix":
            y = y - y.mean(dim=0, keepdim=True)
        if self.fault == "float64":
            y = y.double()
        return y


@pytest.mark.parametrize(
    ("fault", "check", "expect"),
    [
        ("inplace", "shapes", "forward modified its inputs in place: ['x']"),
        ("batchmix", "batch-independence", "of batch item 0 differs by up to"),
        ("float64", "shapes", "has dtype torch.float64; expected torch.float32"),
        ("unseeded", "determinism", "two builds under torch seed 0 differ in ['noise']"),
        ("none", "safetensors", "after a safetensors state-dict round trip"),
    ],
)
def test_module_faults_are_caught(fault, check, expect):
    report = check_encoder(
        lambda p, *, in_dim, modality: Quirky(in_dim, fault), NoParams(), name="q"
    )
    assert expect in _failure(report, check)


def test_false_frame_local_claim_fails_and_true_one_passes():
    registry = load_registry(strict=True)
    comp = registry.get("gate", "tagf_temporal")  # a BiLSTM over time: not frame-local

    def claiming(params, *, in_dims, num_steps):
        gate = comp.build(params, in_dims=in_dims, num_steps=num_steps)
        gate.frame_local = True
        return gate

    msg = _failure(check_gate(claiming, comp.params(), name="claim"), "frame-local")
    assert "declares frame_local = True, but output 'features' at frame" in msg
    report = check_component("gate", "tagf", registry=registry)
    assert {r.check: r.status for r in report.results}["frame-local"] == "pass"


class Syncing(nn.Module):
    """Encoder that reads a value on the host and indexes with a boolean mask."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, 4)
        self.out_dim = 4

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x)
        if bool(mask.all()):
            return y
        out = torch.zeros_like(y)
        out[mask] = y[mask]
        return out


def test_host_syncs_are_reported_as_a_warning_naming_the_ops():
    report = check_encoder(lambda p, *, in_dim, modality: Syncing(in_dim), NoParams(), name="s")
    result = {r.check: r for r in report.results}["host-sync"]
    assert result.status == "warn" and report.ok
    assert "_local_scalar_dense: reads a value on the host" in result.message
    assert "boolean-mask indexing" in result.message


def test_build_must_return_a_module_and_failures_skip_the_rest():
    report = check_head(lambda p, *, in_dim, n_targets: "nope", NoParams(), name="h")
    assert "build returned str; expected a torch.nn.Module" in _failure(report, "build")
    assert all(r.status == "skip" for r in report.results[1:])
    with pytest.raises(AssertionError, match="head 'h'"):
        report.assert_ok()


class LooseParams(BaseModel):
    width: int = 4


class LinearHead(nn.Module):
    def __init__(self, in_dim: int, n_targets: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, n_targets)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.lin(x)


def test_params_without_extra_forbid_fail_and_missing_descriptions_warn():
    build = lambda p, *, in_dim, n_targets: LinearHead(in_dim, n_targets)  # noqa: E731
    report = check_head(build, LooseParams(), name="lin", skip=["bf16-cpu"])
    assert "accepts unknown keys; set model_config = {'extra': 'forbid'}" in _failure(
        report, "params"
    )

    class Undocumented(BaseModel):
        model_config = {"extra": "forbid"}
        width: int = 4

    report = check_head(build, Undocumented(), name="lin")
    result = {r.check: r for r in report.results}["params"]
    assert result.status == "warn" and "fields without a description" in result.message
    assert report.ok


def test_skip_ids_are_validated():
    with pytest.raises(ValueError, match="unknown check id"):
        check_component("gate", "last", registry=REGISTRY, skip=["shape"])


def test_required_params_without_values_are_skipped_not_failed():
    class Needs(BaseModel):
        model_config = {"extra": "forbid"}
        root: str = Field(description="data folder")

    reg = load_registry(strict=True)
    reg.add("dataset", "needs_root", build=lambda p: None, params=Needs)
    report = check_component("dataset", "needs_root", registry=reg)
    assert report.ok and report.results[0].status == "skip"
    assert "pass params" in report.results[0].message


# ------------------------------------------------------------ datasets, perturbations


class BadDataset:
    feature_dims: ClassVar = {"audio": 3}
    targets = ("valence", "arousal")

    def __init__(self, params: Any) -> None:
        pass

    def splits(self) -> tuple[str, ...]:
        return ("train",)

    def videos(self, split: str) -> list[Video]:
        n = 10
        feats = {"audio": torch.zeros(n + 1, 3)}
        return [Video("v", feats, torch.zeros(n, 2), torch.ones(n, dtype=torch.bool))]


def test_dataset_record_mismatch_and_unknown_split_are_caught():
    report = check_dataset(BadDataset, EmptyParams(), name="bad")
    assert "features['audio'] must be float (N=10, F=3) like the labels' N; got (11, 3)" in (
        _failure(report, "videos")
    )
    assert "an unknown split must raise" in _failure(report, "unknown-split")


class InPlaceNoise:
    def __init__(self, params: Any) -> None:
        pass

    def __call__(self, video: Video, generator: torch.Generator) -> Video:
        audio = video.features["audio"]
        audio.add_(torch.randn(audio.shape, generator=generator))
        return video


def test_perturbation_writing_into_its_input_is_caught():
    report = check_perturbation(InPlaceNoise, EmptyParams(), name="inplace")
    assert "perturbations work out of place" in _failure(report, "out-of-place")


# ------------------------------------------------------------------------ strict mode


def test_raise_for_failures_names_each_skipped_plugin(tmp_path, monkeypatch):
    make_distribution(tmp_path, "fk-gone", "fk_gone", "raise ImportError('gone')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(PluginLoadWarning, match="fk-gone"):
        reg = load_registry(strict=False)
    with pytest.raises(PluginError, match=r"plugin 'fk_gone' from distribution 'fk-gone' 0.3"):
        raise_for_failures(reg)
    raise_for_failures(REGISTRY)  # nothing failed: no error


# ------------------------------------------------------------------------------- CLI

BAD_GATE_PLUGIN = """
import torch
from torch import nn

from fusionkit.plugin import GateOutput, hookimpl

class SigmoidGate(nn.Module):  # weights in (0, 1) that do not sum to 1
    def __init__(self, in_dims, num_steps):
        super().__init__()
        self.score = nn.ModuleDict({s: nn.Linear(d, 1) for s, d in in_dims.items()})
        self.out_dim = sum(in_dims.values())

    def forward(self, stacks, mask):
        weights = {s: torch.sigmoid(self.score[s](x)).squeeze(-1) for s, x in stacks.items()}
        feats = [(weights[s].unsqueeze(-1) * x).sum(2) for s, x in sorted(stacks.items())]
        return GateOutput(torch.cat(feats, dim=-1), weights)

@hookimpl
def fusionkit_register_components(registry):
    registry.add("gate", "fkbad_sigmoid",
                 build=lambda p, *, in_dims, num_steps: SigmoidGate(in_dims, num_steps))
"""


def _fk(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fusionkit", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_plugins_check_and_list_cli(tmp_path):
    make_distribution(tmp_path, "fk-badgate", "fk_badgate", BAD_GATE_PLUGIN)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}", COLUMNS="200")
    ok = _fk(["plugins", "check", "last", "--skip", "bf16-cpu"], env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "1 of 1 components conform" in ok.stdout
    bad = _fk(["plugins", "check", "fk-badgate", "--json"], env)
    assert bad.returncode == 1, bad.stderr
    (report,) = json.loads(bad.stdout)
    assert (report["name"], report["distribution"], report["ok"]) == (
        "fkbad_sigmoid",
        "fk-badgate",
        False,
    )
    listed = json.loads(_fk(["plugins", "list", "--json"], env).stdout)
    dists = {d["name"]: d for d in listed["distributions"]}
    assert [(c["kind"], c["name"]) for c in dists["fk-badgate"]["components"]] == [
        ("gate", "fkbad_sigmoid")
    ]
    assert dists["fk-badgate"]["version"] == "0.3"
    assert {"fusion", "gate"} <= {c["kind"] for c in dists["fusionkit"]["components"]}
    usage = _fk(["plugins", "check", "lats"], env)
    assert usage.returncode == 2 and "did you mean 'last'" in usage.stderr


class _CumSum(nn.Module):
    """Claims a receptive field of 2 frames but sums over every past frame; its step form
    forgets the running sum (so stepping differs from forward)."""

    receptive_field = 2

    def __init__(self, in_dim: int, broken_step: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, 4)
        self.out_dim = 4
        self.broken_step = broken_step

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return torch.cumsum(self.lin(x), dim=1)

    def init_stream(self, batch: int, device: Any) -> Tensor:
        return torch.zeros(batch, 4)

    def step(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        y = self.lin(x) + (0 if self.broken_step else state)
        return y, y


def test_false_receptive_field_and_streaming_claims_fail():
    from fusionkit.core.params import EmptyParams

    def build(params, *, in_dim, modality):
        return _CumSum(in_dim)

    report = check_encoder(build, EmptyParams(), name="cumsum")
    results = {r.check: r for r in report.results}
    assert results["causal"].status == "fail"
    assert "declares receptive_field = 2" in results["causal"].message
    assert results["streaming"].status == "pass"  # the running sum is carried: it is exact

    def broken(params, *, in_dim, modality):
        return _CumSum(in_dim, broken_step=True)

    results = {r.check: r for r in check_encoder(broken, EmptyParams(), name="x").results}
    assert results["streaming"].status == "fail"
    assert "step() frame by frame" in results["streaming"].message


LSTM_ENCODER = """
import torch
from torch import nn
from fusionkit.plugin import EmptyParams, check_encoder, run_lstm

class Enc(nn.Module):
    out_dim = 8

    def __init__(self, in_dim, through_helper):
        super().__init__()
        self.lstm = nn.LSTM(in_dim, 4, bidirectional=True, batch_first=True)
        self.through_helper = through_helper

    def forward(self, x, mask):
        h, _ = run_lstm(self.lstm, x) if self.through_helper else self.lstm(x)
        return h * mask[..., None].to(h.dtype)

for helper in (False, True):
    def build(params, *, in_dim, modality, helper=helper):
        return Enc(in_dim, helper)

    report = check_encoder(build, EmptyParams(), name="mine", skip=["masking", "masking-train"])
    print(helper, [(r.status, r.message) for r in report.results if r.check == "bf16-cpu"])
"""


def test_an_lstm_plugin_on_a_cpu_without_bf16_lstm_is_told_to_use_run_lstm():
    """On a processor without a bf16 LSTM kernel (oneDNN capped at AVX2 here), a plugin that
    calls its nn.LSTM directly fails ``bf16-cpu`` with a hint naming ``plugin.run_lstm``; the
    same plugin calling it through ``run_lstm`` passes."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", LSTM_ENCODER], env=env, capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    direct, helper = done.stdout.strip().splitlines()
    assert direct.startswith("False [('fail',") and "plugin.run_lstm(lstm, x, hx)" in direct
    assert helper == "True [('pass', '')]", helper
