"""Feature caches: skip valid ones, resume, detect stale and corrupt files (named), edited
metadata, manifests, parallel workers that die with their parent, trials whose media is
missing, warnings about unused and silent media, safetensors backbone weights, and the
backbone architectures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fusionkit.cli import app
from fusionkit.core.errors import DataError
from fusionkit.core.registry import get_registry
from fusionkit.engine.data import FrameStore
from fusionkit_affwild2.backbones import IR50, IR50Params, VGGish
from fusionkit_affwild2.cache import CACHE_FORMAT, CacheFolder, fingerprint, fingerprint_changed
from fusionkit_affwild2.dataset import AffWild2Dataset
from tests.affwild2_fixture import (
    NAMINGS,
    TINY_AUDIO,
    TINY_VIDEO,
    MediaSpec,
    shared_tree,
    tiny_params,
    write_media,
)
from tests.conftest import REPO

pytestmark = [
    pytest.mark.filterwarnings("ignore:affwild2.*label rows"),
    pytest.mark.filterwarnings("ignore:affwild2.*belong to no split"),  # test videos, no test_list
    pytest.mark.filterwarnings("ignore:affwild2.*have random weights"),  # tiny backbones
]


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


def cli_extract(root: Path, *extra: str):
    """``fusionkit extract`` of the TAGF recipe on ``root`` with the tiny extractors."""
    args = [
        f"data.params.root={root}",
        f"data.params.audio.backbone={TINY_AUDIO}",
        f"data.params.video.backbone={TINY_VIDEO}",
        "data.params.video.resize=24",
        "data.params.device=cpu",
        *extra,
    ]
    recipe = str(REPO / "recipes" / "affwild2" / "tagf.yaml")
    return CliRunner().invoke(app, ["extract", recipe, *args, "-q"])


def flat(text: str) -> str:
    """Console output with its line breaks (soft wraps) removed."""
    return " ".join(text.split())


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


def _rewrite_meta(path: Path, edit) -> None:
    """Rewrite a cache file with the same tensors and ``edit(record)`` applied to its
    metadata record (what a hand edit with the safetensors library does)."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
    record = json.loads(meta["fusionkit_cache"])
    edit(record)
    save_file(tensors, str(path), metadata={**meta, "fusionkit_cache": json.dumps(record)})


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r["info"].update(num_frames=r["info"]["num_frames"] - 5),
        lambda r: r["info"].update(fps=25.0),
        lambda r: r["sources"]["media"].update(sha256_head_tail="0" * 64),
    ],
    ids=["num_frames", "fps", "sources"],
)
def test_edited_cache_metadata_is_corrupt_and_named(tree_copy, edit):
    ds = dataset(tree_copy, test_list=str(tree_copy / "test_set_release.txt"))
    path = ds.audio_cache.file("vid_f")  # a test video: its length is the recorded num_frames
    media = tree_copy / "raw_videos" / "vid_f.mp4"
    _rewrite_meta(path, edit)
    status = ds.audio_cache.status("vid_f", {"media": media})
    assert status.state == "corrupt" and "metadata" in status.reason
    with pytest.raises(DataError, match=rf"corrupt feature cache {re.escape(str(path))}: "):
        ds.videos("test")
    report = extract(dataset(tree_copy, test_list=str(tree_copy / "test_set_release.txt")))
    assert report.refreshed["audio vid_f"].startswith("corrupt: tensors or metadata")
    ok = dataset(tree_copy, test_list=str(tree_copy / "test_set_release.txt"))
    assert {v.name: v.num_frames for v in ok.videos("test")}["vid_f"] == 45


def test_caches_of_an_older_format_are_stale_with_the_reason(tree_copy):
    ds = dataset(tree_copy)
    path = ds.video_cache.file("vid_e")
    _rewrite_meta(path, lambda r: r.update(format=CACHE_FORMAT - 1))
    status = ds.video_cache.status("vid_e", {"crops": tree_copy / "cropped_aligned" / "vid_e"})
    assert status.state == "stale"
    assert f"cache format {CACHE_FORMAT - 1} (current {CACHE_FORMAT})" in status.reason
    report = extract(dataset(tree_copy))
    assert report.refreshed["video vid_e"].startswith(f"stale: cache format {CACHE_FORMAT - 1}")
    assert report.computed == 0  # refreshed in its folder, nothing else recomputed


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


def test_non_finite_features_are_never_cached(tmp_path):
    """NaN weights made extract cache NaN features with exit 0; the training run then blamed
    the data. The cache refuses them, naming the item and the extractor."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    folder = CacheFolder(tmp_path / "cache", "demo", {"name": "demo", "p": 1})
    bad = torch.ones(3, 2)
    bad[1, 0] = float("nan")
    with pytest.raises(DataError, match=r"features of 'item' from .* hold 'features' \(1 of 6"):
        folder.write("item", {"features": bad}, {"src": src})
    assert folder.status("item", {"src": src}).state == "missing"


_SLOW_JOB = """
import os, time
from pathlib import Path

