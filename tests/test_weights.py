"""``fusionkit weights convert``: released PyTorch checkpoints -> safetensors weights.

VGGish and IR-50 are built here independently, from torch.nn layers in the layout of the
released code (torchvggish's ``VGG``; the arcface ``Backbone`` inside the ABAW
``VisualBackbone`` wrapper with its FER+ ``logits``), saved with ``torch.save`` as those
projects save them, converted, loaded into the plugin's backbones through their ``weights``
param, and compared on random inputs. A checkpoint whose unpickling would run code is refused
without running it.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from fusionkit.cli import weights
from fusionkit.core.errors import CheckpointError, PluginError
from fusionkit.core.registry import Kind, get_registry, load_registry
from fusionkit.engine.files import file_sha256
from fusionkit_affwild2.backbones import (
    AudioBackbone,
    AudioBackboneBuild,
    VGGishParams,
    build_vggish,
)
from tests.affwild2_fixture import TINY_AUDIO


def invoke(*args: str):
    return CliRunner().invoke(weights.app, ["convert", *args])


def plugin_backbone(kind: str, name: str, **params):
    comp = get_registry().get(kind, name)
    return comp.build(comp.params.model_validate(params)).eval()


def _randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every parameter and buffer that a wrong mapping would reveal (BN
    statistics and affine terms, PReLU slopes), then eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 + 0.1 * torch.randn(m.weight.shape, generator=g))
    return module.eval()


# --------------------------------------------------------------------------- released layouts


class TorchVGGish(nn.Module):
    """torchvggish's ``VGG``: ``features`` (conv/ReLU, 4 max-pools) and ``embeddings``
    (12288-4096-4096-128, ReLU after each); NCHW input ``(B, 1, 96, 64)``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M"]:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(True)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 4 * 6, 4096),
            nn.ReLU(True),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Linear(4096, 128),
            nn.ReLU(True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.transpose(x, 1, 3)
        x = torch.transpose(x, 1, 2).contiguous()
        return self.embeddings(x.view(x.size(0), -1))


class BottleneckIR(nn.Module):
    """arcface ``bottleneck_IR``."""

    def __init__(self, c_in: int, depth: int, stride: int) -> None:
        super().__init__()
        if c_in == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(c_in, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class ArcfaceIR50(nn.Module):
    """arcface ``Backbone(num_layers=50, mode='ir')`` as the ABAW code uses it for 40x40
    faces: stages (64, 3), (128, 4), (256, 14), (512, 3) with strides 1, 2, 2, 2; output layer
    BN2d, Dropout, Flatten, Linear(512*5*5, 512), BN1d; L2-normalised output."""

    def __init__(self) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        units = []
        c_in = 64
        for depth, count, stride in ((64, 3, 1), (128, 4, 2), (256, 14, 2), (512, 3, 2)):
            for k in range(count):
                units.append(BottleneckIR(c_in, depth, stride if k == 0 else 1))
                c_in = depth
        self.body = nn.Sequential(*units)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(512 * 5 * 5, 512),
            nn.BatchNorm1d(512),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / torch.norm(x, 2, 1, True)


class VisualBackboneWrapper(nn.Module):
    """The ABAW ``VisualBackbone``: ``backbone`` plus an 8-class FER+ ``logits`` layer."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = ArcfaceIR50()
        self.logits = nn.Linear(512, 8)


# --------------------------------------------------------------------------- conversions


def test_vggish_checkpoint_converts_to_the_same_embeddings(tmp_path):
    torch.manual_seed(0)
    ref = TorchVGGish().eval()
    state = dict(ref.state_dict())
    state["pproc.pca_eigen_vectors"] = torch.randn(128, 128)  # torchvggish with postprocess
    state["pproc.pca_means"] = torch.randn(128, 1)
    src, out = tmp_path / "vggish-10086976.pth", tmp_path / "vggish.safetensors"
    torch.save(state, src)
    del state
    res = invoke(str(src), str(out), "--arch", "vggish")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "note: dropped 2 tensor(s) (pproc.pca_eigen_vectors, pproc.pca_means)" in text
    assert f"sha256: {file_sha256(out)}" in text
    assert f"weights: {out.resolve()}" in text and "name: vggish" in text
    with safe_open(str(out), framework="pt") as fh:
        meta = json.loads(fh.metadata()[weights.META_KEY])
    assert (meta["kind"], meta["name"], meta["source_sha256"]) == (
        "audio_backbone",
        "vggish",
        file_sha256(src),
    )
    net = plugin_backbone("audio_backbone", "vggish", weights=str(out))
    patches = torch.randn(2, 96, 64)
    with torch.inference_mode():
        torch.testing.assert_close(net(patches), ref(patches[:, None]))


def test_ir50_checkpoint_with_wrapper_and_dataparallel_prefix_converts(tmp_path):
    torch.manual_seed(1)
    ref = _randomize_(VisualBackboneWrapper(), seed=1)
    src, out = tmp_path / "res50_ir_0.887.pth", tmp_path / "ir50.safetensors"
    # saved from DataParallel: module.backbone.input_layer.0.weight, ..., module.logits.weight
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, src)
    res = invoke(str(src), str(out), "--arch", "ir50", "--kind", "visual_backbone")
    assert res.exit_code == 0, res.output
    assert "dropped 2 tensor(s) (logits.bias, logits.weight)" in " ".join(res.output.split())
    net = plugin_backbone("visual_backbone", "ir50", weights=str(out))
    faces = torch.rand(3, 3, 40, 40) * 2 - 1
    with torch.inference_mode():
        expected = ref.backbone(faces)
        torch.testing.assert_close(net(faces), expected, atol=1e-5, rtol=1e-4)


def test_a_dict_with_a_model_entry_and_params(tmp_path):
    params = TINY_AUDIO["params"]
    ref = plugin_backbone("audio_backbone", "audio_cnn", seed=3, **params)
    src, out = tmp_path / "ckpt.pt", tmp_path / "audio.safetensors"
    torch.save({"epoch": 7, "model": ref.state_dict(), "optimizer": {"lr": 0.1}}, src)
    res = invoke(str(src), str(out), "--arch", "audio_cnn", "-p", "channels=[4, 8]", "-p", "dim=16")
    assert res.exit_code == 0, res.output
    assert "channels: [4, 8]" in res.output and "dim: 16" in res.output
    net = plugin_backbone("audio_backbone", "audio_cnn", weights=str(out), **params)
    x = torch.randn(2, 96, 64)
    torch.testing.assert_close(net(x), ref(x))
    again = tmp_path / "again.safetensors"  # a safetensors source is read without pickle
    res = invoke(
        str(out), str(again), "--arch", "audio_cnn", "-p", "channels=[4, 8]", "-p", "dim=16"
    )
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(
        plugin_backbone("audio_backbone", "audio_cnn", weights=str(again), **params)(x), ref(x)
    )


# --------------------------------------------------------------------------- refusals


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("container", "refusal"),
    [
        ("pickle2", "holds Python objects other than tensors"),  # the protocol torch.save uses
        ("pickle4", "is not a readable PyTorch checkpoint"),  # stops before the payload
        ("torch.save", "holds Python objects other than tensors"),
    ],
)
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(
    tmp_path, container, refusal
):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    if container == "torch.save":
        torch.save({"w": torch.zeros(2), "payload": _Payload(marker)}, src)
    else:
        src.write_bytes(pickle.dumps(_Payload(marker), protocol=int(container[-1])))
    assert not marker.exists()
    res = invoke(str(src), str(tmp_path / "out.safetensors"), "--arch", "audio_cnn")
    assert not marker.exists(), "the payload ran"
    assert isinstance(res.exception, CheckpointError), res.output
    message = str(res.exception)
    assert "\n" not in message
    assert message.startswith(f"{src} {refusal}")
    if "objects" in refusal:
        assert "Unsupported global" in message and "weights_only=True" in message
    assert not (tmp_path / "out.safetensors").exists()


def test_mismatches_and_mistakes_are_named(tmp_path):
    params = TINY_AUDIO["params"]
    ref = plugin_backbone("audio_backbone", "audio_cnn", **params)
    state = dict(ref.state_dict())
    state.pop("proj.weight")
    state["extra.weight"] = torch.zeros(1)
    src, out = tmp_path / "a.pth", tmp_path / "a.safetensors"
    torch.save(state, src)
    res = invoke(str(src), str(out), "--arch", "audio_cnn", "-p", "channels=[4, 8]", "-p", "dim=16")
    message = str(res.exception)
    assert isinstance(res.exception, CheckpointError) and "\n" not in message
    assert f"{src} does not fit audio_backbone 'audio_cnn'" in message
    assert "missing keys proj.weight," in message
    assert "unexpected keys extra.weight;" in message
    assert "AudioCNN defines no convert_state_dict" in message
    assert not out.exists()

    res = invoke(str(src), str(out), "--arch", "vggsh")
    assert isinstance(res.exception, PluginError)
    assert "--arch 'vggsh' is not a registered component (did you mean 'vggish'?)" in str(
        res.exception
    )
    assert "ir50 (visual_backbone)" in str(res.exception)
    res = invoke(str(tmp_path / "absent.pth"), str(out), "--arch", "vggish")
    assert isinstance(res.exception, CheckpointError) and "absent.pth is missing" in str(
        res.exception
    )
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    res = invoke(str(junk), str(out), "--arch", "vggish")
    assert isinstance(res.exception, CheckpointError) and "\n" not in str(res.exception)
    assert "junk.pth is not a readable PyTorch checkpoint" in str(res.exception)
    torch.save([torch.zeros(1)], src)
    res = invoke(str(src), str(out), "--arch", "audio_cnn")
    assert "holds a list, not a state dict" in str(res.exception)


def test_a_name_registered_for_two_kinds_needs_kind(tmp_path):
    registry = load_registry(strict=True)
    registry.add_kind(Kind("other_backbone", AudioBackboneBuild, AudioBackbone, module=True))
    registry.add("other_backbone", "vggish", build=build_vggish, params=VGGishParams)
    with pytest.raises(PluginError, match=r"several kinds \(audio_backbone, other_backbone\)"):
        weights.find_component(registry, "vggish")
    assert weights.find_component(registry, "vggish", "other_backbone").kind == "other_backbone"
    with pytest.raises(PluginError, match=r"unknown kind 'audio'"):
        weights.find_component(registry, "vggish", "audio")
