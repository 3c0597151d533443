"""Fault injection: every way found to get a wrong number with exit 0, to lose a user's file, to
blow up memory or to print a traceback for a user mistake ends in a clear error instead.

Each test names the failure it injects; docs/reliability.md lists the guarantees they cover.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fusionkit.core.errors import CheckpointError, DataError, RecipeError, TrainingError
from fusionkit.core.overrides import parse_overrides
from fusionkit.core.recipe import load_recipe, validate_recipe
from fusionkit.core.yamlio import MAX_FILE_BYTES
from fusionkit.engine.files import file_sha256
from fusionkit.engine.runs import BEST_FILE, METRICS_FILE, STATE_FILE, RunDir
from fusionkit.engine.session import build_session
from fusionkit.engine.train import Trainer
from fusionkit.studies.grid import run_grid
from tests.conftest import REPO, make_distribution, tiny_plugin_env, tiny_recipe


def fk(args, env=None, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fusionkit", *args],
        env=env or dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(proc, *fragments):
    """Exit 2, no traceback, one `error:` line holding every fragment."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def train(tmp_path, registry, hook=None, **training):
    rc = validate_recipe(tiny_recipe(tmp_path, **training), "tiny.yaml", registry)
    with RunDir.create(rc, registry) as run:
        result = Trainer(build_session(rc, registry), run, on_epoch_end=hook).fit()
    return rc, run.path, result


def resume(rc, path, registry):
    with RunDir.open(path) as run:
        run.check_same_training(rc, registry)
        return Trainer(build_session(rc, registry), run).fit(resume=True)


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# ----------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("training.lr=.inf", "training.lr"),
        ("training.weight_decay=.nan", "training.weight_decay"),
        ("model.head.params.dropout=.nan", "model.head.params.dropout"),
    ],
)
def test_non_finite_floats_are_rejected_by_validation(tmp_path, registry, override, where):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path)))
    with pytest.raises(RecipeError, match=where.replace(".", r"\.")):
        load_recipe(path, [override], registry)


def test_non_finite_perturbation_fill_is_rejected(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["training"]["perturbations"] = [
        {"name": "span_dropout", "params": {"rate": 0.2, "fill": float("nan")}}
    ]
    with pytest.raises(RecipeError, match=r"training\.perturbations\.0\.params\.fill"):
        validate_recipe(raw, "r.yaml", registry)


def test_a_plugin_params_model_allowing_nan_still_gets_finite_params(tmp_path, registry):
    from pydantic import BaseModel

    from fusionkit.core.registry import Registry

    class Loose(BaseModel):
        model_config = {"extra": "forbid"}
        scale: float = 1.0

    reg = Registry(_kinds=dict(registry._kinds), _items=dict(registry._items))
    reg.add("head", "loose_head", build=lambda p, *, in_dim, n_targets: None, params=Loose)
    raw = tiny_recipe(tmp_path)
    raw["model"]["head"] = {"name": "loose_head", "params": {"scale": float("inf")}}
    with pytest.raises(RecipeError, match=r"model\.head\.params: scale must be finite"):
        validate_recipe(raw, "r.yaml", reg)


class _NaNDataset:
    """The tiny data with one non-finite feature value in one video."""

    def __init__(self, base):
        self.base = base
        self.feature_dims = base.feature_dims
        self.targets = base.targets

    def splits(self):
        return self.base.splits()

    def videos(self, split):
        out = list(self.base.videos(split))
        if split == "train":
            import dataclasses

            bad = out[1].features["video"].clone()
            bad[17, 2] = float("nan")
            out[1] = dataclasses.replace(out[1], features={**out[1].features, "video": bad})
        return out


def test_a_dataset_delivering_non_finite_features_is_rejected_at_load(tmp_path, registry):
    rc = validate_recipe(tiny_recipe(tmp_path), "r.yaml", registry)
    session = build_session(rc, registry)
    session.dataset = session.train_dataset = _NaNDataset(session.dataset)
    with pytest.raises(DataError, match=r"video 'train_1' has non-finite video features.*frame 17"):
        session.store("train")


def test_a_non_finite_loss_stops_training_naming_epoch_step_and_modality(tmp_path, registry):
    rc = validate_recipe(tiny_recipe(tmp_path, epochs=3), "r.yaml", registry)
    session = build_session(rc, registry)
    with RunDir.create(rc, registry) as run:
        trainer = Trainer(session, run)
        real_store = session.store

        def poisoned(split, dataset=None):
            store = real_store(split, dataset)
            if split == "train":  # bypasses the load check, as a bug in a component would
                store.features["audio"][5] = float("inf")
            return store

        session.store = poisoned
        with pytest.raises(TrainingError) as info:
            trainer.fit()
    text = str(info.value)
    assert "not finite at epoch 1, step" in text and "the audio inputs" in text
    assert not (run.path / METRICS_FILE).exists() and not (run.path / STATE_FILE).exists()


def test_a_diverging_model_stops_training_and_writes_no_metrics(tmp_path, registry):
    class Exploding(torch.nn.Module):
        frame_local = True

        def __init__(self, in_dim, n_targets):
            super().__init__()
            self.lin = torch.nn.Linear(in_dim, n_targets)

        def forward(self, x, mask):
            return self.lin(x) * torch.tensor(float("nan"))

    from fusionkit.core.registry import Registry

    reg = Registry(_kinds=dict(registry._kinds), _items=dict(registry._items))
    reg.add("head", "nan_head", build=lambda p, *, in_dim, n_targets: Exploding(in_dim, n_targets))
    raw = tiny_recipe(tmp_path)
    raw["model"]["head"] = {"name": "nan_head"}
    rc = validate_recipe(raw, "r.yaml", reg)
    with RunDir.create(rc, reg) as run, pytest.raises(TrainingError) as info:
        Trainer(build_session(rc, reg), run).fit()
    assert "not finite at epoch 1, step 1 of" in str(info.value)
    assert "the inputs were finite, so the model diverged" in str(info.value)
    assert not (run.path / METRICS_FILE).exists()


def test_metrics_files_are_strict_json(tmp_path, registry):
    _, path, _ = train(tmp_path, registry, epochs=1)
    text = (path / METRICS_FILE).read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))


