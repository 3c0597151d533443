"""The commands other than run/report (predict, stream, extract, weights convert, recipe
schema, robustness) keep the project's rules: no wrong number with exit 0, one clear line for
bad input, bounded inputs, no file written into a run or over an earlier file without
--force, progress into a log file, and Ctrl-C/SIGTERM saying what was kept."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fusionkit.core.registry as fk_registry
from fusionkit.core.errors import DataError
from fusionkit.engine import streaming
from fusionkit.engine.files import load_tensors, tensors_metadata
from fusionkit.engine.predict import write_submission
from fusionkit.engine.session import load_run
from tests.conftest import (
    REPO,
    TinyDataset,
    TinyParams,
    make_registry,
    tiny_recipe,
    tiny_stream_run,
    user_cli,
)


class ExtractableTiny(TinyDataset):
    """The tiny dataset with an ``extract`` that is stopped by SIGTERM while it runs."""

    def extract(self, *, workers: int = 1, progress: bool = True):
        _sigterm_self()
        raise AssertionError("SIGTERM did not stop the extraction")


def _sigterm_self() -> None:
    """Send SIGTERM to this process, as `timeout` or a batch scheduler does; refused when
    nothing handles it (it would kill the test process)."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise AssertionError("SIGTERM is not handled here: it would kill the process")
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # the handler raises at the next bytecode boundary
        time.sleep(0.01)


@pytest.fixture(scope="module")
def reg():
    registry = make_registry()
    registry.add("dataset", "tiny_extract", build=ExtractableTiny, params=TinyParams)
    return registry


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reg):
    """A complete tiny run (causal tcn audio encoder, z-scored features) and 60 frames of one
    of its test videos as a features file."""
    return tiny_stream_run(tmp_path_factory.mktemp("commands"), reg, num_threads=1)


@pytest.fixture
def cli(monkeypatch, capsys, reg):
    """The `fusionkit` entry point run as a user does; see :func:`tests.conftest.user_cli`."""
    yield from user_cli(monkeypatch, capsys, reg)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------- F2: non-finite predictions


def test_stream_refuses_a_non_finite_prediction_and_writes_nothing(trained, tmp_path, cli):
    run, _, _ = trained
    huge = tmp_path / "huge.npz"  # finite float32, but inf once z-scored
    np.savez(huge, audio=np.full((5, 6), 3.3e38, np.float32), video=np.zeros((5, 5), np.float32))
    out = tmp_path / "neg.csv"
    code, stdout, err = cli("stream", run, huge, "--out", out)
    assert code == 2, (stdout, err)
    assert f"{huge}: the model predicts a non-finite value at frame 0" in err
    assert "Traceback" not in err and not out.exists()
    code, stdout, err = cli("stream", run, huge, "-q")  # printed, not written: refused too
    assert code == 2 and "non-finite value at frame 0" in err and "nan" not in stdout


# ----------------------------------------------------------------- F3: output files


