"""Backbone weights files: a `weights:` file gets the checks `weights convert` makes, two copies
of the weights in one file are refused, a ViT of another patch size is refused, and a run is
not reloaded on features of a replaced weights file."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from fusionkit.cli import app
from fusionkit.core.errors import FusionkitError
from fusionkit.core.registry import get_registry
from fusionkit_affwild2.backbones import FaceCNN, FaceCNNParams
from tests.affwild2_fixture import make_tree
from tests.conftest import tiny_recipe

pytestmark = [
    pytest.mark.filterwarnings("ignore:affwild2"),
]

FACE = {"channels": [4, 8], "dim": 6}


def build(kind: str, name: str, params: dict):
    reg = get_registry()
    p = reg.get(kind, name).params.model_validate(params)
    return reg.build(kind, name, p, where=f"{kind} {name}")


def face_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return FaceCNN(FaceCNNParams(**FACE)).state_dict()


def test_weights_param_refuses_integer_tensors(tmp_path):
    """Integer tensors where the module holds floats (a quantised file) are refused, naming
    the file and a tensor, where load_state_dict cast them to floats in silence."""
    sd = face_state(1)
    ints = {
        k: (v * 100).round().to(torch.int32) if v.is_floating_point() else v for k, v in sd.items()
    }
    save_file(ints, tmp_path / "int.safetensors")
    with pytest.raises(FusionkitError, match=r"int\.safetensors: tensors of another kind .*int32"):
        build("visual_backbone", "face_cnn", {**FACE, "weights": str(tmp_path / "int.safetensors")})


def test_weights_param_refuses_float64_values_beyond_float32(tmp_path):
    """A float64 value beyond float32's range would be infinite in the module (an infinite
    BatchNorm variance still gives finite features): refused, naming the tensor."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in face_state(1).items()}
    key = next(k for k in sd if k.endswith("running_var"))
    sd[key][0] = 1e300
    save_file(sd, tmp_path / "big.safetensors")
    with pytest.raises(FusionkitError, match=rf"tensor '{key}' holds float64 values beyond"):
        build("visual_backbone", "face_cnn", {**FACE, "weights": str(tmp_path / "big.safetensors")})


def test_weights_param_refuses_module_prefix_collision(tmp_path):
    """A file holding `x` and `module.x` (two copies) is refused, where the module got a mix of
    the two."""
    a, b = face_state(1), face_state(2)
    both = {**a, **{f"module.{k}": v for k, v in b.items()}}
    save_file(both, tmp_path / "both.safetensors")
    with pytest.raises(FusionkitError, match=r"holds '.*' and 'module\..*', two copies"):
        build(
            "visual_backbone", "face_cnn", {**FACE, "weights": str(tmp_path / "both.safetensors")}
        )