def test_json_writer_turns_non_finite_into_null(tmp_path):
    from fusionkit.engine.files import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("-inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": None, "b": [1.0, None]}


@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_a_failed_file_write_leaves_the_earlier_file_intact(tmp_path, monkeypatch, fails):
    """Every run file goes through one writer: a disk that fills up (or a rename refused)
    halfway leaves the earlier content byte for byte, no temporary file, and one clear error."""
    import errno

    from fusionkit.core.errors import CheckpointError
    from fusionkit.engine import files

    path = tmp_path / "metrics.json"
    files.atomic_write_json(path, {"splits": {"test": {"ccc_mean": 0.5}}})
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, fails, full)
    with pytest.raises(CheckpointError, match=r"could not write .*No space left.*is intact"):
        files.atomic_write_json(path, {"splits": {"test": {"ccc_mean": 0.9}}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


# ----------------------------------------------------------------------- resume consistency


def test_resume_after_a_deleted_best_checkpoint_refuses(tmp_path, registry):
    def stop(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=4), "r.yaml", registry)
    with RunDir.create(rc, registry) as run, pytest.raises(KeyboardInterrupt):
        Trainer(build_session(rc, registry), run, on_epoch_end=stop).fit()
    (run.path / BEST_FILE).unlink()
    before = snapshot(run.path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing but the training"):
        resume(rc, run.path, registry)
    assert snapshot(run.path) == before  # nothing rewritten


def test_resume_after_a_replaced_best_checkpoint_refuses(tmp_path, registry):
    rc, path, _ = train(tmp_path, registry, epochs=2)
    _, other, _ = train(tmp_path / "o", registry, epochs=2, seed=5)
    (path / BEST_FILE).write_bytes((other / BEST_FILE).read_bytes())
    with RunDir(path) as run:
        run.mark_running()  # as if the end had not been reached
    with pytest.raises(CheckpointError, match="is not the file saved at epoch"):
        resume(rc, path, registry)


def test_a_kill_between_best_weights_and_state_resumes_to_the_same_result(tmp_path, registry):
    """New best weights are journaled (model.next -> state -> rename): a leftover from an
    uncommitted epoch is rolled back, one from a committed epoch rolled forward."""
    _, _, full = train(tmp_path / "full", registry, epochs=4)

    def stop(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    rc = validate_recipe(tiny_recipe(tmp_path / "cut", epochs=4), "r.yaml", registry)
    with RunDir.create(rc, registry) as run, pytest.raises(KeyboardInterrupt):
        Trainer(build_session(rc, registry), run, on_epoch_end=stop).fit()
    # an uncommitted best of an epoch 3 that the kill interrupted
    (run.path / "model.next.safetensors").write_bytes(b"half-written weights")
    out = resume(rc, run.path, registry)
    assert out.metrics == full.metrics
    assert not (run.path / "model.next.safetensors").exists()


def test_resume_cleans_temporary_files_of_a_killed_write(tmp_path, registry):
    def stop(epoch, record):
        if epoch == 1:
            raise KeyboardInterrupt

    from fusionkit.studies.grid import train_and_evaluate

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=2), "r.yaml", registry)
    with RunDir.create(rc, registry) as run, pytest.raises(KeyboardInterrupt):
        train_and_evaluate(rc, run, resume=False, registry=registry, on_epoch_end=stop)
    leftover = run.path / ".metrics.json.x1y2.tmp"
    leftover.write_text("{")
    (run.path / "predictions").mkdir()
    (run.path / "predictions" / ".val.safetensors.z.tmp").write_text("x")
    with RunDir.open(run.path) as again:
        train_and_evaluate(rc, again, resume=True, registry=registry)
    assert not leftover.exists() and not list(run.path.rglob("*.tmp"))


def test_metrics_are_written_after_predictions_and_completion_last(tmp_path, registry, monkeypatch):
    from fusionkit.engine import files

    order = []
    real = files.save_tensors, files.atomic_write_json

    def tensors(path, *a, **k):
        order.append(Path(path).name)
        return real[0](path, *a, **k)

    def js(path, *a, **k):
        order.append(Path(path).name)
        return real[1](path, *a, **k)

    import fusionkit.engine.runs as runs_mod
    import fusionkit.engine.train as train_mod

    monkeypatch.setattr(train_mod, "save_tensors", tensors)
    monkeypatch.setattr(train_mod, "atomic_write_json", js)
    monkeypatch.setattr(runs_mod, "atomic_write_json", js)
    _, path, _ = train(tmp_path, registry, epochs=1)
    tail = order[order.index("val.safetensors") :]
    assert tail == ["val.safetensors", "test.safetensors", "metrics.json", "run.json"]
    marker = json.loads((path / "run.json").read_text())
    assert marker["status"] == "complete"
    assert marker["files"]["metrics.json"] == file_sha256(path / "metrics.json")


def test_a_run_without_its_completion_marker_is_not_finished(tmp_path, registry):
    """A kill after metrics.json but before the marker: the grid trains the point again
    (resuming it), rather than counting it as finished without its files."""
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["sweep"] = {"training.seed": [0]}
    rc = validate_recipe(raw, "g.yaml", registry)
    run_grid(rc, registry=registry)
    point = tmp_path / "tiny" / "seed-0"
    with RunDir.open(point) as run:
        run.mark_running()
    (point / "predictions" / "test.safetensors").unlink()
    record = run_grid(rc, registry=registry)
    assert record["runs"]["seed-0"]["status"] == "done"
    assert (point / "predictions" / "test.safetensors").is_file()
    assert RunDir(point).is_complete()


# ----------------------------------------------------------------------- run directories


@pytest.fixture
def cli(tmp_path):
    env = tiny_plugin_env(tmp_path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    recipe = tmp_path / "tiny.yaml"
    raw = tiny_recipe(tmp_path / "runs", epochs=2)
    recipe.write_text(yaml.safe_dump(raw))
    return env, recipe


def test_resume_of_a_repeated_run_continues_that_run_and_a_finished_run_is_left_alone(
    cli, tmp_path, cli_inproc
):
    _, recipe = cli
    assert cli_inproc(["run", str(recipe), "-q"]).returncode == 0
    second = cli_inproc(["run", str(recipe), "-q"])
    assert second.returncode == 0, second.stderr
    first_dir, second_dir = tmp_path / "runs" / "tiny", tmp_path / "runs" / "tiny-2"
    assert RunDir(second_dir).is_complete()
    before = snapshot(first_dir), snapshot(second_dir)
    for args in (["resume", str(second_dir)], ["run", str(recipe), "--resume"],
                 ["run", str(recipe), "output.name=tiny-2", "--resume"]):  # fmt: skip
        proc = cli_inproc([*args, "-q"])
        assert proc.returncode == 0, proc.stderr
        assert "complete already; nothing to do" in proc.stdout
    assert (snapshot(first_dir), snapshot(second_dir)) == before


def test_resume_of_a_folder_without_a_run_is_an_error(cli, tmp_path, cli_inproc):
    _, recipe = cli
    one_line_error(cli_inproc(["run", str(recipe), "--resume"]), "there is no run in")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.json").write_text('{"my": "numbers"}')
    one_line_error(cli_inproc(["resume", str(tmp_path / "mine")]), "not a fusionkit run")
    assert (tmp_path / "mine" / "metrics.json").read_text() == '{"my": "numbers"}'


def test_a_run_failing_before_its_first_epoch_leaves_no_folder(cli, tmp_path, cli_inproc):
    _, recipe = cli
    proc = cli_inproc(["run", str(recipe), "model.targets=[valence, dominance]"])
    one_line_error(proc, "model.targets", "dominance")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_grid_never_writes_into_a_folder_it_did_not_create(tmp_path, registry):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["sweep"] = {"training.seed": [0, 1]}
    rc = validate_recipe(raw, "g.yaml", registry)
    grid = tmp_path / "tiny"
    (grid / "seed-0").mkdir(parents=True)
    (grid / "grid.json").write_text(json.dumps({"created_by": "fusionkit", "runs": {}}))
    (grid / "seed-0" / "metrics.json").write_text('{"mine": 1}')
    record = run_grid(rc, registry=registry)
    assert record["runs"]["seed-0"]["status"] == "failed"
    assert "fusionkit did not create it" in record["runs"]["seed-0"]["error"]
    assert record["runs"]["seed-1"]["status"] == "done"
    assert (grid / "seed-0" / "metrics.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in (grid / "seed-0").iterdir()) == ["metrics.json"]


def test_a_grid_refuses_an_existing_folder_without_its_record(tmp_path, registry):
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["sweep"] = {"training.seed": [0]}
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="was not made by a fusionkit grid"):
        run_grid(validate_recipe(raw, "g.yaml", registry), registry=registry)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["notes.txt"]


def test_parallel_runs_never_claim_the_same_directory(tmp_path, registry):
    """Eight runs of one recipe started at the same moment get eight directories (an atomic
    mkdir, not check-then-create)."""
    import threading

    rc = validate_recipe(tiny_recipe(tmp_path), "r.yaml", registry)
    start = threading.Barrier(8)
    made: list[Path] = []

    def create() -> None:
        start.wait()
        made.append(RunDir.create(rc, registry).path)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == len(set(made)) == 8
    assert {p.name for p in made} == {"tiny"} | {f"tiny-{k}" for k in range(2, 9)}


def test_a_second_process_on_a_locked_run_says_who_holds_it(cli, tmp_path):
    env, recipe = cli
    assert fk(["run", str(recipe), "-q", "training.epochs=1"], env, tmp_path).returncode == 0
    with RunDir.open(tmp_path / "runs" / "tiny") as run:  # held by this test process
        run.mark_running()
        proc = fk(["resume", str(run.path)], env, tmp_path)
    one_line_error(proc, "is in use by pid", str(os.getpid()))


@pytest.mark.parametrize("name", ["../escape", "a/b", "[/]", "[link=http://x]y", ".hidden"])
def test_output_names_cannot_escape_or_alter_the_console(tmp_path, registry, name):
    raw = tiny_recipe(tmp_path)
    raw["output"]["name"] = name
    with pytest.raises(RecipeError, match=r"output\.name: a name is 1-100 letters") as err:
        validate_recipe(raw, "r.yaml", registry)
    assert "pattern" not in str(err.value) and "[A-Za-z" not in str(err.value)


def test_markup_in_printed_text_is_shown_verbatim(cli, cli_inproc):
    _, recipe = cli
    proc = cli_inproc(["run", str(recipe), "-q", "evaluation.splits=[val, '[bold]x[/]']"])
    one_line_error(proc, "'[bold]x[/]'")


# ----------------------------------------------------------------------- bounded inputs


def _bomb(anchor: str, base: str, levels: int = 9) -> str:
    """YAML lines where each level repeats the previous one ten times: 10**levels values."""
    lines = [f"l0: &l0 [{', '.join(['*' + anchor] * 10)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(f"{base}{line}" for line in lines) + "\n"


@pytest.mark.parametrize("command", ["validate", "show"])
@pytest.mark.parametrize("where", ["description", "sweep"])
def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path, command, where, cli_inproc):
    text = (REPO / "recipes" / "quickstart.yaml").read_text()
    if where == "sweep":  # the bomb's values are a grid axis
        text += "sweep:\n  training.seed: &s [0]\n" + _bomb("s", "  x_")
    else:  # anywhere in the file
        text += "extra_anchor: &s [lol]\n" + _bomb("s", "")
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    proc = cli_inproc(["recipe", command, str(path)])
    assert time.perf_counter() - t0 < 10  # refused before anything walks the values
    one_line_error(proc, str(path), "expands to more than")


def test_huge_deep_and_binary_recipes_end_in_one_line(tmp_path, cli_inproc):
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * (MAX_FILE_BYTES + 10) + "\n")
    one_line_error(cli_inproc(["recipe", "validate", str(big)]), "a recipe is at most")
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 10_000 + "]" * 10_000 + "\n")
    one_line_error(cli_inproc(["recipe", "validate", str(deep)]), "nested more than")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line_error(cli_inproc(["recipe", "validate", str(binary)]), "not UTF-8 text")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.num_threads=1000000", "training.num_threads"),
        ("data.window=1e9", "data.window"),
        (f"training.seed={2**63}", "training.seed"),
        ("training.seed=-1", "training.seed"),
        ("training.batch_size=100000000", "training.batch_size"),
    ],
)
def test_sizes_and_seeds_are_bounded(override, fragment):
    with pytest.raises(RecipeError) as info:
        load_recipe(REPO / "recipes" / "quickstart.yaml", [override])
    assert str(info.value).count("\n") == 0 and f": {fragment}:" in str(info.value)


