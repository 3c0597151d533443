"""Guards for the conformance kit (fusionkit.testing, `fusionkit plugins check`) and the
plugin building blocks: each test builds a component that breaks one contract on purpose
and asserts that the kit flags it, so that a weakened check (a tolerance loosened, a probe
compared with itself, a crash reported as a pass, a finding dropped) cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from typing import Any, ClassVar

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field, field_serializer
from torch import Tensor, nn

from fusionkit import plugin
from fusionkit.core.registry import PluginLoadWarning, Registry, load_registry
from fusionkit.testing import CHECKS, ConformanceReport, check_component
from tests.conftest import TinyDataset, TinyParams, make_distribution, user_cli
from tests.test_conformance import REGISTRY, LeakyFusion, LinearHead
from tests.test_plugin_trust import Base, EncBase, P, _fusion, _result, _shift_ahead


def only(*checks: str) -> list[str]:
    """``skip=`` that leaves ``build`` and ``checks`` (fast, focused on one contract)."""
    return [c for c in CHECKS["module"] if c not in ("build", *checks)]


def failure(report: ConformanceReport, check: str) -> str:
    """The message of the failed check ``check``; fails the test if it did not fail."""
    result = _result(report, check)
    assert result.status == "fail", report.format()
    assert not report.ok
    return result.message


def encoder(cls: type[nn.Module], *args: Any):
    return lambda p, *, in_dim, modality: cls(in_dim, *args)


class EncLinear(EncBase):
    """A per-frame linear encoder (conforms)."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.lin(x)


# ------------------------------------------------------------------ masking, batches


class SmallLeak(Base):
    """Adds a thousandth of the mean over all frames (padding included) to every frame."""

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        x = self.x(feats)
        return {"fused": (x + 1e-3 * x.mean(dim=1, keepdim=True)).unsqueeze(2)}


def test_a_small_padding_leak_fails_masking():
    """The masking tolerance is tight: a leak scaled by 1e-3 is still a leak."""
    report = plugin.check_fusion(_fusion(SmallLeak), P(), name="small", skip=only("masking"))
    assert "only padded frames changed" in failure(report, "masking")


class EncByLongest(EncBase):
    """Scales each item by the longest valid length in its batch: an item's output depends on
    the other items' lengths."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.lin(x) * mask.sum(1).max().to(x.dtype)


def test_dependence_on_the_other_items_lengths_fails_batch_independence():
    """Every item of the padded batch is compared with itself alone (the full first item is
    unaffected here: a shorter one is caught)."""
    report = plugin.check_encoder(
        encoder(EncByLongest), plugin.EmptyParams(), name="e", skip=only("batch-independence")
    )
    msg = failure(report, "batch-independence")
    assert "between a batch of 3 and the item alone" in msg and "batch item 0 " not in msg


# ------------------------------------------------------------------ crashes are failures


class StepCrash(EncLinear):
    def init_stream(self, batch: int, device: Any) -> None:
        return None

    def step(self, x: Tensor, state: None) -> tuple[Tensor, None]:
        raise RuntimeError("step is broken")


def test_a_check_that_crashes_is_a_failure_not_a_warning():
    """An unexpected exception inside a check (here from the component's ``step``) fails it."""
    report = plugin.check_encoder(
        encoder(StepCrash), plugin.EmptyParams(), name="e", skip=only("streaming")
    )
    assert failure(report, "streaming") == "encoder 'e': raised RuntimeError: step is broken"


def test_a_build_that_raises_fails_build_and_skips_every_other_check():
    def build(params, *, in_dim, modality):
        raise RuntimeError("weights missing")

    report = plugin.check_encoder(build, plugin.EmptyParams(), name="e")
    assert "raised RuntimeError: weights missing" in failure(report, "build")
    rest = [r for r in report.results if r.check != "build"]
    assert rest and {r.status for r in rest} == {"skip"}


def test_build_cannot_be_skipped():
    """Every other check needs the built module: ``skip=["build"]`` still builds."""
    report = plugin.check_encoder(
        encoder(EncLinear), plugin.EmptyParams(), skip=["build", *only("shapes")]
    )
    assert _result(report, "build").status == "pass", report.format()
    assert _result(report, "shapes").status == "pass" and report.ok


# ------------------------------------------------------------------ output contracts


class EncWide(EncBase):
    """Declares ``out_dim = 4`` but returns 5 features."""

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim)
        self.lin = nn.Linear(in_dim, 5)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.lin(x)


