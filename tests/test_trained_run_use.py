"""Using a trained run: ``--data`` never changes how the model sees data, ``stream`` runs in
the run's precision and says when its numbers are not the whole video's, a command-line
robustness sweep never replaces another of the same name, and ``weights convert`` names a
tensor of the wrong kind.

Expectations are independent of fusionkit's own output: numbers come from the run's stored
predictions, messages from what the user needs to know.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusionkit.core.errors import CheckpointError, FusionkitError
from fusionkit.core.recipe import validate_recipe
from fusionkit.engine.predict import predict_run
from fusionkit.engine.runs import RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.train import Trainer
from tests.conftest import TinyDataset, TinyParams, tiny_recipe, tiny_stream_run


def _run(parent, registry, name, **training):
    raw = tiny_recipe(parent, epochs=1, num_threads=1, **training)
    raw["output"]["name"] = name
    raw["data"]["normalize"] = "zscore"
    rc = validate_recipe(raw, f"{name}.yaml", registry)
    with RunDir.create(rc, registry) as run:
        Trainer(build_session(rc, registry), run).fit()
    return run.path


@pytest.fixture(scope="module")
def zrun(tmp_path_factory, registry):
    """A complete 1-epoch tiny run whose features are z-scored."""
    return _run(tmp_path_factory.mktemp("review_b"), registry, "z")


@pytest.mark.parametrize("item", ["data.normalize=none", "data.window=200", "data.hop=3"])
def test_predict_refuses_a_data_override_that_drops_the_runs_normalisation(zrun, registry, item):
    """``--data`` chooses which data is read; an override of the z-scoring, the windows or
    the hop would feed the model inputs it was not trained on and is refused by key."""
    clean = predict_run(zrun, "test", registry=registry, device="cpu")
    stored = load_file(str(zrun / "predictions" / "test.safetensors"))
    name = next(iter(clean.per_video))
    # sanity: without overrides, predict gives the run's own predictions
    torch.testing.assert_close(clean.per_video[name][1], stored[f"pred/{name}"])
    key = item.split("=")[0]
    with pytest.raises(FusionkitError, match=rf"{key}: the run was trained with .*leave {key}"):
        predict_run(zrun, "test", data_overrides=[item], registry=registry, device="cpu")


def test_a_second_sweep_of_the_same_default_name_keeps_the_first_sweeps_values(tmp_path, zrun, cli):
    """A command-line sweep whose default name (``shift_k``) is taken by a stored sweep with
    other params is refused, naming the file and --name; the first sweep's values stay."""
    run = tmp_path / "r"
    shutil.copytree(zrun, run)
    sweep = ("--perturb", "shift", "--axis", "k", "--values=0,3")
    code, _, err = cli("robustness", run, *sweep, "--param", "modality=audio")
    assert code == 0, err
    path = run / "robustness" / "shift_k.json"
    before = path.read_bytes()
    code, _, err = cli("robustness", run, *sweep, "--param", "modality=video")
    assert code != 0 and "holds another sweep of the name 'shift_k'" in err, err
    assert "--name" in err and path.read_bytes() == before
    code, _, err = cli("robustness", run, *sweep, "--param", "modality=video", "--name", "v")
    assert code == 0, err
    kept = {p.stem: json.loads(p.read_text())["params"]["modality"] for p in path.parent.iterdir()}
    assert kept == {"shift_k": "audio", "v": "video"}


def test_stream_says_when_the_context_is_shorter_than_the_receptive_field(tmp_path, registry, cli):
    """A context shorter than a causal encoder's receptive field truncates what it sees: the
    stream says so in a note; with the default context (the run's window) it says nothing."""
    run, feats, _ = tiny_stream_run(tmp_path, registry, frames=40, num_threads=1)
    code, _, err = cli("stream", run, feats, "--context", "2", "-q")
    assert code == 0, err
    assert "note:" in err and "has a receptive field of" in err and "than the 2 frames" in err
    code, _, err = cli("stream", run, feats, "--fps", "30", "-q")
    assert code == 0 and "note:" not in err, err


def test_stream_of_a_bf16_frame_local_run_matches_its_offline_predictions(tmp_path, registry, cli):
    """A run evaluated in bf16 is streamed in bf16: a frame-local model's streamed numbers are
    its stored offline predictions."""
    run = _run(tmp_path / "runs", registry, "bf", precision="bf16")
    video = TinyDataset(TinyParams()).videos("test")[0]
    feats = tmp_path / "v.safetensors"
    save_file({m: x[:50].contiguous() for m, x in video.features.items()}, str(feats))
    out = tmp_path / "s.csv"
    code, _, err = cli("stream", run, feats, "--out", out, "-q")
    assert code == 0, err
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    online = torch.tensor([[float(r[2]), float(r[3])] for r in rows])
    offline = load_file(str(run / "predictions" / "test.safetensors"))[f"pred/{video.name}"][:50]
    assert (online - offline).abs().max() < 1e-4