def test_error_messages_never_build_the_whole_text_of_a_huge_value(tmp_path, registry):
    raw = tiny_recipe(tmp_path)
    raw["training"]["epochs"] = list(range(1_000_000))
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, "r.yaml", registry)
    assert len(str(info.value)) < 400


# ----------------------------------------------------------------------- one line, no traceback


def test_an_override_with_a_control_character_is_one_line():
    with pytest.raises(RecipeError, match="control character"):
        parse_overrides(["training.lr=\x01"])


def test_a_params_model_check_reads_cleanly(cli_inproc):
    proc = cli_inproc(
        [
            "recipe",
            "validate",
            str(REPO / "recipes" / "quickstart.yaml"),
            "data.params.min_frames=900",
            "data.params.max_frames=800",
        ]
    )
    line = one_line_error(proc, "data.params: min_frames (900) must not exceed max_frames (800)")
    assert "Value error" not in line and "params.:" not in line and "mapping" not in line


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run made through the CLI, copied fresh for each damaging test."""
    tmp = tmp_path_factory.mktemp("finished")
    env = tiny_plugin_env(tmp, OMP_NUM_THREADS="1")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp / "runs", epochs=2)))
    assert fk(["run", str(recipe), "-q"], env, tmp).returncode == 0
    return env, tmp / "runs" / "tiny"


@pytest.fixture
def damaged(finished, tmp_path):
    import shutil

    env, src = finished
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return env, dst


def _metadata(path: Path) -> dict[str, str]:
    from fusionkit.engine.files import tensors_metadata

    return dict(tensors_metadata(path))


def _rewrite_metadata(path: Path, key: str, value: str | None) -> None:
    from safetensors.torch import load_file, save_file

    from fusionkit.engine.files import tensors_metadata

    meta = tensors_metadata(path)
    if value is None:
        meta.pop(key)
    else:
        meta[key] = value
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_damaged_run_files_end_in_one_line_naming_file_and_key(damaged, cli_inproc):
    _, run = damaged
    _rewrite_metadata(run / BEST_FILE, "fusionkit", "{not json")  # not the file it wrote
    one_line_error(cli_inproc(["eval", str(run)]), "model.safetensors", "changed after")

    with RunDir.open(run) as r:
        r.mark_running()
    _rewrite_metadata(run / STATE_FILE, "scheduler", None)
    one_line_error(cli_inproc(["resume", str(run)]), "state.safetensors", "'scheduler'")
    _rewrite_metadata(run / STATE_FILE, "scheduler", "{}")
    _rewrite_metadata(run / STATE_FILE, "trainer", '{"recipe_sha256": "x", "epochz": 1}')
    one_line_error(cli_inproc(["resume", str(run)]), "state.safetensors", "trainer.epochz")


def test_a_damaged_run_recipe_is_one_line(damaged, cli_inproc):
    _, run = damaged
    (run / "recipe.yaml").write_text("data: [unclosed\n")
    one_line_error(cli_inproc(["resume", str(run)]), "recipe.yaml", "YAML syntax error")
    one_line_error(cli_inproc(["eval", str(run)]), "recipe.yaml")


def test_metrics_missing_keys_is_one_line(damaged, cli_inproc):
    _, run = damaged
    m = json.loads((run / METRICS_FILE).read_text())
    del m["splits"]["test"]["ccc_valence"]
    (run / METRICS_FILE).write_text(json.dumps(m))
    one_line_error(cli_inproc(["eval", str(run)]), "metrics.json", "ccc_valence")


def test_weights_that_are_a_folder_is_one_line(damaged, cli_inproc):
    _, run = damaged
    (run / BEST_FILE).unlink()
    (run / BEST_FILE).mkdir()
    one_line_error(cli_inproc(["eval", str(run)]), "model.safetensors is a folder")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, registry, monkeypatch):
    from safetensors import SafetensorError

    import fusionkit.engine.files as files

    calls = {"n": 0}
    real = files.save_file

    def full_disk_on_epoch_2(tensors, path, metadata=None):
        if "state" in Path(path).name or "state" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                raise SafetensorError("Error while serializing: No space left on device (os 28)")
        return real(tensors, path, metadata=metadata)

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=3), "r.yaml", registry)
    monkeypatch.setattr(files, "save_file", full_disk_on_epoch_2)
    with RunDir.create(rc, registry) as run:
        with pytest.raises(CheckpointError) as info:
            Trainer(build_session(rc, registry), run).fit()
    text = str(info.value)
    assert "No space left on device" in text and "previous version" in text and "\n" not in text
    from fusionkit.engine.checkpoint import read_train_state

    assert read_train_state(run.path / STATE_FILE).epochs_done == 1  # epoch 1 is intact
    assert not list(run.path.glob(".*.tmp"))


# ----------------------------------------------------------------------- grids and plugins

CRASH_PLUGIN = """
import os, signal
from fusionkit import plugin
from tests.conftest import TinyDataset, TinyParams