class HeadOneTooMany(LinearHead):
    def __init__(self, in_dim: int, n_targets: int) -> None:
        super().__init__(in_dim, n_targets + 1)


class HeadNaNFirstFrame(LinearHead):
    """NaN on frame 0, which is valid in every window."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x)
        return torch.cat([torch.full_like(y[:, :1], float("nan")), y[:, 1:]], dim=1)


def test_an_encoder_returning_more_features_than_out_dim_fails_shapes():
    report = plugin.check_encoder(
        encoder(EncWide), plugin.EmptyParams(), name="wide", in_dim=6, skip=only("shapes")
    )
    assert failure(report, "shapes") == (
        "encoder 'wide': expected output (B=1, T=1, D=4) for input (B=1, T=1, F=6); got (1, 1, 5)"
    )


@pytest.mark.parametrize(
    ("cls", "expect"),
    [
        (HeadOneTooMany, "expected output (B=1, T=1, n_targets=2) for input (B=1, T=1, D=24)"),
        (HeadNaNFirstFrame, "has 2 non-finite values on valid frames (B=1, T=1)"),
    ],
)
def test_a_head_with_a_wrong_width_or_nan_on_valid_frames_fails_shapes(cls, expect):
    def build(params, *, in_dim, n_targets):
        return cls(in_dim, n_targets)

    report = plugin.check_head(build, plugin.EmptyParams(), name="h", skip=only("shapes"))
    assert expect in failure(report, "shapes")


class EncTrimsToShortest(EncBase):
    """Cuts the window to the shortest item's valid length (right only without padding)."""

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.lin(x)[:, : int(mask.sum(1).min())]


def test_an_output_cut_to_the_shortest_item_fails_shapes_on_a_padded_batch():
    """The shape contract is also checked with padded masks (B=3, valid lengths 7, 5, 3)."""
    report = plugin.check_encoder(
        encoder(EncTrimsToShortest), plugin.EmptyParams(), name="e", skip=only("shapes")
    )
    assert failure(report, "shapes") == (
        "encoder 'e': expected output (B=3, T=7, D=4) for input (B=3, T=7, F=12); got (3, 3, 4)"
    )


class StepWeightsGate(nn.Module):
    """Per-step weights ``w`` (the same on every frame) for the first ``streams`` streams."""

    def __init__(self, in_dims: dict[str, int], w: list[float], streams: int) -> None:
        super().__init__()
        self.out_dim = sum(in_dims.values())
        self.w = nn.Parameter(torch.tensor(w))
        self.streams = streams

    def forward(self, stacks: dict[str, Tensor], mask: Tensor) -> plugin.GateOutput:
        w = self.w.expand(*mask.shape, -1)
        feats = torch.cat([(w.unsqueeze(-1) * stacks[s]).sum(2) for s in sorted(stacks)], -1)
        return plugin.GateOutput(feats, {s: w for s in sorted(stacks)[: self.streams]})


@pytest.mark.parametrize(
    ("w", "streams", "expect"),
    [
        ([1.5, -0.5, 0.0], 2, "weights of stream 'audio' must be non-negative; min -0.5"),
        ([0.335, 0.335, 0.335], 2, "must sum to 1 over the S=3 steps of every valid frame"),
        ([0.2, 0.3, 0.5], 1, "expected weights for streams ['audio', 'video']; got weights for"),
    ],
    ids=["negative", "sum-1.005", "one-stream-missing"],
)
def test_gate_weights_that_break_the_contract_fail_shapes(w, streams, expect):
    def build(params, *, in_dims, num_steps):
        return StepWeightsGate(in_dims, w, streams)

    report = plugin.check_gate(build, plugin.EmptyParams(), name="g", skip=only("shapes"))
    assert expect in failure(report, "shapes")


class PenultimateStepGate(nn.Module):
    """Takes step S-2 of every stack: fine for S = 3, no such step for S = 1."""

    def __init__(self, in_dims: dict[str, int]) -> None:
        super().__init__()
        self.out_dim = sum(in_dims.values())

    def forward(self, stacks: dict[str, Tensor], mask: Tensor) -> plugin.GateOutput:
        feats = torch.cat([stacks[s][:, :, -2] for s in sorted(stacks)], -1)
        steps = stacks[sorted(stacks)[0]].shape[2]
        w = nn.functional.one_hot(torch.full(mask.shape, steps - 2), steps).float()
        return plugin.GateOutput(feats, {s: w for s in stacks})


