"""Bad input ends in one error line, never a traceback: numbers too long to read, JSON nested
too deep, pickled code in a checkpoint, thousands of recipe problems, an inconsistent training
state, and a step that runs out of memory."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch

from fusionkit.core.errors import CheckpointError, FusionkitError, RecipeError
from fusionkit.core.recipe import load_recipe, recipes_root


def _quickstart(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text((recipes_root() / "quickstart.yaml").read_text() + extra)
    return p


def test_a_recipe_integer_of_thousands_of_digits_is_a_recipe_error(tmp_path, registry):
    """Python refuses to read an integer of more than 4300 digits: a recipe error naming the
    line, not the interpreter's ValueError."""
    p = _quickstart(tmp_path)
    text = p.read_text().replace("epochs: 20", "epochs: " + "9" * 5000)
    p.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.strip().startswith("epochs"))
    with pytest.raises(RecipeError, match=rf"line {line}, .*a number of 5000 characters"):
        load_recipe(p, registry=registry)


def test_a_huge_hex_integer_override_is_a_recipe_error(tmp_path, registry):
    """A 5000-digit hex seed is refused in one short line naming the override, and a message
    that shows a huge integer shows its size, not its digits (repr() of one raises)."""
    from fusionkit.core.params import short_repr

    p = _quickstart(tmp_path)
    with pytest.raises(RecipeError, match=r"training\.seed=0x.*a number of 5002 characters") as e:
        load_recipe(p, ["training.seed=0x" + "f" * 5000], registry=registry)
    assert len(str(e.value)) < 1000
    assert short_repr(1 << 20_000) == "<an integer of 20001 bits>"
    assert short_repr(12345) == "12345"


def test_a_deeply_nested_json_run_file_is_a_checkpoint_error(tmp_path):
    """JSON nested 100,000 deep (Python's parser recurses) is 'not valid JSON', naming it."""
    from fusionkit.engine.files import read_json

    p = tmp_path / "run.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"run\.json"):
        read_json(p, "run marker")


def test_a_json_run_file_with_a_huge_integer_is_a_checkpoint_error(tmp_path):
    """A 5000-digit number in a run file is 'not valid JSON', naming it."""
    from fusionkit.engine.files import read_json

    p = tmp_path / "metrics.json"
    p.write_text('{"epochs_run": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match=r"metrics\.json"):
        read_json(p, "metrics file")


def test_a_safetensors_header_nested_deeply_is_a_checkpoint_error(tmp_path):
    """A safetensors header nested too deep is an unreadable file, named."""
    from fusionkit.engine.files import tensor_shapes

    header = ("[" * 100_000 + "]" * 100_000).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FusionkitError, match=r"x\.safetensors"):
        tensor_shapes(p)


def test_state_metadata_nested_deeply_is_a_checkpoint_error(tmp_path):
    """Metadata of a training state nested too deep: one error naming the file and key."""
    from fusionkit.engine.files import json_metadata

    meta = {"trainer": "[" * 100_000 + "]" * 100_000}
    with pytest.raises(CheckpointError, match="trainer"):
        json_metadata(meta, "trainer", tmp_path / "state.safetensors")


class _BlockedModule:
    """Unpickling this calls ``os.getcwd()`` (harmless): a global of the blocked ``posix``
    module, as an ``os.system`` payload would be."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_a_checkpoint_calling_an_os_function_is_named_and_not_advised_to_unpickle(tmp_path):
    """A pickled call into a blocked module (os) is named as Python objects other than tensors,
    without torch's advice to load it unsafely."""
    from fusionkit.cli.weights import load_checkpoint

    src = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "payload": _BlockedModule()}, src)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(src)
    message = str(info.value)
    assert "holds Python objects other than tensors" in message
    assert "getcwd" in message
    assert "will likely succeed" not in message


def test_the_problems_listed_for_one_recipe_are_bounded(tmp_path, registry):
    """2000 unknown keys: the count, the first 20, and how many more; not 2000 lines."""
    p = _quickstart(tmp_path, "".join(f"unknown_{i}: 1\n" for i in range(2000)))
    with pytest.raises(RecipeError) as info:
        load_recipe(p, registry=registry)
    lines = str(info.value).splitlines()
    assert len(lines) == 22 and "(2000 problems)" in lines[0]
    assert lines[-1] == "  - and 1980 more"


def test_a_training_state_with_a_non_finite_best_score_is_refused():
    """A NaN best score (no later epoch would ever be better), a best epoch after the epochs
    done, and an epoch count past any recipe's are refused."""
    from pydantic import ValidationError

    from fusionkit.engine.checkpoint import TrainState

    raw = json.loads(
        '{"recipe_sha256": "x", "epochs_done": 3, "best_epoch": 2, "best_val_ccc_mean": NaN}'
    )
    with pytest.raises(ValidationError):
        TrainState.model_validate(raw)

    for bad in (
        {"recipe_sha256": "x", "epochs_done": 1, "best_epoch": 2, "best_val_ccc_mean": 0.5},
        {"recipe_sha256": "x", "epochs_done": 2**63},
    ):
        with pytest.raises(ValidationError):
            TrainState.model_validate(bad)


def test_a_step_out_of_memory_is_one_training_error_naming_the_sizes(tmp_path, registry):
    """The allocator's error mid-epoch becomes one line naming the batch and window sizes to
    lower; another RuntimeError stays what it is (a bug is not called a lack of memory)."""
    from fusionkit.core.errors import TrainingError
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer
    from tests.conftest import tiny_recipe

    for raised, expected in (
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 6 GB"),
         TrainingError),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), RuntimeError),
    ):  # fmt: skip
        raw = tiny_recipe(tmp_path / expected.__name__, epochs=1, num_threads=1)
        rc = validate_recipe(raw, "r.yaml", registry)
        with RunDir.create(rc, registry) as run:
            trainer = Trainer(build_session(rc, registry), run)

            def fail(*args, _exc=raised, **kwargs):
                raise _exc

            trainer._train_epoch = fail
            with pytest.raises(expected) as info:
                trainer.fit()
        if expected is TrainingError:
            msg = str(info.value)
            assert msg.startswith("out of memory on cpu at epoch 1 (DefaultCPUAllocator")
            assert f"training.batch_size={rc.training.batch_size}" in msg
            assert f"data.window={rc.data.window}" in msg
        else:
            assert "shapes cannot be multiplied" in str(info.value)
