"""Guards for online streaming and for predicting a trained run on new data.

Pins what ``StreamingPredictor`` promises (trailing windows, a reset that forgets the previous
video, the newest frame read from a fixed-length window, eval mode, frames checked by
modality), how ``stream`` measures latency and paces frames, how feature files are bounded
and checked, what ``fusionkit stream`` decides (default context and frame rate, what it prints,
non-finite predictions, interruptions, media files), and what ``predict_run`` and
``write_submission`` put in the prediction file and its summary.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fusionkit.core.errors import DataError, ShapeError
from fusionkit.core.interfaces import Video
from fusionkit.core.registry import Registry, load_registry
from fusionkit.engine import files as fk_files
from fusionkit.engine import streaming
from fusionkit.engine.data import Normalizer
from fusionkit.engine.model import FusionModel
from fusionkit.engine.predict import (
    RunPredictions,
    check_missing_value,
    predict_run,
    write_submission,
)
from fusionkit.engine.session import load_run
from fusionkit.engine.streaming import (
    StreamingPredictor,
    check_features,
    read_feature_file,
    stream,
)
from tests.conftest import (
    TinyDataset,
    TinyParams,
    assert_streams_trailing_windows,
    eval_model,
    stream_frames,
    tiny_stream_run,
    user_cli,
)

DIMS = {"audio": 6, "video": 5}
MODALITIES = ["audio", "video"]
WINDOW = 16  # the trained run's data.window: the default --context
HOP = 8


def _frames(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}


# ----------------------------------------------------------------------------- predictor


def test_a_context_below_one_frame_is_refused(tmp_path, registry):
    """A context of 0 frames is a ValueError naming the value, not a division by zero at the
    first pushed frame."""
    with pytest.raises(ValueError, match="context must be >= 1, got 0"):
        StreamingPredictor(eval_model(tmp_path, registry), DIMS, context=0)


def test_feature_dims_without_a_model_modality_is_a_shape_error(tmp_path, registry):
    """``feature_dims`` lacking a modality the model uses is a ShapeError naming it."""
    with pytest.raises(ShapeError, match=r"feature_dims lacks \['video'\]"):
        StreamingPredictor(eval_model(tmp_path, registry), {"audio": 6}, context=8)


def test_a_frame_without_a_modality_is_a_shape_error_naming_it(tmp_path, registry):
    """A pushed frame that lacks a modality is a ShapeError naming the modality and saying it
    got nothing, not an AttributeError from inside the buffer code."""
    sp = StreamingPredictor(eval_model(tmp_path, registry), DIMS, context=8)
    with pytest.raises(ShapeError, match=r"frame 0: expected video of shape \(5,\); got None"):
        sp.push({"audio": torch.zeros(6)})


def test_a_model_in_training_mode_is_streamed_in_eval_mode(tmp_path, registry):
    """The predictor puts the model in eval mode: a model handed over in training mode (head
    dropout 0.2) still streams the deterministic eval predictions."""
    model = eval_model(tmp_path, registry)
    xs = _frames(12)
    with torch.no_grad():
        offline = model(
            {m: x[None] for m, x in xs.items()}, torch.ones(1, 12, dtype=torch.bool)
        ).pred[0]
    sp = StreamingPredictor(model.train(), DIMS, context=8)
    assert not model.training
    torch.testing.assert_close(stream_frames(sp, xs, 12), offline, atol=1e-5, rtol=1e-5)


def test_an_extra_modality_in_a_pushed_frame_is_ignored(tmp_path, registry):
    """A frame may carry a modality the model does not use (with a run's normaliser, which
    has no statistics for it): it is ignored, and the predictions are those without it."""
    model = eval_model(tmp_path, registry)
    zeros = {m: torch.zeros(d) for m, d in DIMS.items()}
    norm = Normalizer(zeros, {m: torch.ones(d) for m, d in DIMS.items()})
    xs = _frames(6)
    plain = stream_frames(StreamingPredictor(model, DIMS, 4, norm), xs, 6)
    sp = StreamingPredictor(model, DIMS, 4, norm)
    extra = torch.stack(
        [sp.push({**{m: x[t] for m, x in xs.items()}, "text": torch.ones(3)}) for t in range(6)]
    )
    torch.testing.assert_close(extra, plain)


def test_only_a_frame_local_tail_sees_the_newest_frame_alone(tmp_path, registry):
    """Frame-local parts are cut to the newest frame only from the first of a frame-local
    *tail* on: with a per-frame fusion (concat) before a temporal gate (tagf_temporal) and a
    per-frame head, the gate must still see the whole window (cut after the gate)."""
    model = eval_model(tmp_path, registry, gate={"name": "tagf_temporal"})
    n, c = 20, 8
    xs = _frames(n, seed=3)
    sp = StreamingPredictor(model, DIMS, context=c)
    assert sp.local_from == 2
    online = stream_frames(sp, xs, n)
    assert_streams_trailing_windows(model, xs, online, c, (0, 3, c - 1, c, n - 1))


def _attending_model(tmp_path: Path, registry: Registry) -> FusionModel:
    """Stateful causal encoders (tcn, streaming form, receptive field 13) and a fusion that
    attends its window."""
    tcn = {"name": "tcn", "params": {"channels": [4, 4], "kernel_size": 3}}
    return eval_model(
        tmp_path,
        registry,
        encoders={"audio": tcn, "video": tcn},
        fusion={"name": "rjca", "params": {"recursions": 1}},
        gate={"name": "tagf"},
    )


def test_reset_forgets_the_buffered_frames_and_the_encoder_state(tmp_path, registry):
    """After ``reset`` a new video streams as with a fresh predictor: neither the previous
    video's buffered frames (seen by an attending fusion) nor the tcn encoders' carried state
    leak into its first predictions."""
    model = _attending_model(tmp_path, registry)
    first, second = _frames(20, seed=4), _frames(20, seed=5)
    sp = StreamingPredictor(model, DIMS, context=16)
    assert sp.stateful == ["audio", "video"]  # each tcn steps from its carried state
    stream_frames(sp, first, 20)
    sp.reset()
    again = stream_frames(sp, second, 20)
    fresh = stream_frames(StreamingPredictor(model, DIMS, context=16), second, 20)
    torch.testing.assert_close(again, fresh, atol=1e-6, rtol=0)


def test_stream_starts_every_file_from_a_reset_predictor(tmp_path, registry):
    """``stream`` resets the predictor first: streaming a second file through the same
    predictor gives that file's predictions, not ones mixed with the first file's frames."""
    model = _attending_model(tmp_path, registry)
    first, second = _frames(20, seed=4), _frames(20, seed=5)
    sp = StreamingPredictor(model, DIMS, context=16)
    list(stream(sp, first, 30.0))
    got = torch.stack([f.prediction for f in stream(sp, second, 30.0)])
    fresh = stream_frames(StreamingPredictor(model, DIMS, context=16), second, 20)
    torch.testing.assert_close(got, fresh, atol=1e-6, rtol=0)


@pytest.mark.parametrize("tail", ["gate_and_head_per_frame", "nothing_per_frame"])
def test_a_fixed_length_window_is_read_at_the_newest_frame_not_its_padding(
    tmp_path, registry, tail
):
    """Until a fixed-length fusion's window is full, frame t is at position t of the padded
    window, whatever part of the model is cut to the newest frame (gate and head, or none):
    reading the window's last position returns the prediction of a padding row."""
    rjca = {"name": "rjca", "params": {"mode": "faithful", "length": 8, "recursions": 1}}
    model = eval_model(tmp_path, registry, window=8, fusion=rjca, gate={"name": "tagf"})
    if tail == "nothing_per_frame":
        for part in (model.fusion, model.gate, model.head):
            part.frame_local = False
    c, n = 8, 10
    xs = _frames(n, seed=6)
    sp = StreamingPredictor(model, DIMS, context=30)
    assert (sp.context, sp.local_from) == (c, 1 if tail == "gate_and_head_per_frame" else 3)
    online = stream_frames(sp, xs, n)
    with torch.no_grad():
        for t in range(c - 1):
            win = {
                m: torch.cat([x[: t + 1], x.new_zeros(c - t - 1, x.shape[1])])[None]
                for m, x in xs.items()
            }
            ref = model(win, (torch.arange(c) <= t)[None]).pred[0, t]
            torch.testing.assert_close(online[t], ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- stream()


class _Clock:
    """A fake ``time`` module: ``perf_counter`` reads it, ``sleep`` and pushes advance it."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _SlowPredictor:
    """A predictor whose every push takes ``cost`` seconds of the fake clock."""

    def __init__(self, clock: _Clock, cost: float) -> None:
        self.clock, self.cost, self.pushed_at = clock, cost, []

    def reset(self) -> None:
        self.pushed_at.clear()

    def push(self, frame: dict[str, torch.Tensor]) -> torch.Tensor:
        self.pushed_at.append(self.clock.now)
        self.clock.now += self.cost
        return torch.zeros(2)


@pytest.mark.parametrize("realtime", [False, True])
def test_latency_is_the_compute_time_of_each_frame_alone(monkeypatch, realtime):
    """Each frame's latency is the time its push took: not the pacing wait before it, not
    the time since the stream started. Paced at 100 fps, frame i is pushed at i / 100 s."""
    clock = _Clock()
    fake_time = SimpleNamespace(perf_counter=clock.perf_counter, sleep=clock.sleep)
    monkeypatch.setattr(streaming, "time", fake_time)
    sp = _SlowPredictor(clock, 0.004)
    got = list(stream(sp, {"audio": torch.zeros(5, 6)}, 100.0, realtime=realtime))
    assert [f.index for f in got] == list(range(5))
    assert [f.seconds for f in got] == pytest.approx([i / 100 for i in range(5)])
    assert [f.latency for f in got] == pytest.approx([0.004] * 5)
    step = 0.01 if realtime else 0.004
    assert [t - 100.0 for t in sp.pushed_at] == pytest.approx([i * step for i in range(5)])


# ----------------------------------------------------------------------------- feature files


def _npz_member(arr: np.ndarray, version: tuple[int, int] = (1, 0)) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    return buf.getvalue()


def _write_npz(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(f"{name}.npy", data)
    return path


def _features(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {m: rng.standard_normal((n, d)).astype(np.float32) for m, d in DIMS.items()}


def test_a_missing_features_file_is_named_as_missing(tmp_path):
    """A features path that does not exist is a DataError saying so, for either format."""
    for name in ("absent.safetensors", "absent.npz"):
        with pytest.raises(DataError, match=rf"features file .*{name} does not exist"):
            read_feature_file(tmp_path / name, MODALITIES, DIMS)


def test_a_damaged_safetensors_file_is_a_data_error_naming_it(tmp_path):
    """A features file that is not a safetensors file is a DataError (bad input) naming it."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(DataError, match=r"bad\.safetensors"):
        read_feature_file(bad, MODALITIES, DIMS)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_the_size_bounds_refuse_only_files_beyond_them(tmp_path, monkeypatch, suffix):
    """The bounds are maxima (docs: *more than* 2,000,000 frames or 512 Mi values is
    refused): a file of exactly that many frames or values streams, one more is refused."""
    n = 60
    monkeypatch.setattr(streaming, "MAX_STREAM_FRAMES", n)
    monkeypatch.setattr(streaming, "MAX_STREAM_FLOATS", n * 11)  # 60 x (6 + 5)
    for frames in (n, n + 1):
        path = tmp_path / f"f{frames}{suffix}"
        arrays = _features(frames)
        if suffix == ".npz":
            np.savez(path, **arrays)
        else:
            save_file({m: torch.from_numpy(a) for m, a in arrays.items()}, str(path))
        if frames == n:
            got = read_feature_file(path, MODALITIES, DIMS)
            assert {m: tuple(x.shape) for m, x in got.items()} == {"audio": (n, 6), "video": (n, 5)}
        else:
            with pytest.raises(DataError, match=f"holds {n + 1:,} frames"):
                read_feature_file(path, MODALITIES, DIMS)


def test_a_safetensors_file_never_loads_an_unbounded_extra_array(tmp_path, monkeypatch):
    """The size bounds exist so that nothing beyond them is read into memory: an array beside
    the modalities that is beyond the bound must be refused, or left unread."""
    monkeypatch.setattr(streaming, "MAX_STREAM_FLOATS", 1000)
    path = tmp_path / "extra.safetensors"
    arrays = {m: torch.from_numpy(a) for m, a in _features(20).items()}  # 220 values
    save_file({**arrays, "junk": torch.zeros(400, 10)}, str(path))  # 4,000 more

    def whole_file(*a: object, **k: object) -> NoReturn:
        raise AssertionError("every tensor of the file was loaded, the extra array included")

    monkeypatch.setattr(fk_files, "load_tensors", whole_file)
    try:
        got = read_feature_file(path, MODALITIES, DIMS)
    except DataError as exc:
        assert "values" in str(exc)
    else:
        assert set(got) == set(MODALITIES)


def test_an_npz_without_a_modality_names_it(tmp_path):
    """An .npz archive lacking a modality is a DataError naming it and the arrays it has."""
    path = tmp_path / "audio_only.npz"
    np.savez(path, audio=_features(5)["audio"], extra=np.zeros(3))
    with pytest.raises(DataError, match=r"has no 'video' array \(it has: audio, extra\)"):
        read_feature_file(path, MODALITIES, DIMS)


def test_an_npz_member_beyond_the_uncompressed_bound_is_refused(tmp_path, monkeypatch):
    """An archive member bigger uncompressed than the bound allows is refused from the zip
    directory, even when its .npy header declares a small array."""
    monkeypatch.setattr(streaming, "MAX_STREAM_FLOATS", 100)  # 400 bytes + 1 MiB slack
    arrays = _features(3)
    padded = _npz_member(arrays["audio"]) + b"\0" * ((1 << 20) + 4096)
    members = {"audio": padded, "video": _npz_member(arrays["video"])}
    path = _write_npz(tmp_path / "padded.npz", members)
    with pytest.raises(DataError, match=r"array 'audio' is .* GiB uncompressed"):
        read_feature_file(path, MODALITIES, DIMS)


def test_an_npz_with_version_2_headers_is_read(tmp_path):
    """Arrays saved with the .npy format version 2.0 header (numpy's choice for large
    headers) are read like version 1.0 ones."""
    arrays = _features(4)
    path = _write_npz(tmp_path / "v2.npz", {m: _npz_member(a, (2, 0)) for m, a in arrays.items()})
    got = read_feature_file(path, MODALITIES, DIMS)
    for m, a in arrays.items():
        assert torch.equal(got[m], torch.from_numpy(a))


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"audio": torch.zeros(10), "video": torch.zeros(10)}, r"\(frames, features\)"),
        ({"audio": torch.zeros(10, 6), "video": torch.zeros(9, 5)}, "of one length"),
        ({"audio": torch.zeros(4, 6, dtype=torch.bool), "video": torch.zeros(4, 5)}, "bool"),
    ],
    ids=["one_dimensional", "unequal_lengths", "bool"],
)
def test_features_of_another_layout_or_kind_are_refused(arrays, fragment):
    """Features must be real-valued ``(frames, features)`` arrays of one length: 1-D arrays,
    modalities of unequal lengths (the stream would end mid-file with an IndexError) and
    booleans are DataErrors naming the source."""
    with pytest.raises(DataError, match=rf"^src\.npz.*{fragment}"):
        check_features(arrays, "src.npz", MODALITIES, DIMS)