def test_a_gate_that_needs_several_steps_fails_the_single_stream_check():
    """Gates also get one stream ``fused`` with S = 1 (what a plain fusion produces)."""
    report = plugin.check_gate(
        lambda p, *, in_dims, num_steps: PenultimateStepGate(in_dims),
        plugin.EmptyParams(),
        name="g",
        skip=only("shapes", "shapes-single-stream"),
    )
    assert _result(report, "shapes").status == "pass", report.format()
    assert "with one stream 'fused' and S=1" in failure(report, "shapes-single-stream")


# ------------------------------------------------------------------ gradients


class GradFault(Base):
    """A per-frame fusion plus a scalar parameter ``spare``, broken as ``fault`` says."""

    def __init__(self, p: P, in_dims: dict[str, int], fault: str) -> None:
        super().__init__(p, in_dims)
        self.spare = nn.Parameter(torch.zeros(1))
        self.fault = fault

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        feats = dict(feats)
        if self.fault == "detached":
            feats["video"] = feats["video"].detach()
        if self.fault == "zeroed":
            feats["video"] = feats["video"] * 0
        x = self.x(feats)
        if self.fault == "dead-parameter":
            x = x + 0 * self.spare
        elif self.fault == "infinite-gradient":
            x = x + torch.sqrt(self.spare)  # d sqrt(z) / dz is infinite at z = 0
        else:
            x = x + self.spare
        return {"fused": x.unsqueeze(2)}


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ("detached", "no gradient reaches input(s) video (3, 7, 24) on valid frames"),
        ("zeroed", "no gradient reaches input(s) video (3, 7, 24) on valid frames"),
        ("dead-parameter", "all-zero gradient: spare"),
        ("infinite-gradient", "non-finite gradient: spare"),
    ],
)
def test_gradient_faults_fail_gradients(fault, expect):
    report = plugin.check_fusion(
        lambda p, *, in_dims: GradFault(p, in_dims, fault), P(), skip=only("gradients")
    )
    assert expect in failure(report, "gradients")


def test_a_fusion_whose_gradients_are_fine_passes_gradients():
    report = plugin.check_fusion(
        lambda p, *, in_dims: GradFault(p, in_dims, ""), P(), skip=only("gradients")
    )
    assert report.ok and _result(report, "gradients").status == "pass", report.format()


# ------------------------------------------------------------------ causal, determinism


class EncLookahead1(EncBase):
    """Claims ``receptive_field = 1`` but adds the next frame (the classic padding slip)."""

    receptive_field = 1

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x)
        return y + _shift_ahead(y, 1, mask)


def test_reading_one_frame_ahead_fails_the_causal_check():
    report = plugin.check_encoder(
        encoder(EncLookahead1), plugin.EmptyParams(), name="e", skip=only("causal")
    )
    msg = failure(report, "causal")
    assert "output 'features' at frame 0 changed" in msg
    assert "when only input frame 1 changed" in msg


class FrameLocalOverflow(Base):
    """Claims ``frame_local`` but adds ``0 * log(4 - max over time)``: a large value in one
    frame turns every output frame into NaN."""

    frame_local = True

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        x = self.x(feats)
        return {"fused": (x + 0 * torch.log(4.0 - x.amax(dim=1, keepdim=True))).unsqueeze(2)}


def test_an_output_frame_turned_nan_by_another_frame_fails_frame_local():
    """A NaN counts as a change: the check does not compare NaN as equal or skip it."""
    report = plugin.check_fusion(
        _fusion(FrameLocalOverflow), P(), name="f", skip=only("frame-local")
    )
    assert "declares frame_local = True, but output 'fused' at frames" in failure(
        report, "frame-local"
    )


class NoisyInTraining(EncLinear):
    """Adds noise from its own generator in train mode, seeded differently at each build."""

    builds: ClassVar[int] = 0

    def __init__(self, in_dim: int) -> None:
        super().__init__(in_dim)
        NoisyInTraining.builds += 1
        self.gen = torch.Generator().manual_seed(NoisyInTraining.builds)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x)
        if self.training:
            y = y + torch.randn(y.shape, generator=self.gen)
        return y


