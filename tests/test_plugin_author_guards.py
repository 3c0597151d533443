"""Third-party plugins against `fusionkit.plugin`: the kit catches frames moved without their
presence, a revision declared on the class a build function returns counts, cast_like refuses
values the module's dtype cannot hold, and FeatureIdentity failures and gaps are refused."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from pydantic import Field

from fusionkit import plugin
from fusionkit.core.registry import load_registry
from fusionkit.engine.perturb import perturbation_revision
from fusionkit.engine.session import _check_feature_identity


class RollParams(plugin.Params):
    k: int = Field(3, ge=-100, le=100, description="frames to roll the video modality by")


class RollWithoutPresence:
    """Moves the frames of `video` but leaves `present` where it was (the bug that
    `with_moved_frames` exists to prevent)."""

    def __init__(self, params: RollParams) -> None:
        self.params = params

    def __call__(self, video: plugin.Video, generator: torch.Generator) -> plugin.Video:
        x = video.features["video"]
        return plugin.with_features(video, {"video": torch.roll(x, self.params.k, 0)})


def test_kit_fails_a_perturbation_that_moves_frames_without_presence():
    """`presence` fails a roll that leaves presence in place and passes the same roll through
    with_moved_frames."""
    report = plugin.check_perturbation(RollWithoutPresence, RollParams(), name="roll")
    assert not report.ok
    (failure,) = report.failures
    assert failure.check == "presence" and "plugin.with_moved_frames" in failure.message

    class Rolled(RollWithoutPresence):
        def __call__(self, video, generator):
            n = video.features["video"].shape[0]
            rows = torch.roll(torch.arange(n), self.params.k, 0)
            return plugin.with_moved_frames(video, {"video": rows})

    assert plugin.check_perturbation(Rolled, RollParams(), name="rolled").ok


class Scaled:
    """Revised perturbation: its class declares revision 2."""

    revision: ClassVar[int] = 2

    def __init__(self, params: plugin.EmptyParams) -> None:
        self.params = params

    def __call__(self, video: plugin.Video, generator: torch.Generator) -> plugin.Video:
        return plugin.with_features(video, {m: 0.5 * x for m, x in video.features.items()})


def build_scaled(params: plugin.EmptyParams) -> Scaled:
    """A build function (not the class) registered: the documented 'class attribute'."""
    return Scaled(params)


def test_revision_of_the_built_perturbation_class_counts():
    """A build function annotated to return a revision-2 class is revision 2."""
    reg = load_registry(strict=False)
    reg.add("perturbation", "review13p_scaled", build=build_scaled)
    assert perturbation_revision("review13p_scaled", reg) == 2


def test_cast_like_refuses_integers_beyond_the_module_dtype():
    """int64 beyond int32 (it would wrap), a float beyond int64, and NaN named as NaN."""
    own = {"count": torch.zeros(1, dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"'count' holds values from .* beyond int32's range"):
        plugin.cast_like(own, {"count": torch.tensor([2**40], dtype=torch.int64)})
    with pytest.raises(ValueError, match="beyond int64's range"):
        plugin.cast_like({"c": torch.zeros(1, dtype=torch.int64)}, {"c": torch.tensor([1e30])})
    with pytest.raises(ValueError, match="'b' holds NaN or infinite values"):
        plugin.cast_like({"b": torch.zeros(2)}, {"b": torch.tensor([float("nan"), 1.0])})
    got = plugin.cast_like(own, {"count": torch.tensor([7], dtype=torch.int64)})
    assert got["count"].dtype == torch.int32 and int(got["count"]) == 7


def _run_with_identity(tmp_path, identity):
    (tmp_path / "metrics.json").write_text(json.dumps({"feature_identity": identity}))
    return SimpleNamespace(path=tmp_path)


def test_feature_identity_missing_a_recorded_modality_is_refused(tmp_path):
    """A modality the run recorded that the data no longer names is refused, saying so."""
    run = _run_with_identity(tmp_path, {"audio": "wavlm@abc", "video": "ir50@def"})

    class Now:
        def feature_identity(self) -> dict[str, str]:
            return {"audio": "wavlm@abc"}  # video's identity no longer given

    with pytest.raises(plugin.DataError, match="video features came from ir50@def, and the "
                       "data no longer names where they come from"):  # fmt: skip
        _check_feature_identity(run, Now())


def test_feature_identity_that_raises_is_one_fusionkit_error(tmp_path):
    """A feature_identity() that raises is one plugin error naming it."""
    run = _run_with_identity(tmp_path, {"audio": "x"})

    class Broken:
        def feature_identity(self) -> dict[str, str]:
            raise FileNotFoundError("identity.txt")

    with pytest.raises(plugin.PluginError, match=r"Broken\.feature_identity\(\) raised "
                       "FileNotFoundError: identity.txt"):  # fmt: skip
        _check_feature_identity(run, Broken())


def test_a_broken_feature_identity_fails_training_before_the_first_epoch(
    tmp_path, registry, monkeypatch
):
    """The identity is read before epoch 1, so a dataset failing at it costs no epoch and
    leaves no half-trained run."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session
    from fusionkit.engine.train import Trainer
    from tests.conftest import tiny_recipe

    rc = validate_recipe(tiny_recipe(tmp_path, epochs=2, num_threads=1), "tiny", registry)
    session = build_session(rc, registry)

    def broken(self):
        raise OSError("identity file missing")

    monkeypatch.setattr(type(session.dataset), "feature_identity", broken, raising=False)
    epochs = []
    with RunDir.create(rc, registry) as run:
        trainer = Trainer(session, run, on_epoch_end=lambda e, r: epochs.append(e))
        with pytest.raises(plugin.PluginError, match="feature_identity"):
            trainer.fit()
    assert epochs == []


def test_a_component_whose_checks_were_all_skipped_is_not_counted_as_conforming(cli):
    """`plugins check features` (a dataset whose params have no defaults) checks nothing: the
    summary says it was not checked and how to check it, not that it conforms."""
    code, out, _ = cli("plugins", "check", "features")
    text = " ".join(out.split())
    assert code == 0
    assert "0 of 1 components conform; 1 not checked (dataset 'features': give their params" in text
