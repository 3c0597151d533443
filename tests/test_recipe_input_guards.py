"""Recipe input that would mean something other than what it says is refused when the recipe
is validated: booleans where numbers belong, zero epochs, keys set twice through a YAML merge
sequence, two face-crop files of one frame, and a cross-validation fold the training trials
cannot fill."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusionkit.core.errors import DataError, FusionkitError, RecipeError
from fusionkit.core.overrides import parse_overrides
from fusionkit.core.recipe import load_recipe, validate_recipe
from fusionkit.core.yamlio import load_yaml
from fusionkit.engine.session import build_dataset, check_recipe
from fusionkit_affwild2.layout import crop_indices
from tests.conftest import tiny_recipe


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("training", "epochs", True), ("training", "seed", True), ("plateau", "patience", False)],
)
def test_a_boolean_is_not_a_count(tmp_path, registry, section, key, value):
    """`epochs: yes` or `patience: off` (YAML 1.1 booleans) would silently become 1 and 0:
    refused, naming the key."""
    raw = tiny_recipe(tmp_path)
    if section == "plateau":
        raw["training"]["plateau"] = {key: value}
    else:
        raw[section][key] = value
    where = f"training.plateau.{key}" if section == "plateau" else f"{section}.{key}"
    with pytest.raises(RecipeError, match=rf"{where}: a number is expected, got the boolean"):
        validate_recipe(raw, "r.yaml", registry)


def test_zero_epochs_is_refused_when_the_recipe_is_validated(tmp_path, registry):
    """`run` can never finish zero epochs, so `recipe validate` refuses them too."""
    raw = tiny_recipe(tmp_path, epochs=0)
    with pytest.raises(RecipeError, match=r"training\.epochs"):
        validate_recipe(raw, "r.yaml", registry)


def test_the_first_mapping_of_a_merge_sequence_wins_or_the_merge_is_refused():
    """YAML readers disagree on which mapping of `<<: [a, b]` wins a key both set: such a
    merge is refused, naming the key; merges without shared keys, and keys overriding a
    merge, keep working."""
    with pytest.raises(RecipeError, match=r"'training\.epochs' is set by more than one mapping"):
        load_yaml("training: {<<: [{epochs: 1}, {epochs: 3}]}\n", "r.yaml")
    data = load_yaml("a: &a {x: 1}\nb: &b {y: 2}\nc: {<<: [*a, *b], x: 5}\n", "r.yaml")
    assert data["c"] == {"x": 5, "y": 2}


def test_two_crop_files_for_one_frame_are_refused(tmp_path):
    """`7.jpg` beside `00007.jpg` would leave which face a frame gets to chance: refused,
    naming both files."""
    folder = tmp_path / "cropped_aligned" / "vid"
    folder.mkdir(parents=True)
    for name in ("00006.jpg", "00007.jpg", "7.jpg"):
        (folder / name).write_bytes(b"jpeg")
    with pytest.raises(DataError, match=r"two files of frame 7: 00007\.jpg and 7\.jpg"):
        crop_indices(folder)


def _features_tree(root: Path, train: int) -> dict:
    rng = np.random.default_rng(0)
    sets = (("Train_Set", [f"t{i}" for i in range(train)]), ("Validation_Set", ["v0"]))
    for split, names in sets:
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for name in names:
            rows = "\n".join("0.1,0.2" for _ in range(40))
            (root / "labels" / split / f"{name}.txt").write_text(f"valence,arousal\n{rows}\n")
            for mod in ("audio", "video"):
                (root / "feats" / mod).mkdir(parents=True, exist_ok=True)
                np.save(root / "feats" / mod / f"{name}.npy", rng.standard_normal((40, 3)))
    return {"features_dir": str(root / "feats"), "labels": str(root / "labels")}


def test_a_fold_the_train_trials_cannot_fill_is_refused_when_validated(tmp_path, registry):
    """A fold that the training trials cannot be cut into is refused by `recipe validate`
    (as `run` would refuse it), naming the key."""
    raw = tiny_recipe(tmp_path)
    params = _features_tree(tmp_path, train=3)
    raw["data"] = {
        "name": "features",
        "params": {**params, "split": {"fold": 0}},
        "window": 16,
        "hop": 8,
    }
    raw["evaluation"]["splits"] = ["val"]
    recipe = validate_recipe(raw, "r.yaml", registry)
    check_recipe(recipe, registry)  # fold 0 (the official split) is fine
    raw["data"]["params"]["split"]["fold"] = 1
    recipe = validate_recipe(raw, "r.yaml", registry)
    with pytest.raises(FusionkitError, match=r"data.params.split.fold=1: the 3 train trials"):
        check_recipe(recipe, registry)


def test_a_relative_labels_folder_is_read_from_the_working_folder(tmp_path, registry, monkeypatch):
    """`labels: tree/labels` (relative) names the same folder as its absolute path: it was
    read under its own parent before (`tree/tree/labels`) and refused."""
    raw = tiny_recipe(tmp_path)
    params = _features_tree(tmp_path / "tree", train=5)
    raw["data"] = {"name": "features", "params": params, "window": 16, "hop": 8}
    raw["evaluation"]["splits"] = ["val"]
    absolute = build_dataset(validate_recipe(raw, "r.yaml", registry), registry)
    monkeypatch.chdir(tmp_path)
    raw["data"]["params"]["labels"] = "tree/labels"
    relative = build_dataset(validate_recipe(raw, "r.yaml", registry), registry)
    assert relative.trials("train") == absolute.trials("train") == [f"t{i}" for i in range(5)]
    assert relative.trials("val") == ["v0"]


@pytest.mark.parametrize(
    ("item", "said"),
    [
        ("training.num-threads=1", "key part 'num-threads' may hold only letters, digits and '_' "
         "(did you mean 'num_threads'?)"),
        ("training..lr=1", "a key part is empty (two dots in a row, or a dot at an end)"),
        ("training.lr", "expected key.path=value, e.g. training.lr=1e-3"),
    ],
)  # fmt: skip
def test_a_malformed_override_says_what_is_wrong_with_it(item, said):
    """An override with a bad key says which part is wrong and how to write it, not only
    the general form."""
    with pytest.raises(RecipeError) as err:
        parse_overrides([item])
    assert said in str(err.value)


@pytest.mark.parametrize("text", ["", "# a comment only\n"])
def test_an_empty_recipe_file_is_named_as_such(tmp_path, registry, text):
    """An empty recipe file says so and where to start, rather than listing the missing
    sections one by one."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"the file holds no recipe .* recipe copy quickstart"):
        load_recipe(path, registry=registry)