# ----------------------------------------------------------------------------- stream command


@pytest.fixture(scope="module")
def run16(tmp_path_factory, registry) -> tuple[Path, Path, Video]:
    """A complete 1-epoch tiny run with data.window 16, hop 8, a causal tcn audio encoder
    (receptive field 25) and z-scored features; 40 frames of a test video as a features file."""
    parent = tmp_path_factory.mktemp("stream_guards")
    data = {"window": WINDOW, "hop": HOP}
    return tiny_stream_run(parent, registry, data=data, frames=40, num_threads=1)


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_stream_defaults_to_30_fps_and_the_run_window_as_context(run16, tmp_path, cli, registry):
    """Without --fps and --context (docs: default 30 and data.window), frame k is at k / 30 s
    and each prediction is the model on the trailing data.window frames."""
    run, feats, video = run16
    out = tmp_path / "s.csv"
    code, stdout, err = cli("stream", run, feats, "--out", out, "-q")
    assert code == 0, err
    assert "at 30 fps" in stdout
    assert "holds no frame rate" in err and "assume 30 fps" in err and "--fps" in err
    rows = _csv(out)
    assert [r["seconds"] for r in rows[:2]] + [rows[30]["seconds"]] == ["0.000", "0.033", "1.000"]
    online = torch.tensor([[float(r["valence"]), float(r["arousal"])] for r in rows])
    session = load_run(run, registry=registry, device="cpu").session
    norm = session.normalizer
    zs = {
        m: (x[:40] - norm.mean[m]) / norm.std[m].clamp(min=norm.eps)
        for m, x in video.features.items()
    }
    assert_streams_trailing_windows(session.model, zs, online, WINDOW, (3, 15, 16, 39))