def run(folder):
    Path(folder, str(os.getpid())).touch()
    time.sleep(300)
"""

_PARENT = """
import sys
sys.path.insert(0, {helper!r})
import slow_job
from fusionkit_affwild2.cache import Job, run_jobs

if __name__ == "__main__":
    jobs = [Job(str(i), {pids!r}) for i in range(4)]
    run_jobs(jobs, slow_job.run, workers=2, progress=False)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        import psutil
    except ImportError:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(
    os.name != "posix" or not Path("/proc/self/stat").exists(),
    reason="needs kill -9 and /proc (Linux)",
)
def test_workers_die_with_their_parent(tmp_path):
    helper, pids = tmp_path / "helper", tmp_path / "pids"
    helper.mkdir()
    pids.mkdir()
    (helper / "slow_job.py").write_text(_SLOW_JOB)
    code = textwrap.dedent(_PARENT.format(helper=str(helper), pids=str(pids)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", code], env=env)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2:
            assert parent.poll() is None, "the parent process ended early"
            assert time.monotonic() < deadline, "the workers did not start their jobs"
            time.sleep(0.2)
            workers = [int(p.name) for p in pids.iterdir()]
        assert all(_alive(w) for w in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "workers outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


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


def test_a_trial_without_media_is_reported_and_the_others_are_extracted(tree_copy):
    train = tree_copy / NAMINGS["abaw"][0] / "Train_Set"
    orphan = train / "vid_x.txt"  # an annotation file for a video that does not exist
    orphan.write_text("valence,arousal\n0.1,0.2\n0.3,0.4\n")
    ds = dataset(tree_copy)
    ds.video_cache.file("vid_e").unlink()
    ds.audio_cache.file("vid_c").unlink()
    res = cli_extract(tree_copy)
    assert res.exit_code == 1, res.output
    out = flat(res.output)
    assert "failed trial vid_x: no raw video for trial 'vid_x'" in out
    assert f"listed by annotation file {orphan}: add the missing data or remove that file" in out
    assert "Traceback" not in res.output
    assert ds.video_cache.file("vid_e").is_file() and ds.audio_cache.file("vid_c").is_file()
    # training stops on it, naming the annotation file too
    with pytest.raises(DataError, match=r"no raw video for trial 'vid_x'.*vid_x\.txt"):
        dataset(tree_copy).videos("train")

    # a trial whose crop folder is missing is reported the same way
    shutil.rmtree(tree_copy / "cropped_aligned" / "vid_b")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = dataset(tree_copy).extract(progress=False)
    assert set(report.failed) == {"trial vid_x", "trial vid_b"}
    assert "face-crop folder" in report.failed["trial vid_b"]
    assert "vid_b.txt" in report.failed["trial vid_b"]

    # strict: true stops at the first problem, before any job, in one line
    ds.video_cache.file("vid_e").unlink()
    res = cli_extract(tree_copy, "data.params.strict=true")
    assert isinstance(res.exception, DataError), res.output  # `fusionkit` prints it, exit 2
    error = str(res.exception)
    assert "\n" not in error
    assert "face-crop folder" in error and "vid_b.txt" in error  # the first problem (sorted)
    assert "data.params.strict is true: set it to false" in error
    assert not ds.video_cache.file("vid_e").is_file()  # no job ran


def test_media_that_belong_to_no_split_are_warned_about(tree_copy):
    test_list = str(tree_copy / "test_set_release.txt")
    (tree_copy / NAMINGS["abaw"][0] / "Train_Set" / "vid_c.txt").unlink()  # silently drops vid_c
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = dataset(tree_copy, test_list=test_list).extract(progress=False)
    assert not report.failed
    text = " ".join(str(w.message) for w in caught)
    assert "affwild2: 1 face-crop folder(s) under" in text and "(vid_c)" in text
    assert "1 raw video(s) (raw_videos/vid_c.avi) belong to no split" in text
    assert "if an annotation file was deleted, restore it" in text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = dataset(tree_copy, test_list=test_list)
        assert "vid_c" not in [v.name for v in ds.videos("train")]
    assert any("1 face-crop folder(s)" in str(w.message) for w in caught)
    # without test_list the test videos belong to no split either: counted and named
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset(tree_copy).videos("val")
    (message,) = [str(w.message) for w in caught if "belong to no split" in str(w.message)]
    assert "3 face-crop folder(s)" in message and "vid_c, vid_f, vid_g_left" in message
    assert "3 raw video(s)" in message and "no data.params.test_list set" in message
    assert "\n" not in message


def test_a_video_without_audio_is_warned_about(tree_copy):
    write_media(
        tree_copy / "raw_videos" / "vid_d.mp4", MediaSpec("vid_d", Fraction(12), 30, audio=False)
    )
    res = cli_extract(tree_copy)
    assert res.exit_code == 0, res.output
    out = flat(res.output)
    assert (
        "warning: affwild2: 1 raw video(s) have no audio: vid_d.mp4 (no audio track); their 2 "
        "trial(s) (vid_d, vid_d_right) train on constant audio features" in out
    )
    assert "recomputed audio vid_d: stale" in out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        videos = dataset(tree_copy).videos("train")
    right = {v.name: v for v in videos}["vid_d_right"]
    assert not right.present["audio"].any() and right.present["video"].any()
    with pytest.warns(
        UserWarning, match=r"1 of 5 videos have no audio at all \(e\.g\. vid_d_right\)"
    ):
        FrameStore(videos, ["audio", "video"], [0, 1], window=32, hop=16, where="train")


def test_random_weights_are_named_in_one_line_of_the_extract_summary(tree_copy, tmp_path):
    res = cli_extract(tree_copy)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "random weights" in line]
    assert len(lines) == 1, res.output
    assert flat(res.output).count(
        "warning: affwild2: the audio backbone 'audio_cnn' and video backbone 'face_cnn' have "
        "random weights (no weights file, not pretrained), so their features carry no learned "
        "meaning"
    )
    comp = get_registry().get("audio_backbone", "audio_cnn")
    model = comp.build(comp.params.model_validate(TINY_AUDIO["params"]))
    weights = tmp_path / "audio.safetensors"
    save_file(model.state_dict(), str(weights))
    spec = {"name": "audio_cnn", "params": {**TINY_AUDIO["params"], "weights": str(weights)}}
    res = cli_extract(tree_copy, f"data.params.audio.backbone={spec}")
    assert res.exit_code == 0, res.output
    assert "the video backbone 'face_cnn' has random weights" in flat(res.output)
    assert "audio backbone" not in flat(res.output)


@pytest.mark.parametrize("marker", ["run.json", "grid.json"])
def test_a_cache_dir_inside_a_run_or_grid_is_refused(tree_copy, tmp_path, marker):
    """Feature caches used to be written into a run folder given as cache_dir."""
    owner = tmp_path / "runs" / "quickstart"
    owner.mkdir(parents=True)
    (owner / marker).write_text("{}")
    with pytest.raises(
        DataError, match=r"data\.params\.cache_dir: .* is or is inside the fusionkit"
    ):
        dataset(tree_copy, cache_dir=str(owner / "cache"))
    assert not (owner / "cache").exists()


def test_logmel_patches_before_a_late_audio_start_are_absent(tree_copy, tmp_path, monkeypatch):
    """Silence put before an audio stream that starts 1.5 s late is not audio: a patch that
    ends before the recording starts is absent (it used to be marked present)."""
    import fusionkit_affwild2.extraction as extraction
    from fusionkit_affwild2.media import probe

    late = 1.5
    real = extraction.load_audio_lead

    def delayed(path, rate, sync):
        wave, lead = real(path, rate, sync)
        pad = round(late * rate)
        return torch.cat([torch.zeros(pad), wave]), lead + pad

    monkeypatch.setattr(extraction, "load_audio_lead", delayed)
    ds = dataset(tree_copy, cache_dir=str(tmp_path / "cache"))
    path = tree_copy / "raw_videos" / "vid_a.mp4"
    job = ds._audio_job("vid_a", path, "cpu")
    job.run()
    tensors, _ = CacheFolder(tmp_path / "cache", "audio", job.extractor).load("vid_a")
    present = tensors["present"]
    a = ds.params.audio
    lm, rate = a.logmel, a.logmel.sample_rate
    hop, win = round(rate * lm.hop_ms / 1000), round(rate * lm.window_ms / 1000)
    fps = probe(path).fps
    for k in range(present.shape[0]):  # patch k ends at sample (start + P - 1) * hop + win
        start = round(k / fps * rate / hop) - (lm.patch_frames // 2 if a.anchor == "center" else 0)
        end = (start + lm.patch_frames - 1) * hop + win
        assert bool(present[k]) == (end > late * rate), k
    assert not present.all() and present.any()


def test_reports_of_several_passes_add_up_field_by_field():
    """`extract` of a grid adds each data setting's report into one: counts sum, the
    refreshed and failed entries of both are kept, and a cache folder is listed once."""
    from fusionkit.core.interfaces import ExtractReport

    first = ExtractReport(
        total=3,
        computed=1,
        refreshed={"a": "stale"},
        skipped=1,
        failed={"b": "bad"},
        seconds=1.5,
        cache_dirs=["/c/audio/x", "/c/video/y"],
    )
    second = ExtractReport(
        total=2,
        computed=2,
        refreshed={"c": "corrupt"},
        skipped=0,
        failed={},
        seconds=0.25,
        cache_dirs=["/c/audio/z", "/c/video/y"],
    )
    first.add(second)
    assert (first.total, first.computed, first.skipped) == (5, 3, 1)
    assert first.refreshed == {"a": "stale", "c": "corrupt"}
    assert first.failed == {"b": "bad"}
    assert first.seconds == 1.75
    assert first.cache_dirs == ["/c/audio/x", "/c/video/y", "/c/audio/z"]