def test_a_component_param_beside_its_name_says_to_write_it_under_params(tmp_path, registry):
    """`model.encoders.audio.dim=64` misses the `params` level: the message names the
    component the key belongs to and where to write it."""
    raw = tiny_recipe(tmp_path)
    raw["model"]["encoders"]["audio"]["dim"] = 64
    said = (
        r"model\.encoders\.audio\.dim: unknown key here; 'dim' is a param of encoder 'linear': "
        r"write it under params"
    )
    with pytest.raises(RecipeError, match=said):
        validate_recipe(raw, "r.yaml", registry)


@pytest.mark.parametrize(("typed", "read"), [("2024", "a number, 2024"),
                                             ("12:30", "a number, 750"),
                                             ("2024-01-01", "a date, 2024-01-01")])  # fmt: skip
def test_a_number_where_text_belongs_says_how_to_quote_it(tmp_path, registry, typed, read):
    """`output.name=12:30` is read by YAML as a number (base 60: 750): the message says what
    YAML read and how to quote the text as written, without offering the number as the name
    (it suggested '750'); the quoted form is accepted."""
    from fusionkit.core.overrides import apply_overrides, parse_overrides

    raw = apply_overrides(tiny_recipe(tmp_path), parse_overrides([f"output.name={typed}"]))
    with pytest.raises(RecipeError) as err:
        validate_recipe(raw, "r.yaml", registry)
    said = str(err.value)
    assert f"(YAML read what was written as {read}); put the text in quotes as written" in said
    assert """name: '...' in a file, output.name='"..."' on the command line""" in said
    raw = apply_overrides(tiny_recipe(tmp_path), parse_overrides([f'output.name="{typed}"']))
    if ":" not in typed:  # a name cannot hold ':'
        assert validate_recipe(raw, "r.yaml", registry).run_name == typed


@pytest.mark.parametrize(
    "args",
    [
        ("report", "--seed=-5"),
        ("report", f"--seed={2**32}"),
        ("report", "--bootstrap=100001"),
        ("robustness", "--seed=-1"),
    ],
)
def test_command_line_seeds_and_resamples_are_bounded(cli, tmp_path, args):
    """Seeds outside [0, 2^32) and more than 100,000 bootstrap resamples (a resample matrix of
    gigabytes) are refused as usage errors naming the option, before any run is read."""
    command, option = args
    code, _, err = cli(command, tmp_path, option)
    assert code == 2 and option.split("=")[0] in err, err


@pytest.mark.parametrize(
    ("section", "key", "largest"),
    [("training", "seed", 2**32 - 1), ("training", "num_threads", 1024), ("training", "epochs",
      100_000)],
)  # fmt: skip
def test_recipe_bounds_hold_at_their_edges(tmp_path, registry, section, key, largest):
    """The documented bounds are exact: the largest allowed value is accepted, the next one
    is refused naming the key."""
    raw = tiny_recipe(tmp_path)
    raw[section][key] = largest
    assert getattr(getattr(validate_recipe(raw, "r.yaml", registry), section), key) == largest
    raw[section][key] = largest + 1
    with pytest.raises(RecipeError, match=rf"{section}\.{key}"):
        validate_recipe(raw, "r.yaml", registry)