def test_stream_prints_one_line_per_frame_and_only_the_summary_with_q(run16, cli):
    """Without --out the frame lines are the product: a header naming the columns, one
    ``frame,seconds,...`` line per frame, then the summary; with -q only the summary is
    printed. With --fps there is no note about an assumed frame rate."""
    run, feats, _ = run16
    code, stdout, err = cli("stream", run, feats, "--fps", "30")
    assert code == 0, err
    assert "frame rate" not in err
    lines = stdout.splitlines()
    assert lines[0] == "frame,seconds,valence,arousal,latency_ms"
    assert [ln.split(",")[0] for ln in lines[1:-1]] == [str(i) for i in range(40)]
    assert all(len(ln.split(",")) == 5 for ln in lines[1:-1])
    assert lines[-1].startswith("streamed 40 frames")
    code, stdout, err = cli("stream", run, feats, "-q")
    assert code == 0, err
    assert len(stdout.splitlines()) == 1 and stdout.startswith("streamed 40 frames")


def test_stream_refuses_a_prediction_with_any_non_finite_target(run16, tmp_path, cli, monkeypatch):
    """One non-finite target (arousal only) is enough to stop the stream with one line naming
    the frame, and nothing is written."""
    run, feats, _ = run16
    real = StreamingPredictor.push

    def push(self: StreamingPredictor, frame: dict[str, torch.Tensor]) -> torch.Tensor:
        y = real(self, frame)
        return torch.stack([y[0], torch.tensor(float("nan"))]) if self.count == 4 else y

    monkeypatch.setattr(StreamingPredictor, "push", push)
    out = tmp_path / "n.csv"
    code, _, err = cli("stream", run, feats, "--out", out, "-q")
    assert code == 2 and "non-finite value at frame 3" in err and "arousal=nan" in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("frames", "said"), [(6, "frames 0 to 5 are printed above"), (0, "no frame was printed")]
)
def test_an_interrupted_printing_stream_names_the_frames_printed(
    run16, cli, monkeypatch, frames, said
):
    """Ctrl-C after 6 frames without --out: exit 130, the 6 frame lines are printed and the
    message says frames 0 to 5 are above; before the first frame it says none was."""
    run, feats, _ = run16
    real, seen = StreamingPredictor.push, [0]

    def push(self: StreamingPredictor, frame: dict[str, torch.Tensor]) -> torch.Tensor:
        seen[0] += 1
        if seen[0] > frames:
            raise KeyboardInterrupt
        return real(self, frame)

    monkeypatch.setattr(StreamingPredictor, "push", push)
    code, stdout, err = cli("stream", run, feats)
    assert code == 130, err
    want = ["frame", *map(str, range(frames))]  # the header, then the frames streamed
    assert [ln.split(",")[0] for ln in stdout.splitlines()] == want
    assert f"interrupted after {frames} of 40 frames" in err and said in err
    assert "0 to -1" not in err