def test_train_mode_randomness_outside_the_torch_seed_fails_determinism():
    report = plugin.check_encoder(
        encoder(NoisyInTraining), plugin.EmptyParams(), name="e", skip=only("determinism")
    )
    assert "(train mode, same inputs and RNG state)" in failure(report, "determinism")


# ------------------------------------------------------------------ host syncs


class SyncNonzero(Base):
    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        assert mask.logical_not().nonzero().shape[1] == 2
        return super().forward(feats, mask)


class SyncEqual(Base):
    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        out = super().forward(feats, mask)
        if torch.equal(mask, torch.ones_like(mask)):  # a "no padding" fast path
            return out
        return {"fused": out["fused"] * mask[..., None, None]}


class SyncMaskedSelect(Base):
    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        x = self.x(feats)
        assert torch.masked_select(x, mask.unsqueeze(-1)).numel() % x.shape[-1] == 0
        return {"fused": x.unsqueeze(2)}


class SyncTrimToLongest(Base):
    """Drops the frames padded in every item with a boolean index on the time axis."""

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        keep = mask.any(0)  # every window here has a full item: nothing is dropped
        return {"fused": self.x(feats)[:, keep].unsqueeze(2)}


class SyncTolistThenBincount(Base):
    """Reads the lengths with ``.tolist()`` (seen only on fake tensors without a GPU), then
    runs ``bincount``, which fake tensors cannot: the read is found before the run ends."""

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        lengths = mask.sum(1)
        assert len(lengths.tolist()) == mask.shape[0]
        assert torch.bincount(lengths).shape[0] <= mask.shape[1] + 1
        return super().forward(feats, mask)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU and fake-tensor probes")
@pytest.mark.parametrize(
    ("cls", "expect"),
    [
        (SyncNonzero, "nonzero: output shape depends on the data"),
        (SyncEqual, "equal: returns a Python bool (torch.equal)"),
        (SyncMaskedSelect, "masked_select: output shape depends on the data"),
        (SyncTrimToLongest, "index: boolean-mask indexing: output shape depends on the data"),
        (SyncTolistThenBincount, "_local_scalar_dense: reads a value on the host"),
    ],
)
def test_host_syncs_are_named_in_the_warning(cls, expect):
    report = plugin.check_fusion(_fusion(cls), P(), name="s", skip=only("host-sync"))
    result = _result(report, "host-sync")
    assert result.status == "warn" and expect in result.message, report.format()


# ------------------------------------------------------------------ params


class RoundedParams(plugin.Params):
    scale: float = Field(0.25, description="output scale")

    @field_serializer("scale")
    def _one_decimal(self, v: float) -> float:
        return round(v, 1)


class Opaque:
    """A plain Python object: pydantic has no JSON Schema for it."""


class OpaqueParams(plugin.Params):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    hook: Opaque | None = Field(None, description="an optional callback object")


class BlankDescriptionParams(plugin.Params):
    width: int = Field(4, description="")


def _head(params: BaseModel) -> ConformanceReport:
    build = lambda p, *, in_dim, n_targets: LinearHead(in_dim, n_targets)  # noqa: E731
    return plugin.check_head(build, params, name="h", skip=only("params"))


def test_params_that_do_not_round_trip_fail():
    msg = failure(_head(RoundedParams()), "params")
    assert "is not a round trip" in msg and "scale=0.25" in msg


def test_params_without_a_json_schema_fail():
    assert "model_json_schema() failed" in failure(_head(OpaqueParams()), "params")


def test_a_blank_field_description_is_a_warning():
    result = _result(_head(BlankDescriptionParams()), "params")
    assert result.status == "warn" and result.message.endswith("editors): width")


def test_invalid_params_given_to_check_component_fail_it():
    report = check_component("fusion", "concat", {"normalize": "sometimes"}, registry=REGISTRY)
    msg = failure(report, "params")
    assert "params {'normalize': 'sometimes'} are invalid for" in msg


# ------------------------------------------------------------------ datasets, perturbations


