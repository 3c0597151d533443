"""Feature caches: skip valid ones, resume, detect stale and corrupt files (named), manifests,
parallel workers, safetensors backbone weights, and the backbone architectures."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusionkit.core.errors import DataError
from fusionkit.core.registry import get_registry
from fusionkit_affwild2.backbones import IR50, IR50Params, VGGish
from fusionkit_affwild2.cache import CacheFolder, fingerprint, fingerprint_changed
from fusionkit_affwild2.dataset import AffWild2Dataset
from tests.affwild2_fixture import TINY_AUDIO, shared_tree, tiny_params

pytestmark = pytest.mark.filterwarnings("ignore:affwild2.*label rows")


@pytest.fixture
def tree_copy(tmp_path_factory, tmp_path) -> Path:
    """A private copy of the shared, already extracted tree (tests modify it)."""
    fx = shared_tree(tmp_path_factory.getbasetemp())
    root = tmp_path / "aw2"
    shutil.copytree(fx.root, root)
    return root


def dataset(root: Path, **extra) -> AffWild2Dataset:
    comp = get_registry().get("dataset", "affwild2")
    return AffWild2Dataset(comp.params.model_validate(tiny_params(root, **extra)))


def extract(ds: AffWild2Dataset, workers: int = 1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ds.extract(workers=workers, progress=False)


def test_valid_caches_are_never_recomputed_and_a_pass_resumes(tree_copy):
    ds = dataset(tree_copy)
    before = {p: p.stat().st_mtime_ns for p in ds.audio_cache.path.glob("*.safetensors")}
    report = extract(ds)
    assert (report.total, report.skipped, report.computed, report.failed) == (12, 12, 0, {})
    assert {p: p.stat().st_mtime_ns for p in before} == before  # not rewritten
    ds.video_cache.file("vid_c").unlink()  # as if a pass had been interrupted
    report = extract(dataset(tree_copy))
    assert (report.computed, report.skipped) == (1, 11)
    assert ds.video_cache.file("vid_c").is_file()


def test_stale_cache_is_detected_named_and_refreshed(tree_copy):
    media = tree_copy / "raw_videos" / "vid_b.mp4"
    with media.open("ab") as fh:
        fh.write(b"\0" * 16)
    ds = dataset(tree_copy)
    cache = ds.audio_cache.file("vid_b")
    with pytest.raises(
        DataError, match=rf"stale feature cache {cache}: source .*vid_b\.mp4 changed"
    ):
        ds.videos("train")
    report = extract(dataset(tree_copy))
    assert list(report.refreshed) == ["audio vid_b"]
    assert "stale" in report.refreshed["audio vid_b"]
    dataset(tree_copy).videos("train")  # valid again
    # a removed crop makes that trial's visual cache stale
    next((tree_copy / "cropped_aligned" / "vid_c").glob("*.jpg")).unlink()
    with pytest.raises(DataError, match=r"stale feature cache .*vid_c\.safetensors.*now has 57"):
        dataset(tree_copy).videos("train")
    # ... unless source checks are switched off
    assert len(dataset(tree_copy, verify_sources=False).videos("train")) == 5


def test_touched_but_unchanged_source_stays_valid(tree_copy):
    media = tree_copy / "raw_videos" / "vid_a.mp4"
    saved = fingerprint(media)
    os.utime(media, ns=(1, 1))
    assert fingerprint_changed(saved, media) is None  # head/tail hash decides
    assert extract(dataset(tree_copy)).computed == 0


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_is_detected_named_and_refreshed(tree_copy, damage):
    ds = dataset(tree_copy)
    path = ds.video_cache.file("vid_d_right")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF  # inside the tensor data: only the content hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"corrupt feature cache {path}: "):
        ds.videos("train")
    report = extract(dataset(tree_copy))
    assert report.refreshed["video vid_d_right"].startswith("corrupt")
    assert len(dataset(tree_copy).videos("train")) == 5


def test_manifest_records_sources_extractor_and_versions(tree_copy):
    ds = dataset(tree_copy)
    manifest = json.loads((ds.audio_cache.path / "manifest.json").read_text())
    assert manifest["extractor"]["backbone"] == {
        "name": "audio_cnn",
        "params": {"seed": 0, **TINY_AUDIO["params"]},
    }
    assert manifest["extractor"]["logmel"]["n_mels"] == 64
    assert {"torch", "torchaudio", "av", "fusionkit", "python"} <= set(manifest["versions"])
    item = manifest["items"]["vid_a"]
    assert item["sources"]["media"]["path"].endswith("raw_videos/vid_a.mp4")
    assert len(item["sources"]["media"]["sha256_head_tail"]) == 64
    assert item["info"]["fps_exact"] == "30/1" and item["info"]["num_frames"] == 75
    v = json.loads((ds.video_cache.path / "manifest.json").read_text())
    assert v["items"]["vid_a_left"]["sources"]["crops"]["files"] == 72


def test_changed_params_use_another_folder(tree_copy):
    other = dataset(tree_copy, audio={"backbone": TINY_AUDIO, "anchor": "center"})
    assert other.audio_cache.path != dataset(tree_copy).audio_cache.path
    with pytest.raises(
        DataError, match=r"missing feature cache .*audio_cnn-.*run `fusionkit extract"
    ):
        other.videos("train")


def test_parallel_workers_write_the_same_caches(tree_copy, tmp_path):
    serial = dataset(tree_copy)
    parallel = dataset(tree_copy, cache_dir=str(tmp_path / "par"))
    report = extract(parallel, workers=2)
    assert report.computed == 12 and not report.failed
    for folder_a, folder_b in [
        (serial.audio_cache, parallel.audio_cache),
        (serial.video_cache, parallel.video_cache),
    ]:
        for f in folder_b.path.glob("*.safetensors"):
            a, _ = folder_a.load(f.stem)
            b, _ = folder_b.load(f.stem)
            for k in a:
                torch.testing.assert_close(a[k], b[k])


def test_weights_come_from_safetensors_and_define_the_cache(tree_copy, tmp_path):
    comp = get_registry().get("audio_backbone", "audio_cnn")
    model = comp.build(comp.params.model_validate({**TINY_AUDIO["params"], "seed": 7}))
    weights = tmp_path / "audio.safetensors"
    save_file({f"module.{k}": v for k, v in model.state_dict().items()}, str(weights))
    loaded = comp.build(comp.params.model_validate({**TINY_AUDIO["params"], "weights": weights}))
    x = torch.randn(3, 96, 64)
    torch.testing.assert_close(loaded(x), model(x))
    spec = {"name": "audio_cnn", "params": {**TINY_AUDIO["params"], "weights": str(weights)}}
    ds = dataset(tree_copy, audio={"backbone": spec})
    assert "weights_sha256" in ds.audio_cache.extractor["backbone"]["params"]
    bad = tmp_path / "bad.safetensors"
    save_file({"proj.weight": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(DataError, match=r"backbone weights .*bad\.safetensors do not fit AudioCNN"):
        comp.build(comp.params.model_validate({**TINY_AUDIO["params"], "weights": bad}))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    with pytest.raises(DataError, match=r"junk\.safetensors are not a readable safetensors"):
        comp.build(comp.params.model_validate({**TINY_AUDIO["params"], "weights": junk}))


def test_cache_folder_round_trip(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 5000)
    folder = CacheFolder(tmp_path / "cache", "demo", {"name": "demo", "p": 1})
    folder.write("item", {"features": torch.arange(6.0).reshape(3, 2)}, {"src": src}, {"n": 3})
    tensors, meta = folder.load("item", {"src": src})
    assert tensors["features"].tolist() == [[0, 1], [2, 3], [4, 5]] and meta["info"] == {"n": 3}
    assert folder.status("item", {"src": src}).valid
    assert folder.status("other", {"src": src}).state == "missing"
    src.write_bytes(b"y" * 5000)  # same size, new content and time
    assert folder.status("item", {"src": src}).state == "stale"


def test_vggish_and_ir50_architectures():
    with torch.device("meta"):
        vgg = VGGish()
        ir = IR50(IR50Params())
    assert sum(p.numel() for p in vgg.parameters()) == 72_141_184  # the published VGGish
    assert ir.output_layer[3].in_features == 512 * 5 * 5  # 40x40 -> 5x5x512 (strides 1,2,2,2)
    assert sum(1 for _ in ir.body) == 24  # 3 + 4 + 14 + 3 units
    assert vgg.embeddings[0].in_features == 12288
    model = get_registry().get("visual_backbone", "ir50")
    net = model.build(model.params.model_validate({"input_size": 16, "dim": 8}))
    out = net(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))  # L2-normalised, as released
    vgg_real = VGGish().eval()
    patches = torch.randn(4, 96, 64)
    assert vgg_real(patches).shape == (4, 128) and (vgg_real(patches) >= 0).all()
    linear_top = VGGish(final_relu=False).eval()
    linear_top.load_state_dict(vgg_real.state_dict())  # same weights, TensorFlow-style top
    assert (linear_top(patches) < 0).any()
    torch.testing.assert_close(linear_top(patches).clamp_min(0), vgg_real(patches))
    with pytest.raises(DataError, match=r"vggish expects \(B, 96, 64\)"):
        vgg_real(torch.randn(1, 50, 64))


def test_a_failing_job_names_its_file_and_the_others_finish(tree_copy):
    from typer.testing import CliRunner

    from fusionkit.cli import app
    from tests.affwild2_fixture import TINY_VIDEO
    from tests.conftest import REPO

    bad = tree_copy / "cropped_aligned" / "vid_c" / "00007.jpg"
    bad.write_bytes(b"not a jpeg")
    dataset(tree_copy).video_cache.file("vid_c").unlink()
    dataset(tree_copy).video_cache.file("vid_e").unlink()
    args = [
        f"data.params.root={tree_copy}",
        f"data.params.audio.backbone={TINY_AUDIO}",
        f"data.params.video.backbone={TINY_VIDEO}",
        "data.params.video.resize=24",
    ]
    res = CliRunner().invoke(
        app, ["extract", str(REPO / "recipes" / "affwild2" / "tagf.yaml"), *args, "-q"]
    )
    assert res.exit_code == 1, res.output
    assert "failed video vid_c: cannot decode face crop" in " ".join(res.output.split())
    assert "00007.jpg" in res.output
    assert dataset(tree_copy).video_cache.file("vid_e").is_file()  # the other job finished
    assert not dataset(tree_copy).video_cache.file("vid_c").is_file()