class CrashParams(TinyParams):
    crash: bool = False

class Crashing(TinyDataset):
    def videos(self, split):
        if self.params.crash:
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        return super().videos(split)

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add("dataset", "crashy", build=Crashing, params=CrashParams)
"""


def test_a_killed_grid_worker_fails_only_its_own_point(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "fk-crashy", "fk_crashy", CRASH_PLUGIN)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    raw = tiny_recipe(tmp_path / "runs", epochs=1)
    raw["data"] = {"name": "crashy", "params": {"videos": 3}, "window": 64, "hop": 48}
    raw["variants"] = {
        "dies": {"data.params.crash": True},
        "lives_a": {"training.seed": 1},
        "lives_b": {"training.seed": 2},
    }
    path = tmp_path / "crash.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = fk(["run", str(path), "-j", "2"], env, tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr
    record = json.loads((tmp_path / "runs" / "tiny" / "grid.json").read_text())
    assert record["runs"]["dies"]["status"] == "failed"
    assert "SIGKILL" in record["runs"]["dies"]["error"]
    assert record["runs"]["lives_a"]["status"] == record["runs"]["lives_b"]["status"] == "done"


CLASH_PLUGIN = """
from fusionkit import plugin

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add("gate", "last", build=lambda p, *, in_dims, num_steps: None,
                 summary="another 'last'")