class FaultyDataset(TinyDataset):
    def __init__(self, params: TinyParams, fault: str) -> None:
        super().__init__(params)
        self.fault = fault

    def videos(self, split: str) -> list[plugin.Video]:
        vids = super().videos(split)
        if self.fault == "empty-val" and split == "val":
            return []
        v = vids[0]
        if self.fault == "nan-label":
            labels = v.labels.clone()
            labels[0, 0] = float("nan")  # frame 0 is labelled
            vids[0] = dataclasses.replace(v, labels=labels)
        if self.fault == "nan-feature":
            audio = v.features["audio"].clone()
            audio[3, 0] = float("nan")
            vids[0] = dataclasses.replace(v, features={**v.features, "audio": audio})
        if self.fault == "zero-fps":
            vids[0] = dataclasses.replace(v, fps=0.0)
        if self.fault == "uint8-mask":
            vids[0] = dataclasses.replace(v, label_mask=v.label_mask.to(torch.uint8))
        if self.fault == "repeated-name":
            vids[1] = dataclasses.replace(vids[1], name=v.name)
        if self.fault == "global-rng":
            audio = v.features["audio"] + torch.randn(v.features["audio"].shape)
            vids[0] = dataclasses.replace(v, features={**v.features, "audio": audio})
        return vids


@pytest.mark.parametrize(
    ("fault", "check", "expect"),
    [
        ("nan-label", "videos", "video 0 ('train_0'): labels are not finite on labelled frames"),
        ("nan-feature", "videos", "video 0 ('train_0'): features['audio']"),
        ("zero-fps", "videos", "fps must be a positive number; got 0.0"),
        ("uint8-mask", "videos", "label_mask must be bool"),
        ("repeated-name", "videos", "video names must be unique; repeated: train_0"),
        ("empty-val", "videos", "split 'val' has no videos"),
        ("global-rng", "determinism", "differs between two builds with the same params"),
    ],
)
def test_dataset_faults_are_caught(fault, check, expect):
    def build(params: TinyParams) -> FaultyDataset:
        return FaultyDataset(params, fault)

    report = plugin.check_dataset(build, TinyParams(videos=2), name="d")
    msg = failure(report, check)
    assert expect in msg
    if fault == "nan-feature":
        assert msg.endswith("has non-finite values")