class _MediaTiny(TinyDataset):
    """The tiny dataset reading "media": 20 frames of a test video at 25 fps; ``narrow.mp4``
    gives video features of the wrong width."""

    def media_features(self, path: Path) -> tuple[dict[str, torch.Tensor], float]:
        video = TinyDataset(TinyParams()).videos("test")[0]
        feats = {m: x[:20] for m, x in video.features.items()}
        if path.name == "narrow.mp4":
            feats["video"] = feats["video"][:, :4]
        return feats, 25.0


def _registry_with(dataset: type[TinyDataset]) -> Registry:
    reg = load_registry(strict=True)
    reg.add("dataset", "tiny", build=dataset, params=TinyParams, summary="test data")
    return reg


@pytest.fixture
def media_cli(monkeypatch, capsys) -> Iterator[Callable[..., tuple[int, str, str]]]:
    yield from user_cli(monkeypatch, capsys, _registry_with(_MediaTiny))


def test_a_media_file_streams_at_its_rate_unless_fps_is_given(run16, tmp_path, media_cli):
    """A dataset that reads media gives the frame rate (25 fps here); --fps overrides it."""
    run, _, _ = run16
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"\0")
    for args, second in (((), "0.040"), (("--fps", "50"), "0.020")):
        out = tmp_path / f"m{len(args)}.csv"
        code, _, err = media_cli("stream", run, media, "--out", out, "-q", *args)
        assert code == 0, err
        rows = _csv(out)
        assert len(rows) == 20 and rows[1]["seconds"] == second