def test_weights_convert_names_the_tensor_of_the_wrong_kind(tmp_path, registry):
    """Integers where the module holds floats are refused naming the tensor and both dtypes,
    not with load_state_dict's first line."""
    from fusionkit.cli.weights import convert_weights

    comp = registry.get("visual_backbone", "face_cnn")
    with torch.device("meta"):
        module = registry.build("visual_backbone", "face_cnn", comp.params(), where="t")
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in module.state_dict().items()}
    sd["proj.bias"] = torch.zeros(sd["proj.bias"].shape, dtype=torch.int64)
    src = tmp_path / "w.pth"
    torch.save(sd, src)
    with pytest.raises(CheckpointError) as info:
        convert_weights(src, tmp_path / "w.safetensors", "face_cnn", registry=registry)
    assert "'proj.bias' (int64 in the file, float32 in the module)" in str(info.value)


def test_eval_of_a_file_in_a_run_names_the_run_folder(zrun, cli):
    """`eval RUN/model.safetensors` says that is a file and which folder is the run, not
    that the run directory was not found."""
    code, _, err = cli("eval", zrun / "model.safetensors")
    assert code != 0
    assert "is a file, not a run directory" in err and f"({zrun})" in err, err


def test_robustness_runs_with_the_threads_the_run_was_evaluated_with(tmp_path, zrun, cli):
    """A sweep repeats the run's metrics at strength 0 only with the thread count they were
    computed with (float sums): it uses the run's, as eval does; --device chooses where."""
    run = tmp_path / "r"
    shutil.copytree(zrun, run)
    metrics = json.loads((run / "metrics.json").read_text())
    torch.set_num_threads(2)
    try:
        sweep = ("--perturb", "shift", "--param", "modality=audio", "--axis", "k", "--values=0")
        code, _, err = cli("robustness", run, *sweep, "--device", "cpu")
        assert code == 0, err
        assert torch.get_num_threads() == metrics["cpu_threads"] == 1
    finally:
        torch.set_num_threads(1)
    rec = json.loads((run / "robustness" / "shift_k.json").read_text())
    at_zero = rec["results"]["test"]["0"]["metrics"]
    assert at_zero["ccc_mean"] == metrics["splits"]["test"]["ccc_mean"]
    code, _, err = cli("robustness", run, *sweep, "--device", "tpu")
    assert code != 0 and "--device" in err, err


def _with_components(run, edit) -> None:
    """Rewrite the components run.json records (run.json is not among the hashed files)."""
    marker = json.loads((run / "run.json").read_text())
    for c in marker["components"]:
        edit(c)
    (run / "run.json").write_text(json.dumps(marker))


def test_a_run_built_by_another_plugin_version_says_so_and_a_missing_one_is_named(
    tmp_path, zrun, registry, cli
):
    """Reloading compares the plugins run.json records with those installed: another version
    of one warns (its numbers may differ), one no plugin provides is refused naming the
    distribution and version to install."""
    from fusionkit.engine.session import load_run

    run = tmp_path / "r"
    shutil.copytree(zrun, run)
    recorded = json.loads((run / "run.json").read_text())["components"]
    fusion = next(c for c in recorded if c["kind"] == "fusion")

    def older(c: dict) -> None:
        if c["kind"] == "fusion":
            c["version"] = "0.0.1"

    _with_components(run, older)
    with pytest.warns(UserWarning, match=rf"fusion '{fusion['name']}' \(.* 0\.0\.1 built it"):
        load_run(run, device="cpu", registry=registry)

    def gone(c: dict) -> None:
        if c["kind"] == "fusion":
            c["name"] = "retired_fusion"

    _with_components(run, gone)
    with pytest.raises(CheckpointError, match=r"fusion 'retired_fusion' from .* 0\.0\.1, which no"):
        load_run(run, device="cpu", registry=registry)


def test_a_run_whose_plugin_is_gone_names_it_for_every_command(tmp_path, cli):
    """A run built with a component no installed plugin provides now: reading its recipe (as
    eval, robustness and runs list do first) names the distribution to install, where it read
    as a damaged recipe ('unknown fusion', with a suggestion of another one)."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.runs import RunDir
    from fusionkit.studies.grid import train_and_evaluate
    from tests.conftest import make_registry, tiny_recipe

    with_plugin = make_registry()
    concat = with_plugin.get("fusion", "concat")
    with_plugin.add("fusion", "gone_concat", build=concat.build)
    raw = tiny_recipe(tmp_path, epochs=1, num_threads=1)
    raw["model"]["fusion"] = {"name": "gone_concat"}
    rc = validate_recipe(raw, "r.yaml", with_plugin)
    with RunDir.create(rc, with_plugin) as run:
        train_and_evaluate(rc, run, resume=False, registry=with_plugin)
    without = make_registry()
    with pytest.raises(CheckpointError) as info:
        RunDir(run.path).recipe(without)
    msg = str(info.value)
    assert "was built with fusion 'gone_concat' from" in msg and "pip install '" in msg
    assert "unknown fusion" not in msg