"""


def test_a_name_clash_breaks_only_the_recipes_that_use_it(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "fk-clash", "fk_clash", CLASH_PLUGIN)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", OMP_NUM_THREADS="1")
    listing = fk(["plugins", "list"], env, tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "name clash" in listing.stdout and "fk-clash 0.3" in listing.stdout
    quick = str(REPO / "recipes" / "quickstart.yaml")
    one_line_error(fk(["recipe", "validate", quick], env, tmp_path), "model.gate.name", "fk-clash")
    ok = fk(["recipe", "validate", quick, "model.gate.name=grjca"], env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    one_line_error(fk(["plugins", "list", "--strict"], env, tmp_path), "fk-clash")


def test_a_killed_extraction_like_worker_pool_dies_with_its_parent(tmp_path):
    """Workers that call die_with_parent() exit when their parent is killed (-9)."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing as mp, os, sys, time\n"
        "from fusionkit.plugin import die_with_parent\n"
        "def work(_):\n"
        "    die_with_parent(0.2)\n"
        "    time.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    ps = [ctx.Process(target=work, args=(i,)) for i in range(2)]\n"
        "    [p.start() for p in ps]\n"
        "    print(' '.join(str(p.pid) for p in ps), flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in parent.stdout.readline().split()]
    time.sleep(1.0)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and _running(p)]
    assert not alive


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_bf16_on_a_cpu_without_amx_says_to_use_fp32(cli, tmp_path, cli_inproc, monkeypatch):
    """Without AMX, bf16 matrix products run slower than fp32 ones on the CPU: a bf16 run says
    so at its start, and says nothing where bf16 pays or fp32 is used."""
    import fusionkit.studies.grid as grid

    _, recipe = cli
    for pays, precision, said in ((False, "bf16", True), (True, "bf16", False),
                                  (False, "fp32", False)):  # fmt: skip
        monkeypatch.setattr(grid, "bf16_pays", lambda device, pays=pays: pays)
        proc = cli_inproc(["run", str(recipe), f"training.precision={precision}",
                           "training.epochs=1", f"output.name={precision}-{pays}"])  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert ("no AMX" in proc.stdout) == said, proc.stdout