def test_media_features_are_checked_like_a_features_file(run16, tmp_path, media_cli):
    """Features a dataset extracts from media are checked against the run's widths: one line
    naming the modality, not a shape error from inside the model."""
    run, _, _ = run16
    media = tmp_path / "narrow.mp4"
    media.write_bytes(b"\0")
    code, _, err = media_cli("stream", run, media, "-q")
    assert code == 2 and "'video' has 4 features per frame" in err and "expects 5" in err, err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- predict_run


class _OddIds(TinyDataset):
    """The tiny dataset whose videos number their frames 3, 5, 7, ..."""

    def videos(self, split: str) -> list[Video]:
        out = super().videos(split)
        for v in out:
            v.frame_ids = torch.arange(v.num_frames) * 2 + 3
        return out


class _OtherArousal(TinyDataset):
    """The tiny dataset with other arousal labels (features and valence unchanged)."""

    def videos(self, split: str) -> list[Video]:
        out = super().videos(split)
        for v in out:
            v.labels = v.labels.clone()
            v.labels[:, 1] *= 0.5  # still in [-1, 1]
        return out


def test_predict_writes_each_frame_under_the_dataset_frame_id(run16, registry, tmp_path):
    """A dataset that numbers its frames (``frame_ids``) gets its rows under those numbers;
    the predictions are those of the same features without ids."""
    run = run16[0]
    plain = predict_run(run, "test", registry=registry, device="cpu")
    odd = predict_run(run, "test", registry=_registry_with(_OddIds), device="cpu")
    for name, (ids, pred) in odd.per_video.items():
        assert ids.tolist() == [2 * k + 3 for k in range(len(ids))]
        assert torch.equal(pred, plain.per_video[name][1])
    out = tmp_path / "p.csv"
    write_submission([odd], out)
    assert [ln.split(",")[1] for ln in out.read_text().splitlines()[1:4]] == ["3", "5", "7"]


