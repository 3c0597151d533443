"""What a plugin author meets: the kit's claims checks, host syncs it finds, and plugins that
are broken in the ways authors break them (each skipped with one clear line)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from pydantic import Field
from torch import Tensor, nn

from fusionkit import plugin
from fusionkit.core.errors import PluginError, RecipeError
from fusionkit.core.registry import PluginLoadWarning, Registry, load_registry
from fusionkit.testing import check_registry, simulated_host_syncs
from tests.conftest import user_cli

# ------------------------------------------------------------------ components


class P(plugin.Params):
    dim: int = Field(8, ge=1, description="width")


class Base(nn.Module):
    """A per-frame fusion: one linear projection of the concatenated modalities."""

    fixed_length = None

    def __init__(self, p: P, in_dims: dict[str, int]) -> None:
        super().__init__()
        self.mods = sorted(in_dims)
        self.proj = nn.Linear(sum(in_dims.values()), p.dim)
        self.out_dims = {"fused": p.dim}
        self.num_steps = 1

    def x(self, feats: dict[str, Tensor]) -> Tensor:
        return self.proj(torch.cat([feats[m] for m in self.mods], -1))

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        return {"fused": self.x(feats).unsqueeze(2)}


class EncBase(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, 4)
        self.out_dim = 4


def _shift_ahead(y: Tensor, k: int, mask: Tensor) -> Tensor:
    """``y[t + k]`` where ``t + k`` is a valid frame, else 0."""
    b, t, d = y.shape
    nxt = torch.cat([y[:, k:], torch.zeros(b, min(k, t), d)], 1)[:, :t]
    mk = torch.cat([mask[:, k:], torch.zeros(b, min(k, t), dtype=torch.bool)], 1)[:, :t]
    return nxt * mk.unsqueeze(-1)


class EncLastValid(EncBase):
    """Claims causality but adds the item's last valid frame to every frame."""

    receptive_field = 1

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x)
        last = (mask.sum(1) - 1).clamp(min=0)
        return y + torch.gather(y, 1, last.view(-1, 1, 1).expand(-1, 1, y.shape[-1]))


class EncLookahead20(EncBase):
    """Claims causality but reads 20 frames ahead."""

    receptive_field = 1

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x)
        return y + _shift_ahead(y, 20, mask)


class EncWindow3(EncBase):
    """Truly causal with a receptive field of 3 frames (sum of frames t-2..t)."""

    receptive_field = 3

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        y = self.lin(x)
        pad = torch.nn.functional.pad(y, (0, 0, 2, 0))
        return pad[:, 2:] + pad[:, 1:-1] + pad[:, :-2]


class FusionLookahead20FL(Base):
    frame_local = True

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        x = self.x(feats)
        return {"fused": (x + _shift_ahead(x, 20, mask)).unsqueeze(2)}


class FusionFrameLocal(Base):
    frame_local = True


class FusionWithReceptiveField(Base):
    receptive_field = 1


def _encoder(cls: type[nn.Module]):
    return lambda p, *, in_dim, modality: cls(in_dim)


def _fusion(cls: type[nn.Module]):
    return lambda p, *, in_dims: cls(p, in_dims)


def _result(report, check: str):
    return {r.check: r for r in report.results}[check]


# ------------------------------------------------------------------ causal / frame-local


@pytest.mark.parametrize(
    ("cls", "frames", "changed"),
    [
        (EncLastValid, "frames 0-30", "input frame 31"),
        (EncLookahead20, "frame 0", "input frame 20"),
    ],
)
def test_causal_claim_is_probed_at_every_frame(cls, frames, changed):
    report = plugin.check_encoder(_encoder(cls), plugin.EmptyParams(), name="e", skip=["bf16-cpu"])
    result = _result(report, "causal")
    assert result.status == "fail", report.format()
    assert "declares receptive_field = 1, but output 'features' at " + frames in result.message
    assert f"when only {changed} changed" in result.message


def test_true_causal_window_passes():
    report = plugin.check_encoder(_encoder(EncWindow3), plugin.EmptyParams(), skip=["bf16-cpu"])
    assert _result(report, "causal").status == "pass", report.format()