@pytest.mark.parametrize("amx", [True, False])
def test_bf16_pays_on_the_cpu_only_with_amx(monkeypatch, amx):
    """The CPU criterion is AMX, not AVX512-BF16: with AVX512-BF16 alone, bf16 matrix products
    measured at about half the float32 speed. Other devices are not second-guessed."""
    import torch

    from fusionkit.engine.session import bf16_pays

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert bf16_pays(torch.device("cpu")) is amx
    assert bf16_pays(torch.device("cuda")) is True


def _interrupted_after_one_epoch(tmp_path, registry):
    def stop(epoch, record):
        raise KeyboardInterrupt

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=3, num_threads=1), "tiny.yaml", registry)
    with RunDir.create(rc, registry) as run, pytest.raises(KeyboardInterrupt):
        Trainer(build_session(rc, registry), run, on_epoch_end=stop).fit()
    return rc, run.path


@pytest.mark.parametrize(
    ("recorded", "said"),
    [({"precision": "bf16"}, "cpu in bf16"), ({"device_type": "cuda"}, "cuda in fp32")],
)
def test_a_resume_on_another_device_or_precision_is_refused(tmp_path, registry, recorded, said):
    """The state records where and how the first epoch trained (here: on the CPU in fp32); a
    resume that would go on on another device type or in another precision (a run moved
    between a GPU and a CPU machine with training.device auto) is refused, since one run
    would mix two computations, and the run's files are left as they were."""
    from fusionkit.engine.checkpoint import read_train_state
    from fusionkit.engine.train import ResumeRefused

    rc, path = _interrupted_after_one_epoch(tmp_path, registry)
    st = read_train_state(path / STATE_FILE)
    assert (st.device_type, st.precision) == ("cpu", "fp32")
    trainer = json.loads(_metadata(path / STATE_FILE)["trainer"])
    _rewrite_metadata(path / STATE_FILE, "trainer", json.dumps({**trainer, **recorded}))
    before = snapshot(path)
    with pytest.raises(
        ResumeRefused, match=f"trained on {said}, and this process would go on on cpu in fp32"
    ):
        resume(rc, path, registry)
    assert snapshot(path) == before