def _only(run: RunPredictions, target: str) -> RunPredictions:
    j = run.targets.index(target)
    per_video = {v: (ids, pred[:, j : j + 1]) for v, (ids, pred) in run.per_video.items()}
    return dataclasses.replace(run, targets=(target,), per_video=per_video)


def test_predictions_of_other_labels_in_any_column_are_not_merged(run16, registry, tmp_path):
    """Runs are merged only on the same labels in every column of the dataset: a valence run
    and an arousal run whose data differ in the arousal labels alone are refused; on the
    same data they merge."""
    run = run16[0]
    base = predict_run(run, "test", registry=registry, device="cpu")
    other = predict_run(run, "test", registry=_registry_with(_OtherArousal), device="cpu")
    assert base.labels is not None and other.labels is not None
    assert all(base.labels[v] != other.labels[v] for v in base.per_video)
    out = tmp_path / "p.csv"
    with pytest.raises(DataError, match="other labels"):
        write_submission([_only(base, "valence"), _only(other, "arousal")], out)
    again = predict_run(run, "test", registry=registry, device="cpu")
    write_submission([_only(base, "valence"), _only(again, "arousal")], out)
    assert out.read_text().startswith("video,frame,valence,arousal\n")


# ----------------------------------------------------------------------------- submission file