def test_timm_weights_of_another_patch_size_are_refused(tmp_path):
    """Patch-32 ViT weights for a patch-16 model are refused (timm's filter resampled them)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch32_224", pretrained=False, num_classes=0)
    path = tmp_path / "vit_s32.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    params = {
        "model": "vit_small_patch16_224.augreg_in21k_ft_in1k",
        "pretrained": False,
        "weights": str(path),
    }
    with pytest.raises(FusionkitError, match=r"32-pixel patches .* has 16-pixel patches"):
        build("visual_backbone", "timm", params)


def test_predict_refuses_features_of_a_replaced_backbone_weights_file(tmp_path):
    """The run records the feature caches it trained on (their names hold the weights'
    SHA-256): features re-extracted from another weights file at the same path are refused."""
    fx = make_tree(tmp_path / "aw2")
    weights = tmp_path / "audio.safetensors"
    other = tmp_path / "other.safetensors"
    from fusionkit_affwild2.backbones import AudioCNN, AudioCNNParams

    for seed, path in ((11, weights), (12, other)):
        torch.manual_seed(seed)
        save_file(AudioCNN(AudioCNNParams(channels=[4, 8], dim=16)).state_dict(), path)
    assert weights.read_bytes() != other.read_bytes()
    recipe = {
        "name": "aw",
        "data": {
            "name": "affwild2",
            "params": {
                "root": str(fx.root),
                "audio": {
                    "backbone": {
                        "name": "audio_cnn",
                        "params": {"channels": [4, 8], "dim": 16, "weights": str(weights)},
                    },
                    "batch_size": 64,
                },
                "video": {
                    "backbone": {"name": "face_cnn", "params": {**FACE, "input_size": 20}},
                    "resize": 24,
                    "batch_size": 64,
                },
                "device": "cpu",
            },
            "window": 16,
            "hop": 8,
        },
        "model": {**tiny_recipe(tmp_path)["model"], "targets": ["valence", "arousal"]},
        "training": {"epochs": 1, "batch_size": 4, "seed": 0, "num_threads": 1},
        "evaluation": {"splits": ["val"]},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "aw.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert runner.invoke(app, ["extract", str(path), "-q"]).exit_code == 0
        assert runner.invoke(app, ["run", str(path)]).exit_code == 0
        run = tmp_path / "runs" / "aw"
        before = runner.invoke(
            app, ["predict", str(run), "--split", "val", "-o", str(tmp_path / "p0.csv")]
        )
        assert before.exit_code == 0, before.output
        shutil.copyfile(other, weights)  # the weights file replaced after training
        # each command is a new process for a user; here, forget the dataset this process built
        from fusionkit.engine import session

        session._last_dataset.clear()
        assert runner.invoke(app, ["extract", str(run / "recipe.yaml"), "-q"]).exit_code == 0
        res = runner.invoke(
            app, ["predict", str(run), "--split", "val", "-o", str(tmp_path / "p.csv")]
        )
    assert res.exit_code != 0, res.output  # it was exit 0, with other numbers than p0.csv
    assert not Path(tmp_path / "p.csv").exists()
    text = " ".join(str(res.exception).split())  # a DataError: one line from the CLI
    assert "its audio features came from audio_cnn-" in text
    assert "the extractor's settings or its weights file changed since training" in text


def test_convert_refuses_a_checkpoint_with_two_copies_of_the_weights(tmp_path):
    """`backbone.x` beside `x`: one copy was dropped without a note; now refused."""
    from fusionkit.cli.weights import convert_weights

    a = build("visual_backbone", "ir50", {"seed": 1}).state_dict()
    b = build("visual_backbone", "ir50", {"seed": 2}).state_dict()
    src = tmp_path / "two.pth"
    torch.save({**a, **{f"backbone.{k}": v for k, v in b.items()}}, src)
    with pytest.raises(FusionkitError, match=r"two copies of one tensor"):
        convert_weights(src, tmp_path / "out.safetensors", "ir50")


def test_dinov2_weights_of_the_other_register_variant_name_the_file(tmp_path):
    """A register DINOv2 file for `registers: false` fails inside timm's filter: one line
    naming the file and what to check, not a reshape error about memory."""
    timm = pytest.importorskip("timm")
    net = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56, num_classes=0
    )
    path = tmp_path / "reg.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    params = {"pretrained": False, "img_size": 56, "weights": str(path)}
    with pytest.raises(FusionkitError) as info:
        build("visual_backbone", "dinov2", params)
    msg = str(info.value)
    assert msg.startswith(f"backbone weights {path}: the weights do not fit VisionTransformer")
    assert "check the component's size, registers or model" in msg


def test_a_weights_file_replaced_during_an_extraction_is_refused(tmp_path):
    """Jobs build their backbone from the weights file by path; one that no longer has the
    SHA-256 its cache folder was named after (replaced while a long extraction ran) fails,
    where its features would be filed under the old weights."""
    from fusionkit.engine.files import file_sha256
    from fusionkit_affwild2.extraction import build_backbone

    path = tmp_path / "face.safetensors"
    save_file(face_state(1), path)
    reg = get_registry()
    comp = reg.get("visual_backbone", "face_cnn")
    from fusionkit.core.recipe import ComponentSpec

    class Spec(ComponentSpec):
        kind = "visual_backbone"

    spec = Spec.model_validate(
        {"name": "face_cnn", "params": {**FACE, "weights": str(path)}},
        context={"registry": reg},
    )
    assert comp.params is type(spec.params)
    sha = file_sha256(path)
    build_backbone(spec, "cpu", sha)  # the file the folder was named after
    save_file(face_state(2), path)  # replaced mid-way (a later modification time, as it is)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(FusionkitError, match=r"changed since this extraction started"):
        build_backbone(spec, "cpu", sha)


def test_convert_says_which_of_two_state_dicts_it_converts(tmp_path):
    """A training checkpoint with `state_dict` and `state_dict_ema`: the first is converted,
    with a note naming the other and how to convert it instead."""
    from fusionkit.cli.weights import convert_weights
    from fusionkit.engine.files import load_tensors

    a, b = face_state(1), face_state(2)
    src = tmp_path / "ckpt.pth"
    torch.save({"state_dict": a, "state_dict_ema": b, "epoch": 3}, src)
    out = tmp_path / "out.safetensors"
    with pytest.warns(UserWarning, match=r"also holds state_dict_ema; converting its 'state_dict'"):
        convert_weights(src, out, "face_cnn", params=["channels=[4, 8]", "dim=6"])
    got, _ = load_tensors(out)
    assert all(torch.equal(got[k], a[k].float() if a[k].is_floating_point() else a[k]) for k in a)