def test_auto_resumes_on_the_device_type_the_run_trained_on(tmp_path, registry, monkeypatch):
    """With training.device auto, a CPU run resumed on a machine with CUDA goes on on the
    CPU; a CUDA run on a machine without CUDA is left to the refusal above; an explicit
    device is kept."""
    from fusionkit.engine.train import resumed_device

    _, path = _interrupted_after_one_epoch(tmp_path, registry)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resumed_device(path, "auto") == "cpu"
    assert resumed_device(path, "cuda:0") == "cuda:0"
    trainer = json.loads(_metadata(path / STATE_FILE)["trainer"])
    _rewrite_metadata(path / STATE_FILE, "trainer", json.dumps({**trainer, "device_type": "cuda"}))
    assert resumed_device(path, "auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resumed_device(path, "auto") == "auto"


def test_no_run_or_grid_is_made_inside_another_run_or_grid(tmp_path, registry):
    """output.dir inside a run (even its predictions/ folder) or inside a grid is refused
    before anything is created there: reports, resumes and the clean-up of a run's leftovers
    would take the new folder for the run's own; a grid still makes its own points."""
    _, base, _ = train(tmp_path / "runs", registry, epochs=1)
    grid_raw = tiny_recipe(tmp_path / "grids", epochs=1)
    grid_raw["sweep"] = {"training.seed": [0]}
    run_grid(validate_recipe(grid_raw, "g.yaml", registry), registry=registry)
    grid = tmp_path / "grids" / "tiny"
    assert (grid / "seed-0" / "run.json").is_file()  # its own point
    before = snapshot(base), snapshot(grid)
    for inside, kind in ((base / "predictions", "run"), (base, "run"), (grid, "grid")):
        rc = validate_recipe(tiny_recipe(inside, epochs=1), "tiny.yaml", registry)
        with pytest.raises(CheckpointError, match=f"inside the fusionkit {kind} directory"):
            RunDir.create(rc, registry)
        raw = {**tiny_recipe(inside, epochs=1), "sweep": {"training.seed": [0]}}
        with pytest.raises(CheckpointError, match=f"inside the fusionkit {kind} directory"):
            run_grid(validate_recipe(raw, "g.yaml", registry), registry=registry)
    assert (snapshot(base), snapshot(grid)) == before


@pytest.mark.parametrize("where", ["_provenance", "atomic_write_text"])
def test_an_interrupt_while_a_run_folder_is_made_leaves_none(
    tmp_path, registry, monkeypatch, where
):
    """Ctrl-C while RunDir.create gathers provenance (git) or writes run.json/recipe.yaml
    leaves no folder (it left one holding only .lock, which no command can use)."""
    import fusionkit.engine.runs as runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, where, interrupted)
    rc = validate_recipe(tiny_recipe(tmp_path / "runs", epochs=1), "tiny.yaml", registry)
    with pytest.raises(KeyboardInterrupt):
        RunDir.create(rc, registry)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_an_interrupt_between_making_the_folder_and_training_removes_it(
    cli, tmp_path, cli_inproc, monkeypatch
):
    """Ctrl-C after the run folder exists but before training took over: exit 130, the
    usual line, and no folder (a retry gets the same name)."""
    import fusionkit.cli.run as run_cli

    _, recipe = cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_cli, "_train", interrupted)
    res = cli_inproc(["run", str(recipe), "-q"])
    assert res.returncode == 130, res.stderr
    assert "interrupted before the first epoch finished" in res.stderr
    assert list((tmp_path / "runs").iterdir()) == []


SIGTERM_AT_START = """
import os, signal, sys, time
import fusionkit.cli.run as run_cli
from fusionkit.cli import root

def terminated(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this
    raise AssertionError("SIGTERM was not delivered")

run_cli._train = terminated
sys.argv = ["fusionkit", "run", sys.argv[1], "-q"]
root.main()
"""