def _fake(
    name: str,
    targets: tuple[str, ...],
    videos: dict[str, list[int]],
    rows: dict[str, list[tuple[str, int]]] | None = None,
    labels: dict[str, str] | None = None,
    columns: tuple[str, ...] = ("valence", "arousal"),
) -> RunPredictions:
    per_video = {}
    for v, ids in videos.items():
        t = torch.tensor(ids)
        per_video[v] = (t, torch.stack([t * 0.01 + j for j in range(len(targets))], 1).float())
    return RunPredictions(Path(name), targets, columns, per_video, rows, labels)


def _rows(video: str, frames: range) -> dict[str, list[tuple[str, int]]]:
    return {video: [(f"{video}/{k + 1:05d}.jpg", k) for k in frames]}


@pytest.mark.parametrize(
    ("listed", "padded", "truncated"),
    [(range(4), {}, {}), (range(6), {"a": (2, 6)}, {}), (range(2), {}, {"a": (2, 4)})],
    ids=["exact", "past_the_end", "fewer"],
)
def test_padded_and_truncated_name_each_video_once_and_only_when_so(
    tmp_path, listed, padded, truncated
):
    """A video is padded when a listed frame lies past its last frame id (with how many of its
    listed rows) and truncated when it has frames past the last listed one (how many of its
    frames); a list ending at the last frame is neither, and a video is named once even when
    two runs fill its columns."""
    runs = [
        _fake("v", ("valence",), {"a": [0, 1, 2, 3]}, _rows("a", listed)),
        _fake("r", ("arousal",), {"a": [0, 1, 2, 3]}, _rows("a", listed)),
    ]
    summary = write_submission(runs, tmp_path / "p.csv")
    assert (summary["padded"], summary["truncated"]) == (padded, truncated)


def test_the_summary_counts_rows_videos_and_the_filled_columns(tmp_path):
    """The summary gives the lines written (header excluded), the videos, the columns and
    the columns filled with --missing-value."""
    out = tmp_path / "p.csv"
    run = _fake("v", ("valence",), {"a": [0, 1, 2, 3], "b": [0, 1, 2]})
    summary = write_submission([run], out, missing_value=0.5)
    assert len(out.read_text().splitlines()) == 8
    assert summary == {
        "rows": 7,
        "videos": 2,
        "padded": {},
        "truncated": {},
        "columns": ["valence", "arousal"],
        "missing": ["arousal"],
    }