def _copy_run(run: Path, dest: Path) -> Path:
    """A copy of the module's run, for tests that a regression could damage it in."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def test_file_writers_never_write_into_a_run_and_keep_existing_files(trained, tmp_path, cli):
    run, feats, _ = trained
    run = _copy_run(run, tmp_path / "run")
    before = _tree(run)
    for args in (
        ("predict", run, "--out", run / "model.safetensors"),
        ("predict", run, "--out", run / "new.csv", "--force"),
        ("stream", run, feats, "--out", run / "metrics.json", "--force", "-q"),
        ("recipe", "schema", "--out", run / "schema.json", "--force"),
    ):
        code, _, err = cli(*args)
        assert code == 2, (args, err)
        assert f"is inside the fusionkit run directory {run.resolve()}" in err, err
    assert _tree(run) == before  # nothing replaced, nothing added

    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "grid.json").write_text("{}")
    code, _, err = cli("predict", run, "--out", grid / "sub" / "p.csv")
    assert code == 2 and "inside the fusionkit grid directory" in err

    earlier = tmp_path / "submission.csv"
    earlier.write_text("an earlier submission\n")
    for args in (
        ("predict", run, "--out", earlier),
        ("stream", run, feats, "--out", earlier, "-q"),
        ("recipe", "schema", "--out", earlier),
    ):
        code, _, err = cli(*args)
        assert code == 2 and f"--out {earlier} exists; pass --force to overwrite it" in err
    assert earlier.read_text() == "an earlier submission\n"
    code, _, err = cli("predict", run, "--out", earlier, "--force")
    assert code == 0, err
    assert earlier.read_text().startswith("video,frame,valence,arousal\n")
    code, _, err = cli("stream", run, feats, "--out", earlier, "--force", "-q")
    assert code == 0, err
    assert earlier.read_text().startswith("frame,seconds,valence,arousal,latency_ms\n")


def test_stream_refuses_its_out_before_loading_the_model(trained, tmp_path, cli, monkeypatch):
    run, feats, _ = trained
    import fusionkit.engine.session as session

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(session, "load_run", no_load)
    existing = tmp_path / "s.csv"
    existing.write_text("x\n")
    code, _, err = cli("stream", run, feats, "--out", existing)
    assert code == 2 and "exists; pass --force" in err


def test_an_out_file_in_a_missing_folder_and_an_infinite_fps_are_refused(trained, tmp_path, cli):
    """A mistyped --out folder makes no folder tree (predict created it); --fps inf (or any
    rate over 1000) is refused instead of a seconds column of zeros and a budget of 0 ms."""
    run, feats, _ = trained
    for args in (("predict", run), ("stream", run, feats, "-q")):
        out = tmp_path / "typo" / "sub" / "x.csv"
        code, _, err = cli(*args, "--out", out)
        assert code == 2 and f"the folder {out.parent} does not exist" in err, err
        assert not (tmp_path / "typo").exists()
    for fps in ("inf", "1e308", "5000"):
        code, _, err = cli("stream", run, feats, "--fps", fps, "-q")
        assert code == 2 and "--fps" in err, err


def _audio_cnn_state():
    from fusionkit.cli.weights import _params, find_component

    r = fk_registry.get_registry()
    c = find_component(r, "audio_cnn")
    return r.build(c.kind, c.name, _params(c, []), where="test").state_dict()


def test_weights_convert_refuses_a_run_file_and_an_existing_out(trained, tmp_path, cli):
    run = _copy_run(trained[0], tmp_path / "run")
    src = tmp_path / "cnn.pth"
    torch.save(_audio_cnn_state(), src)
    before = _sha(run / "model.safetensors")
    code, _, err = cli("weights", "convert", src, run / "model.safetensors", "--arch", "audio_cnn")
    assert code == 2 and "OUT" in err and "inside the fusionkit run directory" in err, err
    assert _sha(run / "model.safetensors") == before
    out = tmp_path / "cnn.safetensors"
    assert cli("weights", "convert", src, out, "--arch", "audio_cnn")[0] == 0
    code, _, err = cli("weights", "convert", src, out, "--arch", "audio_cnn")
    assert code == 2 and f"OUT {out} exists; pass --force" in err
    assert cli("weights", "convert", src, out, "--arch", "audio_cnn", "--force")[0] == 0


# ----------------------------------------------------------------- F4: --missing-value


@pytest.mark.parametrize("value", ["1e300", "nan", "inf", "-4e38"])
def test_predict_refuses_a_missing_value_outside_float32(trained, tmp_path, cli, value):
    run, _, _ = trained
    out = tmp_path / "a.csv"
    code, _, err = cli("predict", run, "--out", out, f"--missing-value={value}")
    assert code == 2, err
    assert err.startswith(f"error: --missing-value {float(value)}: give a finite value")
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(DataError, match="--missing-value"):
        write_submission([], out, float(value))


# ----------------------------------------------------------------- F5: bounded inputs


def test_stream_refuses_an_oversized_npz_from_its_headers(trained, tmp_path, cli, monkeypatch):
    run, _, _ = trained
    n = streaming.MAX_STREAM_FRAMES + 1
    bomb = tmp_path / "bomb.npz"  # a few kB compressed
    np.savez_compressed(
        bomb, audio=np.zeros((n, 1), np.float32), video=np.zeros((n, 1), np.float32)
    )
    assert bomb.stat().st_size < 1 << 20

    def no_read(*a, **k):
        raise AssertionError("an array was loaded before its size was checked")

    monkeypatch.setattr(np.lib.format, "read_array", no_read)
    code, _, err = cli("stream", run, bomb, "-q")
    assert code == 2, err
    assert f"{bomb}: modality 'audio' holds {n:,} frames" in err
    assert f"at most {streaming.MAX_STREAM_FRAMES:,} frames" in err


def test_stream_bounds_the_values_of_a_safetensors_input(trained, tmp_path, cli, monkeypatch):
    run, feats, _ = trained
    monkeypatch.setattr(streaming, "MAX_STREAM_FLOATS", 100)  # 60 frames x 11 features
    code, _, err = cli("stream", run, feats, "-q")
    assert code == 2 and "the arrays hold 660 values" in err and "at most 100" in err


def test_stream_names_an_npz_that_is_not_an_archive(trained, tmp_path, cli):
    run, _, _ = trained
    fake = tmp_path / "raw.npz"
    with fake.open("wb") as fh:  # a bare .npy under an .npz name
        np.save(fh, np.zeros((4, 6), np.float32))
    code, _, err = cli("stream", run, fake, "-q")
    assert code == 2 and f"{fake} is not a readable .npz archive" in err, err


# ----------------------------------------------------------------- F6: progress in a log


def test_stream_out_shows_progress_when_stdout_is_a_log(trained, tmp_path, cli):
    run, feats, _ = trained
    code, stdout, err = cli("stream", run, feats, "--out", tmp_path / "s.csv")
    assert code == 0, err
    progress = [ln for ln in stdout.splitlines() if ln.startswith("stream ")]
    assert len(progress) >= 10, stdout  # one line per 5% of the 60 frames
    assert progress[-1].startswith("stream 60/60") and "eta" in progress[-1]
    code, stdout, _ = cli("stream", run, feats, "--out", tmp_path / "q.csv", "-q")
    assert code == 0 and not [ln for ln in stdout.splitlines() if ln.startswith("stream ")]


# ----------------------------------------------------------------- F7, F8: documented behaviour


def test_stream_documents_features_files_not_media(trained, tmp_path, cli, monkeypatch):
    run, _, _ = trained
    monkeypatch.setenv("COLUMNS", "300")  # each help text on one line
    code, stdout, _ = cli("stream", "--help")
    text = " ".join(stdout.split())
    assert code == 0 and "(affwild2)" not in text and "none shipped does" in text
    assert "cpu, cuda, cuda:N or auto" in text and "[default: cpu]" in text
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"\0")
    code, _, err = cli("stream", run, media)
    assert code == 2 and "cannot read media files" in err and "extract caches" in err
    docs = (REPO / "docs" / "recipes.md").read_text()
    assert "can read media (`affwild2`)" not in docs
    assert "equal the offline ones" not in docs
    assert "audio/<backbone>-<key>/<video>.safetensors" in docs


def test_streamed_causal_model_equals_the_model_on_the_whole_video(trained, tmp_path, cli):
    run, feats, video = trained
    out = tmp_path / "s.csv"
    assert cli("stream", run, feats, "--out", out, "-q")[0] == 0
    got = torch.tensor(
        [[float(r["valence"]), float(r["arousal"])] for r in csv.DictReader(out.open())]
    )
    session = load_run(run).session
    x = {m: session.normalizer.apply(m, v[:60])[None] for m, v in video.features.items()}
    with torch.no_grad():
        whole = session.model.eval()(x, torch.ones(1, 60, dtype=torch.bool)).pred[0]
    torch.testing.assert_close(got, whole.float(), atol=2e-6, rtol=0)


# ----------------------------------------------------------------- F9: converted dtypes


def test_weights_convert_stores_the_module_dtype_and_refuses_float32_overflow(tmp_path, cli):
    sd = _audio_cnn_state()
    key = next(k for k, v in sd.items() if v.is_floating_point())
    src, out = tmp_path / "f64.pth", tmp_path / "f64.safetensors"
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in sd.items()}, src)
    assert cli("weights", "convert", src, out, "--arch", "audio_cnn")[0] == 0
    tensors, _ = load_tensors(out)
    assert tensors[key].dtype == torch.float32  # what the module holds
    huge = dict(sd)
    huge[key] = sd[key].double() * 1e300
    torch.save(huge, src)
    out2 = tmp_path / "huge.safetensors"
    code, _, err = cli("weights", "convert", src, out2, "--arch", "audio_cnn")
    assert code == 2 and f"tensor {key!r} holds float64 values beyond float32's range" in err
    assert not out2.exists()


# ----------------------------------------------------------------- F11: non-UTF-8 paths


def test_runs_and_features_under_non_utf8_paths_are_read(trained, tmp_path, cli):
    run, feats, _ = trained
    odd = _copy_run(run, tmp_path / os.fsdecode(b"q\xff x"))
    assert tensors_metadata(odd / "model.safetensors")  # the run's metadata, read
    out = tmp_path / "p.csv"
    code, _, err = cli("predict", odd, "--out", out)
    assert code == 0, err
    assert "may be truncated" not in err
    code, _, err = cli("predict", run, "--out", tmp_path / "ref.csv")
    assert code == 0 and out.read_text() == (tmp_path / "ref.csv").read_text()
    odd_feats = tmp_path / os.fsdecode(b"v\xff.safetensors")
    shutil.copy(feats, odd_feats)
    code, stdout, err = cli("stream", run, odd_feats, "-q")
    assert code == 0 and "streamed 60 frames" in stdout, err


# ----------------------------------------------------------------- F13: interruptions


def _stop_after(monkeypatch, frames: int, how: str) -> None:
    real = streaming.StreamingPredictor.push
    seen = [0]

    def push(self, frame):
        seen[0] += 1
        if seen[0] > frames:
            if how == "sigterm":
                _sigterm_self()
            raise KeyboardInterrupt
        return real(self, frame)

    monkeypatch.setattr(streaming.StreamingPredictor, "push", push)


@pytest.mark.parametrize(("how", "code"), [("ctrl-c", 130), ("sigterm", 143)])
def test_interrupted_stream_says_what_was_kept(trained, tmp_path, cli, monkeypatch, how, code):
    run, feats, _ = trained
    out = tmp_path / "rt.csv"
    _stop_after(monkeypatch, 6, how)
    got, _, err = cli("stream", run, feats, "--out", out)
    assert got == code, err
    assert "interrupted after 6 of 60 frames" in err and "was not written" in err
    assert "run the same command again" in err and not out.exists()
    out.write_text("earlier\n")  # replaced only by a stream that finished
    got, _, err = cli("stream", run, feats, "--out", out, "--force")
    assert got == code and out.read_text() == "earlier\n"


def test_sigterm_during_robustness_keeps_values_and_says_so(trained, tmp_path, cli, monkeypatch):
    import fusionkit.studies.robustness as rob

    copy = _copy_run(trained[0], tmp_path / "rob")
    real = rob.run_recipe_robustness

    def stopping(rdir, specs, on_value=None, **kw):
        count = [0]

        def each(split, value, metrics):
            on_value(split, value, metrics)
            count[0] += 1
            if count[0] == 2:
                _sigterm_self()

        return real(rdir, specs, on_value=each, **kw)

    monkeypatch.setattr(rob, "run_recipe_robustness", stopping)
    args = ("robustness", copy, "--perturb", "shift", "--axis", "k", "--values=-4,0,4,8")
    code, _, err = cli(*args, "--param", "modality=video", "--name", "sh")
    assert code == 143, err
    assert "interrupted" in err and "values computed so far are kept" in err
    assert "run the same command again" in err
    rec = json.loads((copy / "robustness" / "sh.json").read_text())
    assert list(rec["results"]["test"]) == ["-4", "0"]


def test_sigterm_during_extract_says_caches_are_kept(tmp_path, cli):
    raw = tiny_recipe(tmp_path)
    raw["data"]["name"] = "tiny_extract"
    recipe = tmp_path / "x.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    code, _, err = cli("extract", recipe, "-q")
    assert code == 143, err
    assert "interrupted: finished caches are kept; run the same command to resume" in err


# ----------------------------------------------------------------- F14: messages and help


def test_robustness_blames_a_wrong_param_on_param(trained, cli):
    run, _, _ = trained
    code, _, err = cli(
        "robustness", run, "--perturb", "shift", "--param", "modalty=audio", "--axis", "k",
        "--values=-10",
    )  # fmt: skip
    assert code == 2, err
    assert "--param modalty: unknown key (did you mean 'modality'?)" in err
    assert "values.0" not in err


def test_recipe_schema_says_what_it_wrote(tmp_path, cli):
    out = tmp_path / "schema.json"
    code, stdout, _ = cli("recipe", "schema", "--out", out)
    assert code == 0 and f"wrote {out}" in " ".join(stdout.split())
    assert json.loads(out.read_text())


def test_weights_convert_of_a_protocol_4_pickle_is_one_line(tmp_path, cli):
    import pickle

    src = tmp_path / "evil.pth"
    src.write_bytes(pickle.dumps({"w": torch.zeros(2)}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli(
            "weights", "convert", src, tmp_path / "o.safetensors", "--arch", "audio_cnn"
        )
    assert code == 2 and "Detected pickle protocol" not in err
    assert not [w for w in caught if "pickle protocol" in str(w.message)]


def test_predict_warns_when_data_settings_change_an_evaluated_split(trained, tmp_path, cli):
    """`predict --data` settings that deliver other data under the name of a split the run
    was evaluated on (another fold, other features) are warned about: the file is not of the
    data the metrics are; settings that deliver the same data are not."""
    run, _, _ = trained
    code, _, err = cli("predict", run, "--split", "val", "--out", tmp_path / "a.csv",
                       "--data", "seed=1")  # fmt: skip
    assert code == 0, err
    assert "the --data settings change split 'val'" in err and "the val features" in err
    code, _, err = cli("predict", run, "--split", "val", "--out", tmp_path / "b.csv",
                       "--data", "seed=0")  # fmt: skip
    assert code == 0 and "--data settings change" not in err, err