def test_a_sigterm_between_making_the_folder_and_training_is_an_interrupt(cli, tmp_path):
    """A scheduler's SIGTERM in the same window ends like Ctrl-C (exit 143, no folder), not
    with the default action (killed: status -15, the folder left behind)."""
    env, recipe = cli
    script = tmp_path / "term.py"
    script.write_text(SIGTERM_AT_START)
    proc = subprocess.run([sys.executable, str(script), str(recipe)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert "interrupted before the first epoch finished" in proc.stderr
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_second_interrupt_during_the_clean_up_waits_until_it_is_done(tmp_path, registry):
    """remove_if_unstarted runs to its end when a SIGINT arrives in the middle (a second
    Ctrl-C left a folder with recipe.yaml but no run.json); the interrupt comes after."""
    rc = validate_recipe(tiny_recipe(tmp_path / "runs", epochs=1), "tiny.yaml", registry)
    run = RunDir.create(rc, registry)
    real, calls = Path.unlink, []

    def unlink(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # delivered here, were it not held
        return real(self, *args, **kwargs)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the CLI (a
    # test runner's process may have another handler, or ignore SIGINT)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(Path, "unlink", unlink)
            with pytest.raises(KeyboardInterrupt):
                run.remove_if_unstarted()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 3 and not run.path.exists()


def test_resuming_a_complete_run_removes_the_leftovers_of_a_kill(cli, tmp_path, cli_inproc):
    """A kill during a write after the run completed (a robustness sweep, a recipe.yaml
    update) leaves a temporary file; `fusionkit resume` removes it as for an unfinished run,
    and changes nothing else."""
    _, recipe = cli
    assert cli_inproc(["run", str(recipe), "-q"]).returncode == 0
    run = tmp_path / "runs" / "tiny"
    before = snapshot(run)
    (run / ".metrics.json.x1.tmp").write_text("{half")
    res = cli_inproc(["resume", str(run), "-q"])
    assert res.returncode == 0 and "complete already" in res.stdout, res.stderr
    assert not (run / ".metrics.json.x1.tmp").exists()
    assert snapshot(run) == before


def test_a_resume_with_other_plugin_versions_says_so(tmp_path, registry, cli_inproc):
    """A run started with other versions of its plugins (upgraded between the interrupt and
    the resume) trains its remaining epochs with the installed code: the resume says so,
    naming each component once, instead of going on in silence."""
    _, path = _interrupted_after_one_epoch(tmp_path, registry)
    marker = json.loads((path / "run.json").read_text())
    for c in marker["components"]:
        if c["kind"] == "encoder":
            c["version"] = "0.0.1"
    (path / "run.json").write_text(json.dumps(marker))
    res = cli_inproc(["resume", str(path), "-q"])
    assert res.returncode == 0, res.stderr
    said = " ".join(res.stderr.split())
    assert (
        "was started with other plugin versions: encoder 'linear' (fusionkit 0.0.1 built it" in said
    )
    assert said.count("encoder 'linear'") == 1  # audio and video use it: named once
    assert "remaining epochs train with the installed ones" in said


@pytest.mark.parametrize("leak", ["val", "train"])
def test_a_dataset_whose_test_split_repeats_another_is_refused(tmp_path, leak):
    """A dataset plugin that hands back its validation (or training) videos as `test` would
    report those scores as test scores with exit 0; the split is refused, naming both."""
    from tests.conftest import TinyDataset, TinyParams, make_registry

    class Leaky(TinyDataset):
        def videos(self, split):
            return super().videos(leak if split == "test" else split)

    registry = make_registry()
    registry.add("dataset", "leaky", build=Leaky, params=TinyParams)
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["data"]["name"] = "leaky"
    rc = validate_recipe(raw, "tiny.yaml", registry)
    with RunDir.create(rc, registry) as run, pytest.raises(DataError) as info:
        Trainer(build_session(rc, registry), run).fit()
    said = str(info.value)
    assert f"dataset 'leaky': splits '{leak}' and 'test' hold the same videos ({leak}_0" in said
    assert not (run.path / METRICS_FILE).exists()


def _malformed(mode, video):
    import dataclasses

    n = video.num_frames
    if mode == "present":
        return dataclasses.replace(video, present={"video": torch.ones(3, dtype=torch.bool)})
    if mode == "labels":
        return dataclasses.replace(video, labels=video.labels[:, 0])
    if mode == "label_mask":
        return dataclasses.replace(video, label_mask=video.label_mask.long())
    if mode == "width":
        feats = {**video.features, "audio": video.features["audio"][:, :4]}
        return dataclasses.replace(video, features=feats)
    assert mode == "fps"
    return dataclasses.replace(video, fps=0.0 * n)


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("present", "present['video'] is torch.bool (3,), expected bool ("),
        ("labels", "labels are ("),
        ("label_mask", "label_mask is torch.int64"),
        ("width", "audio features are ("),
        ("fps", "fps is 0.0, expected a number > 0"),
    ],
)
def test_a_malformed_video_from_a_dataset_is_one_error_naming_it(tmp_path, mode, said):
    """A dataset plugin's Video with a presence mask of the wrong length (read first by the
    z-scoring), 1-D labels, a non-bool label mask, features narrower than its feature_dims, or
    fps 0 ends in a DataError naming the video, before training (tracebacks, or an encoder
    error naming no dataset, before)."""
    from tests.conftest import TinyDataset, TinyParams, make_registry

    class Broken(TinyDataset):
        def videos(self, split):
            out = list(super().videos(split))
            return [_malformed(mode, out[0]), *out[1:]] if split == "train" else out

    registry = make_registry()
    registry.add("dataset", "broken", build=Broken, params=TinyParams)
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["data"].update(name="broken", normalize="zscore")
    rc = validate_recipe(raw, "tiny.yaml", registry)
    with RunDir.create(rc, registry) as run, pytest.raises(DataError) as info:
        Trainer(build_session(rc, registry), run).fit()
    assert "video 'train_0'" in str(info.value) and said in str(info.value), str(info.value)
    if mode == "width":
        assert "6, the dataset's feature_dims['audio']" in str(info.value)