def test_a_non_finite_prediction_names_its_row_and_writes_nothing(tmp_path):
    """A NaN prediction is never written: a DataError names the official row."""
    run = _fake("v", ("valence", "arousal"), {"a": [0, 1, 2]}, _rows("a", range(3)))
    run.per_video["a"][1][1, 1] = float("nan")
    out = tmp_path / "p.csv"
    with pytest.raises(DataError, match=r"non-finite prediction for a/00002\.jpg"):
        write_submission([run], out)
    assert not out.exists()


def test_a_listed_video_without_predictions_is_named(tmp_path):
    """An official list naming a video the run did not predict is a DataError naming it."""
    rows = {**_rows("a", range(3)), **_rows("b", range(2))}
    run = _fake("v", ("valence", "arousal"), {"a": [0, 1, 2]}, rows)
    with pytest.raises(DataError, match=r"v has no prediction for video 'b'"):
        write_submission([run], tmp_path / "p.csv")


def test_write_submission_refuses_no_runs_and_runs_of_other_label_columns(tmp_path):
    """No run at all, or runs of datasets with other label columns, are refused."""
    out = tmp_path / "p.csv"
    with pytest.raises(DataError, match="no run given"):
        write_submission([], out)
    a = _fake("v", ("valence",), {"a": [0, 1]})
    b = _fake("x", ("arousal",), {"a": [0, 1]}, columns=("arousal", "valence"))
    with pytest.raises(DataError, match=r"x predicts on a dataset with labels \('arousal'"):
        write_submission([a, b], out)
    assert not out.exists()


def test_runs_whose_labels_are_unknown_still_merge(tmp_path):
    """Labels are compared only when both runs know them: a run without a labels record
    (``labels=None``) merges with one that has it, in either order."""
    known = _fake("v", ("valence",), {"a": [0, 1]}, labels={"a": "x"})
    unknown = _fake("r", ("arousal",), {"a": [0, 1]})
    for runs in ([known, unknown], [unknown, known]):
        write_submission(runs, tmp_path / "p.csv")
        lines = (tmp_path / "p.csv").read_text().splitlines()
        assert lines[1:] == ["a,0,0.000000,0.000000", "a,1,0.010000,0.010000"]


def test_the_largest_float32_is_an_accepted_missing_value(tmp_path):
    """--missing-value accepts every finite float32, its largest magnitude included."""
    top = float(torch.finfo(torch.float32).max)
    for value in (top, -top):
        check_missing_value(value)
        write_submission([_fake("v", ("valence",), {"a": [0]})], tmp_path / "p.csv", value)
        row = (tmp_path / "p.csv").read_text().splitlines()[1].split(",")
        assert float(row[3]) == value
    with pytest.raises(DataError, match="--missing-value"):
        check_missing_value(float(np.nextafter(top, np.inf)))


def test_a_row_of_zeros_is_streamed_as_an_absent_frame(run16, tmp_path, cli, registry):
    """A features file carries no presence flags; a row of zeros (a frame without a face, as
    datasets fill it) stays zero after z-scoring, as for the run's own data, instead of
    becoming -mean/std (stream then differed from predict on every faceless frame)."""
    run, _, video = run16
    feats = {m: x[:40].clone() for m, x in video.features.items()}
    feats["video"][[4, 9, 10]] = 0.0
    path = tmp_path / "faceless.safetensors"
    save_file({m: x.contiguous() for m, x in feats.items()}, str(path))
    out = tmp_path / "s.csv"
    code, _, err = cli("stream", run, path, "--fps", "30", "--out", out, "-q")
    assert code == 0, err
    online = torch.tensor([[float(r["valence"]), float(r["arousal"])] for r in _csv(out)])
    session = load_run(run, registry=registry, device="cpu").session
    norm = session.normalizer
    zs = {m: (x - norm.mean[m]) / norm.std[m].clamp(min=norm.eps) for m, x in feats.items()}
    zs["video"][[4, 9, 10]] = 0.0  # independently of Normalizer.apply: absent stays zero
    assert_streams_trailing_windows(session.model, zs, online, WINDOW, (4, 9, 10, 11, 39))