def test_frame_local_claim_is_probed_at_every_frame():
    report = plugin.check_fusion(_fusion(FusionLookahead20FL), P(), name="f", skip=["bf16-cpu"])
    result = _result(report, "frame-local")
    assert result.status == "fail", report.format()
    assert "output 'fused' at frame 0 changed by up to" in result.message
    assert "when only input frame 20 changed" in result.message
    ok = plugin.check_fusion(_fusion(FusionFrameLocal), P(), skip=["bf16-cpu"])
    assert _result(ok, "frame-local").status == "pass", ok.format()


def test_receptive_field_of_a_fusion_is_skipped_saying_why():
    report = plugin.check_fusion(_fusion(FusionWithReceptiveField), P(), skip=["bf16-cpu"])
    result = _result(report, "causal")
    assert (result.status, result.message) == ("skip", "only encoders' receptive_field is checked")


class FusionBatchNorm(Base):
    """A plain BatchNorm over every frame: padded frames reach the statistics in train mode."""

    def __init__(self, p: P, in_dims: dict[str, int]) -> None:
        super().__init__(p, in_dims)
        self.bn = nn.BatchNorm1d(p.dim)

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        x = self.x(feats)
        b, t, d = x.shape
        y = self.bn(x.reshape(b * t, d)).reshape(b, t, d)
        return {"fused": y.unsqueeze(2)}


def test_batch_norm_over_padded_frames_points_at_masked_batch_norm():
    report = plugin.check_fusion(_fusion(FusionBatchNorm), P(), name="bn", skip=["bf16-cpu"])
    assert _result(report, "masking").status == "pass"  # eval mode: running statistics
    result = _result(report, "masking-train")
    assert result.status == "fail", report.format()
    assert "only padded frames changed" in result.message
    assert "plugin.masked_batch_norm" in result.message


# ------------------------------------------------------------------ host syncs


class SyncTolist(Base):
    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        x = self.x(feats)
        rows = [
            torch.cat([x[b, :n].flip(0), x[b, n:]], 0) for b, n in enumerate(mask.sum(1).tolist())
        ]
        return {"fused": torch.stack(rows).unsqueeze(2)}


class SyncNumpy(Base):
    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        lengths = mask.sum(1).numpy()
        assert len(lengths) == mask.shape[0]
        return {"fused": self.x(feats).unsqueeze(2)}


class SyncCpu(Base):
    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        keep = mask.cpu().unsqueeze(-1)
        return {"fused": (self.x(feats) * keep.to(self.proj.weight.device)).unsqueeze(2)}


@pytest.mark.parametrize(
    ("cls", "expect"),
    [
        (SyncTolist, "_local_scalar_dense: reads a value on the host (.item(), .tolist()"),
        (SyncNumpy, "numpy: reads tensor values on the host (.numpy()"),
        (SyncCpu, "_to_copy: copies a device tensor to the host"),
    ],
)
def test_host_reads_invisible_on_cpu_tensors_are_warned_about(cls, expect):
    report = plugin.check_fusion(_fusion(cls), P(), name="s", skip=["bf16-cpu"])
    result = _result(report, "host-sync")
    assert result.status == "warn", report.format()
    on_gpu = "_to_copy: copies a device tensor to the host"  # CUDA: .tolist() copies first
    assert expect in result.message or (torch.cuda.is_available() and on_gpu in result.message)
    assert report.ok