class Perturb:
    """Audio noise from the given generator, broken as ``fault`` says."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def __call__(self, video: plugin.Video, generator: torch.Generator) -> plugin.Video:
        audio = video.features["audio"]
        gen = None if self.fault == "global-rng" else generator
        audio = audio + 0.1 * torch.randn(audio.shape, generator=gen)
        if self.fault == "narrow-audio":
            audio = audio[:, :4]
        if self.fault == "label-mask-in-place":
            video.label_mask[:3] = False
        return dataclasses.replace(video, features={**video.features, "audio": audio})


@pytest.mark.parametrize(
    ("fault", "check", "expect"),
    [
        ("global-rng", "determinism", "draw all randomness from the given generator"),
        ("narrow-audio", "apply", "features['audio'] must be float (N=40, F=6)"),
        ("label-mask-in-place", "out-of-place", "perturbations work out of place"),
    ],
)
def test_perturbation_faults_are_caught(fault, check, expect):
    report = plugin.check_perturbation(lambda p: Perturb(fault), plugin.EmptyParams(), name="p")
    assert expect in failure(report, check)


def test_a_correct_perturbation_passes():
    report = plugin.check_perturbation(lambda p: Perturb(""), plugin.EmptyParams(), name="p")
    assert report.ok and {r.status for r in report.results} == {"pass"}, report.format()


# ------------------------------------------------------------------ `fusionkit plugins`


class ScaleParams(BaseModel):
    """A plain pydantic model (not plugin.Params): it lets NaN through."""

    model_config = ConfigDict(extra="forbid")
    scale: float = Field(1.0, description="output scale")


def build_scaled(params: ScaleParams, *, in_dims: dict[str, int]) -> nn.Module:
    return Base(P(), in_dims)


@pytest.fixture
def cli(monkeypatch, capsys):
    reg = Registry()
    reg.add("fusion", "plain", build=lambda p, *, in_dims: Base(P(), in_dims))
    reg.add("fusion", "syncing", build=lambda p, *, in_dims: SyncNonzero(P(), in_dims))
    reg.add("fusion", "leaky", build=lambda p, *, in_dims: LeakyFusion(in_dims))
    reg.add("fusion", "scaled", build=build_scaled)
    yield from user_cli(monkeypatch, capsys, reg)


#: ``--skip`` options leaving the checks the CLI tests need (masking, host-sync).
FAST = [a for c in only("masking", "host-sync") for a in ("--skip", c)]


def test_plugins_check_of_several_components_shows_failures_and_warnings(cli):
    """Without ``--verbose`` the report of several components still lists each failed and
    warned check, and marks the failed component FAIL."""
    code, out, err = cli("plugins", "check", "fusion", *FAST)
    text = " ".join(out.split())
    assert code == 1, out + err
    assert "FAIL fusion 'leaky' <direct> :" in text and "ok fusion 'plain' <direct> :" in text
    assert "WARN host-sync fusion 'syncing':" in text and "nonzero" in text
    assert "3 of 4 components conform: failed fusion 'leaky'" in text


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["plain", "--kind", "gate"], "no gate named 'plain'"),
        (["plain", "--skip", "shape"], "unknown check 'shape' (did you mean 'shapes'?)"),
        (["plain", "--all", *FAST], "give either a NAME or --all, not both"),
        (["fusion", "--params", "{}", *FAST], "--params applies to one component; 4 match"),
        (
            ["scaled", "--params", '{"scale": NaN}'],
            "scale: must be finite numbers (not NaN or Infinity)",
        ),
    ],
    ids=["kind", "skip-typo", "name-and-all", "params-for-many", "params-nan"],
)
def test_plugins_check_usage_errors(cli, args, expect):
    code, out, err = cli("plugins", "check", *args)
    assert code == 2 and expect in err, out + err


def test_plugins_list_marks_a_fusionkit_requirement_this_version_does_not_meet(
    tmp_path, monkeypatch, capsys
):
    make_distribution(tmp_path, "fk-future", "fkkit_future", "x = 1\n")
    meta = tmp_path / "fk_future-0.3.dist-info" / "METADATA"
    meta.write_text(meta.read_text() + "Requires-Dist: fusionkit>=99\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fkkit_future", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        reg = load_registry(strict=False)
    run = user_cli(monkeypatch, capsys, reg)
    invoke = next(run)
    code, out, _ = invoke("plugins", "list")
    next(run, None)
    text = " ".join(out.split())
    assert code == 0 and "fk-future 0.3" in text
    assert "requires fusionkit>=99 (NOT this version)" in text


# ------------------------------------------------------------------ layers


def test_check_shapes_requires_one_batch_and_window_length():
    x = {"audio": torch.zeros(2, 5, 8), "video": torch.zeros(2, 6, 16)}
    sizes = {"audio": {"d": 8}, "video": {"d": 16}}
    with pytest.raises(plugin.ShapeError, match=r"\(one B, T\); received .*'video': \(2, 6, 16\)"):
        plugin.check_shapes("fusion 'f'", x, "b t d", sizes)


def test_check_shape_checks_every_known_size():
    with pytest.raises(plugin.ShapeError, match=r"expected x \(B, T=5, D=4\); got \(2, 5, 8\)"):
        plugin.check_shape("fusion 'f'", "x", torch.zeros(2, 5, 8), "b t d", t=5, d=4)


def test_check_mask_requires_the_features_batch_and_length():
    with pytest.raises(plugin.ShapeError, match=r"mask must be \(B, T\) = \(2, 5\) .*got \(2, 4\)"):
        plugin.check_mask("encoder 'e'", torch.zeros(2, 5, 8), torch.ones(2, 4, dtype=torch.bool))


def test_shifted_bilstm_rejects_a_time_first_lstm():
    lstm = nn.LSTM(3, 4, bidirectional=True)  # batch_first=False: rows would be read as time
    with pytest.raises(ValueError, match="batch_first=False"):
        plugin.shifted_bilstm(lstm, torch.ones(2, 5, 3), torch.ones(2, 5, dtype=torch.bool))


def test_every_public_name_of_the_plugin_namespace_is_in_all():
    """``from fusionkit.plugin import *`` gives everything the namespace re-exports."""
    public = {
        n
        for n, v in vars(plugin).items()
        if not n.startswith("_") and not inspect.ismodule(v) and n != "annotations"
    }
    assert public == set(plugin.__all__)