def test_host_reads_are_found_in_a_fresh_process():
    """The probe on fake tensors works in a new interpreter, as ``fusionkit plugins check``
    runs it: a module built under the fake mode once could not be moved to the fake device,
    so the probe ended before ``forward`` and passed every component (in a test session,
    state left by earlier checks hid it)."""
    script = textwrap.dedent(
        """
        from fusionkit import plugin
        from tests.test_plugin_trust import P, SyncNumpy, SyncTolist, _fusion, _result
        for cls in (SyncTolist, SyncNumpy):
            report = plugin.check_fusion(_fusion(cls), P(), name="s", skip=["bf16-cpu"])
            r = _result(report, "host-sync")
            print(cls.__name__, r.status, r.message or "")
        """
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert lines["SyncTolist"].startswith("warn") and "_local_scalar_dense" in lines["SyncTolist"]
    assert lines["SyncNumpy"].startswith("warn") and "numpy" in lines["SyncNumpy"]


class FakeBreaker(Base):
    """Counts its lengths with ``bincount``, whose output size depends on the data: fake
    tensors cannot run it."""

    def forward(self, feats: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        counts = torch.bincount(mask.sum(1))
        assert counts.shape[0] <= mask.shape[1] + 1
        return {"fused": self.x(feats).unsqueeze(2)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probe runs for real")
def test_a_fake_tensor_probe_that_cannot_run_is_a_warning_not_a_pass():
    """Without a GPU the reads ``.tolist()``, ``.numpy()`` and ``.cpu()`` are only seen on
    fake tensors; when that forward cannot run, the check says so instead of passing."""
    report = plugin.check_fusion(_fusion(FakeBreaker), P(), name="s", skip=["bf16-cpu"])
    result = _result(report, "host-sync")
    assert result.status == "warn", report.format()
    assert "did not run to its end" in result.message and "cpu: " in result.message
    assert report.ok


def test_a_fusion_without_host_reads_passes_host_sync():
    report = plugin.check_fusion(_fusion(Base), P(), skip=["bf16-cpu"])
    assert _result(report, "host-sync").status == "pass", report.format()


def test_simulated_host_syncs_sees_tolist_numpy_and_cpu_without_a_gpu():
    x = torch.ones(3)
    assert plugin.host_syncs(lambda: x.tolist()) == []  # invisible on a real CPU tensor
    assert simulated_host_syncs(lambda d: x.to(d).tolist())[0].startswith("_local_scalar_dense")
    assert simulated_host_syncs(lambda d: x.to(d).numpy())[0].startswith("numpy")
    assert simulated_host_syncs(lambda d: x.to(d).cpu()) == [
        "_to_copy: copies a device tensor to the host"
    ]
    assert simulated_host_syncs(lambda d: (x.to(d) * 2).sum(0)) == []


# ------------------------------------------------------------------ params


class NotPydantic:
    dim = 8


def test_kit_fails_params_that_are_not_a_pydantic_model():
    report = plugin.check_fusion(_fusion(Base), NotPydantic(), name="np")  # type: ignore[arg-type]
    msg = _result(report, "params").message
    assert _result(report, "params").status == "fail"
    assert msg == (
        "fusion 'np': params must be an instance of a pydantic model (derive it from "
        "plugin.Params); got NotPydantic"
    )
    assert {r.status for r in report.results if r.check != "params"} == {"skip"}
    with pytest.raises(AssertionError, match="got NotPydantic"):
        report.assert_ok()
    ds = plugin.check_dataset(lambda p: None, NotPydantic(), name="d")  # type: ignore[arg-type]
    assert _result(ds, "params").status == "fail"
    pt = plugin.check_perturbation(lambda p: None, NotPydantic(), name="q")  # type: ignore[arg-type]
    assert _result(pt, "params").status == "fail"


@dataclasses.dataclass
class DCParams:
    dim: int = 8


def test_build_annotated_with_a_non_pydantic_class_is_rejected():
    def build(params: DCParams, *, in_dims: dict[str, int]) -> nn.Module:
        return Base(params, in_dims)  # type: ignore[arg-type]

    with pytest.raises(PluginError, match=r"annotated DCParams, which is not a pydantic model"):
        Registry().add("fusion", "dc_fusion", build=build)

    def untyped(params, *, in_dims):
        return Base(P(), in_dims)

    Registry().add("fusion", "untyped", build=untyped)  # no annotation: EmptyParams, fine


def test_an_unexpected_exception_from_a_build_is_one_recipe_error_line():
    reg = Registry()

    def build(params: plugin.EmptyParams, *, in_dims: dict[str, int]) -> nn.Module:
        return params.dim  # type: ignore[attr-defined]  # AttributeError: the plugin's bug

    reg.add("fusion", "buggy", build=build)
    with pytest.raises(RecipeError) as info:
        reg.build("fusion", "buggy", plugin.EmptyParams(), where="model.fusion", in_dims={"a": 2})
    (line,) = info.value.problems
    assert line.startswith("model.fusion: fusion 'buggy' from '<direct>' raised AttributeError")
    assert "a bug in the plugin" in line and "\n" not in str(info.value)


# ------------------------------------------------------------------ loading


@pytest.fixture(autouse=True)
def _forget_plugin_modules():
    """Each test imports its throwaway plugin modules afresh."""
    yield
    for name in [m for m in sys.modules if m.startswith("fkt_")]:
        del sys.modules[name]


def _dist(root: Path, dist: str, module: str, source: str, value: str | None = None) -> None:
    """A throwaway installed distribution whose entry point is ``module = value``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[fusionkit]\n{module} = {value or module}\n")


GATE = """
from torch import nn
from fusionkit import plugin

@plugin.register("gate", "{name}")
def build(params, *, in_dims, num_steps):
    return nn.Identity()
"""


def _load(tmp_path, monkeypatch, *dists: tuple[str, str, str] | tuple[str, str, str, str]):
    for d in dists:
        _dist(tmp_path, *d)
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = load_registry(strict=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    return reg, msgs


def test_system_exit_at_import_skips_the_plugin(tmp_path, monkeypatch):
    src = "import sys\nsys.exit(2)\n"
    reg, msgs = _load(tmp_path, monkeypatch, ("fk-sysexit", "fkt_sysexit", src))
    assert len(msgs) == 1 and "'fkt_sysexit' from distribution 'fk-sysexit'" in msgs[0]
    assert "SystemExit: 2" in msgs[0]
    assert ("fusion", "concat") in reg


def test_keyboard_interrupt_at_import_still_propagates(tmp_path, monkeypatch):
    _dist(tmp_path, "fk-ctrlc", "fkt_ctrlc", "raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        load_registry(strict=False)


NOHOOK = (
    GATE.format(name="nohook_gate")
    + """
import sys

def fusionkit_register_components(registry):  # @plugin.hookimpl forgotten
    registry.add_module(sys.modules[__name__])
"""
)

EPFUNC = (
    GATE.format(name="epfunc_gate")
    + """
import sys

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add_module(sys.modules[__name__])
"""
)


def test_entry_point_without_a_hook_implementation_fails_naming_the_cause(tmp_path, monkeypatch):
    reg, msgs = _load(
        tmp_path,
        monkeypatch,
        ("fk-nohook", "fkt_nohook", NOHOOK),
        ("fk-epfunc", "fkt_epfunc", EPFUNC, "fkt_epfunc:fusionkit_register_components"),
    )
    assert len(msgs) == 2
    failures = {f.distribution: f.error for f in reg.failures}
    assert set(failures) == {"fk-nohook", "fk-epfunc"}
    for error in failures.values():
        assert "implements no fusionkit hook" in error and "@plugin.hookimpl" in error
    assert (
        'entry point fkt_epfunc = "fkt_epfunc:fusionkit_register_components"'
        in (failures["fk-epfunc"])
    )
    assert ("gate", "nohook_gate") not in reg and ("gate", "epfunc_gate") not in reg


def test_plugin_output_while_loading_goes_to_stderr(tmp_path, monkeypatch, capsys):
    src = 'print("fkt_print: loading my plugin v0.1")\n' + EPFUNC.replace("epfunc", "printed")
    _load(tmp_path, monkeypatch, ("fk-print", "fkt_print", src))
    out = capsys.readouterr()
    assert out.out == ""
    assert "fkt_print: loading my plugin v0.1" in out.err


KIND_THEN_RAISE = """
from typing import Protocol, runtime_checkable
from fusionkit import plugin

class ThingBuild(Protocol):
    def __call__(self, params, *, n: int): ...

@runtime_checkable
class Thing(Protocol):
    pass

@plugin.hookimpl
def fusionkit_register_kinds(registry):
    registry.add_kind(plugin.Kind("ktr_thing", build=ThingBuild, returns=Thing))

@plugin.hookimpl
def fusionkit_register_components(registry):
    raise RuntimeError("components hook failed")
"""

USES_KIND = """
from fusionkit import plugin

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add("ktr_thing", "other_thing", build=lambda p, *, n: object())
"""


def test_kinds_of_a_skipped_plugin_are_removed(tmp_path, monkeypatch):
    reg, _ = _load(
        tmp_path,
        monkeypatch,
        ("fk-kindthenraise", "fkt_kindthenraise", KIND_THEN_RAISE),
        ("fk-useskind", "fkt_useskind", USES_KIND),
    )
    assert "ktr_thing" not in {k.name for k in reg.kinds()}
    assert ("ktr_thing", "other_thing") not in reg
    failures = {f.distribution: f.error for f in reg.failures}
    assert "components hook failed" in failures["fk-kindthenraise"]
    assert "declared by a plugin that failed to load" in failures["fk-useskind"]


def test_plugins_kinds_warns_about_a_skipped_plugin(tmp_path, monkeypatch, capsys):
    """``fusionkit plugins kinds`` says a plugin was skipped, as every command does: the
    kinds it declares are missing from the table."""
    import fusionkit.cli.root as root
    import fusionkit.core.registry as fk_registry

    _dist(tmp_path, "fk-kindthenraise", "fkt_kindthenraise", KIND_THEN_RAISE)
    monkeypatch.syspath_prepend(str(tmp_path))
    fk_registry.clear_registry_cache()
    monkeypatch.setattr(sys, "argv", ["fusionkit", "plugins", "kinds"])
    try:
        with pytest.raises(SystemExit) as info:
            root.main()
    finally:
        fk_registry.clear_registry_cache()
    out = capsys.readouterr()
    assert (info.value.code or 0) == 0
    assert "ktr_thing" not in out.out
    assert "fk-kindthenraise" in out.err and "components hook failed" in out.err


ARGNAME = """
from fusionkit import plugin

@plugin.hookimpl
def fusionkit_register_components(reg):
    pass
"""


def test_load_failures_are_one_line_naming_the_entry_point(tmp_path, monkeypatch):
    _, msgs = _load(
        tmp_path,
        monkeypatch,
        ("fk-argname", "fkt_argname", ARGNAME),
        ("fk-missingattr", "fkt_missingattr", "x = 1\n", "fkt_missingattr:nothere"),
    )
    assert len(msgs) == 2 and all("\n" not in m for m in msgs)
    argname, missing = sorted(msgs)
    assert "PluginValidationError" in argname and "Argument(s) {'reg'}" in argname
    assert 'entry point fkt_missingattr = "fkt_missingattr:nothere"' in missing
    assert "fix it and reinstall" in missing


def test_strict_loading_reports_every_broken_plugin_at_once(tmp_path, monkeypatch):
    _dist(tmp_path, "fk-one", "fkt_one", "raise ImportError('first')\n")
    _dist(tmp_path, "fk-two", "fkt_two", "raise ImportError('second')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as info:
        load_registry(strict=True)
    text = str(info.value)
    assert (
        "plugin 'fkt_one' from distribution 'fk-one' 0.3 failed to load: ImportError: first" in text
    )
    assert (
        "plugin 'fkt_two' from distribution 'fk-two' 0.3 failed to load: ImportError: second"
        in (text)
    )


# ------------------------------------------------------------------ clashes in `plugins check`


CLASH = """
import sys
from torch import nn
from fusionkit import plugin

class Last(nn.Module):
    def __init__(self, in_dims):
        super().__init__()
        self.out_dim = sum(in_dims.values())

    def forward(self, stacks, mask):
        feats = torch.cat([stacks[s][:, :, -1] for s in sorted(stacks)], dim=-1)
        weights = {s: torch.zeros_like(x[..., 0]) for s, x in stacks.items()}
        for w in weights.values():
            w[..., -1] = 1.0
        return plugin.GateOutput(feats, weights)

import torch

@plugin.register("gate", "last")
def build_last(params, *, in_dims, num_steps):
    \"\"\"Clashes with the built-in gate.\"\"\"
    return Last(in_dims)

@plugin.register("gate", "clash_free")
def build_free(params, *, in_dims, num_steps):
    \"\"\"Does not clash.\"\"\"
    return Last(in_dims)

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add_module(sys.modules[__name__])
"""


@pytest.fixture
def clash_registry(tmp_path, monkeypatch):
    reg, _ = _load(tmp_path, monkeypatch, ("fk-clash", "fkt_clash", CLASH))
    return reg


@pytest.fixture
def cli(monkeypatch, capsys, clash_registry):
    yield from user_cli(monkeypatch, capsys, clash_registry)


def test_plugins_check_of_a_distribution_with_a_clash_checks_everything(cli):
    code, out, err = cli("plugins", "check", "fk-clash", "--skip", "bf16-cpu")
    assert code == 1, out + err
    assert "gate 'clash_free'" in out and "1 of 2 components conform" in " ".join(out.split())
    assert "is registered by more than one plugin" in " ".join(out.split())


def test_plugins_check_of_a_clashing_name_checks_each_registration(cli):
    code, out, err = cli("plugins", "check", "last", "--skip", "bf16-cpu", "--json")
    assert code == 1, err
    import json

    reports = json.loads(out)
    assert sorted(r["distribution"] for r in reports) == ["fk-clash", "fusionkit"]
    for r in reports:
        clash = [c for c in r["results"] if c["check"] == "clash"]
        assert clash and clash[0]["status"] == "fail"


def test_check_registry_reports_clashes_per_registration(clash_registry):
    reports = check_registry(clash_registry, distribution="fk-clash", skip=["bf16-cpu"])
    by_name = {r.name: r for r in reports}
    assert by_name["clash_free"].ok
    assert not by_name["last"].ok and by_name["last"].distribution == "fk-clash"


# ------------------------------------------------------------------ shape helpers


def test_check_shapes_with_a_missing_stream_raises_shape_error_naming_it():
    x = {"a": torch.zeros(2, 3, 4)}
    with pytest.raises(plugin.ShapeError, match=r"gate 'g' expected tensors \['a', 'v'\]"):
        plugin.check_shapes("gate 'g'", x, "b t d", {"a": {"d": 4}, "v": {"d": 4}})
    with pytest.raises(plugin.ShapeError, match=r"axis 'q' .* pattern 'b t d' has no such axis"):
        plugin.check_shape("gate 'g'", "a", x["a"], "b t d", q=3)


TAKES_A_BUILTIN_KIND = """
from typing import Protocol, runtime_checkable
from fusionkit import plugin

class Build(Protocol):
    def __call__(self, params): ...

@runtime_checkable
class Thing(Protocol):
    pass

@plugin.hookimpl
def fusionkit_register_kinds(registry):
    registry.add_kind(plugin.Kind("audio_backbone", build=Build, returns=Thing))
"""


def test_a_plugin_cannot_take_over_a_kind_of_fusionkits_own_plugins(tmp_path, monkeypatch):
    """A distribution whose name sorts before `fusionkit` and declares `audio_backbone` is
    the one skipped (and named): fusionkit's own plugins load first, so the Aff-Wild2
    datasets and backbones stay (they all vanished, and the warning blamed fusionkit)."""
    reg, msgs = _load(tmp_path, monkeypatch, ("aaa-kind", "fkt_aaakind", TAKES_A_BUILTIN_KIND))
    assert ("dataset", "affwild2") in reg and ("audio_backbone", "vggish") in reg
    assert {f.distribution for f in reg.failures} == {"aaa-kind"}
    assert len(msgs) == 1 and "from distribution 'aaa-kind'" in msgs[0]
    assert "kind 'audio_backbone', already declared by 'fusionkit'" in msgs[0]


REGISTERS_NOTHING = """
from torch import nn
from fusionkit import plugin

def build(params, *, in_dims, num_steps):  # @plugin.register forgotten
    return nn.Identity()

@plugin.hookimpl
def fusionkit_register_components(registry):
    import sys
    registry.add_module(sys.modules[__name__])
"""


def test_a_plugin_that_registers_nothing_is_named_not_invisible(tmp_path, monkeypatch):
    """A plugin whose build function lacks @plugin.register loads but adds nothing: it is
    named with the likely cause (it was in no listing and --strict passed)."""
    reg, msgs = _load(tmp_path, monkeypatch, ("fk-empty", "fkt_empty", REGISTERS_NOTHING))
    (failure,) = reg.failures
    assert failure.distribution == "fk-empty"
    assert "registers no component and declares no kind" in failure.error
    assert len(msgs) == 1 and "@plugin.register(kind, name)" in msgs[0]
    with pytest.raises(PluginError, match="fk-empty"):
        load_registry(strict=True)
