"""What a third-party plugin that breaks its contract gets: a head ignoring n_targets, a
position-dependent "frame-local" fusion, an in-place perturbation, repeated video names, NaN on
padded frames, a params annotation that cannot be resolved, a constructor reading tensor
values, a name clash and a half-broken distribution each end in one line naming the component
and the fix (at run, recipe validate or in the conformance kit), never in other numbers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from pydantic import Field
from torch import nn

from fusionkit import plugin
from fusionkit.core.errors import FusionkitError, PluginError
from fusionkit.core.interfaces import Video
from fusionkit.core.registry import Registry, load_registry
from tests.conftest import TinyDataset, TinyParams, make_distribution, make_registry, tiny_recipe

if TYPE_CHECKING:
    from collections.abc import Sequence


class WideHead(nn.Module):
    """A head that ignores ``n_targets`` and always predicts two columns."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, 2)

    def forward(self, x, mask):
        return self.lin(x)


def build_wide(params: plugin.EmptyParams, *, in_dim: int, n_targets: int) -> WideHead:
    return WideHead(in_dim)


def test_head_ignoring_n_targets_does_not_train_silently(tmp_path):
    """A head returning 2 columns for one target is refused by recipe validate (a meta-device
    forward) and at the first training step, naming it; the loss would broadcast."""
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.runs import RunDir
    from fusionkit.engine.session import build_session, check_recipe
    from fusionkit.engine.train import Trainer

    reg = make_registry()
    reg.add("head", "review_wide", build=build_wide, params=plugin.EmptyParams)
    raw = tiny_recipe(tmp_path, epochs=1)
    raw["model"]["head"] = {"name": "review_wide"}
    raw["model"]["targets"] = ["arousal"]
    rc = validate_recipe(raw, "r.yaml", reg)
    said = r"head model\.head returned \(2, 64, 2\); expected \(B=2, T=64, n_targets=1\)"
    with pytest.raises(FusionkitError, match=said):
        check_recipe(rc, reg)
    with pytest.raises(FusionkitError, match=r"expected \(B=4, T=64, n_targets=1\)"):
        with RunDir.create(rc, reg) as run:
            Trainer(build_session(rc, reg), run).fit()


def test_kit_catches_a_head_that_ignores_n_targets():
    """The kit builds a head with a second n_targets, so one that ignores it fails."""
    report = plugin.check_head(build_wide, plugin.EmptyParams(), name="review_wide")
    failed = {r.check: r.message for r in report.results if r.status == "fail"}
    assert list(failed) == ["shapes-targets"]
    assert "built with n_targets=1" in failed["shapes-targets"]


class PositionalFusion(nn.Module):
    """Claims frame_local; adds an absolute-position term (depends on where the frame sits)."""

    fixed_length = None
    frame_local = True

    def __init__(self, in_dims: dict[str, int]) -> None:
        super().__init__()
        self.mods = sorted(in_dims)
        self.lin = nn.Linear(sum(in_dims.values()), 8)
        self.out_dims = {"fused": 8}
        self.num_steps = 1

    def forward(self, feats, mask):
        x = self.lin(torch.cat([feats[m] for m in self.mods], -1))
        t = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)
        return {"fused": (x + torch.sin(t / 10.0)[None, :, None]).unsqueeze(2)}


def build_positional(params: plugin.EmptyParams, *, in_dims: dict[str, int]) -> PositionalFusion:
    return PositionalFusion(in_dims)


def test_kit_frame_local_check_catches_position_dependence():
    """A fusion whose per-frame output depends on the frame's position fails frame-local:
    streaming computes the newest frame alone and would get other numbers."""
    report = plugin.check_fusion(build_positional, plugin.EmptyParams(), name="review_pos")
    frame_local = [r for r in report.results if r.check == "frame-local"]
    assert frame_local and frame_local[0].status == "fail"
    assert "when the frame is computed alone (T=1)" in frame_local[0].message


class NanPadHead(nn.Module):
    """Correct on valid frames, NaN on padded ones (ignored by fusionkit)."""

    def __init__(self, in_dim: int, n_targets: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_dim, n_targets)

    def forward(self, x, mask):
        return torch.where(mask[..., None], self.lin(x), torch.nan)


def build_nanpad(params: plugin.EmptyParams, *, in_dim: int, n_targets: int) -> NanPadHead:
    return NanPadHead(in_dim, n_targets)


def test_kit_nan_on_padded_frames_is_not_blamed_on_determinism():
    """NaN on padded frames (outputs there are ignored) is not reported as a determinism or
    saved-state failure: NaN equals NaN when two builds are compared."""
    report = plugin.check_head(build_nanpad, plugin.EmptyParams(), name="review_nanpad")
    for r in report.results:
        if r.status == "fail":
            assert "padded" in r.message or "non-finite" in r.message, (r.check, r.message)


class ScaleParams(plugin.Params):
    scale: float = Field(1.0, description="output scale")


def build_unresolved(
    params: ScaleParams, *, in_dim: int, n_targets: int, hint: Sequence[int] | None = None
) -> nn.Module:
    return nn.Linear(in_dim, n_targets)


def test_unresolvable_annotation_does_not_drop_the_params_model():
    """A build whose other annotations name a TYPE_CHECKING-only type keeps its params model
    (the first argument's annotation is resolved alone)."""
    reg = Registry()
    try:
        reg.add("head", "review_unres", build=build_unresolved)
    except PluginError:
        return  # refusing it with a message is fine too
    assert reg.get("head", "review_unres").params is ScaleParams


class CachedDataset:
    """Returns the same Video objects on every call (as a dataset with a cache does)."""

    feature_dims = TinyDataset.feature_dims
    targets = TinyDataset.targets

    def __init__(self) -> None:
        self._videos = TinyDataset(TinyParams(videos=2)).videos("test")

    def splits(self):
        return ("train", "val", "test")

    def videos(self, split):
        return self._videos


def in_place(video: Video, generator: torch.Generator) -> Video:
    video.features["audio"].add_(1.0)
    return video


def test_in_place_perturbation_does_not_modify_the_wrapped_dataset():
    """A perturbation writing into the video it is given is refused (the tensors belong to
    the dataset: later values of a sweep would see the change)."""
    from fusionkit.engine.perturb import AppliedPerturbation, PerturbedDataset

    base = CachedDataset()
    before = base.videos("test")[0].features["audio"].clone()
    pert = AppliedPerturbation("review_inplace", plugin.EmptyParams(), 0, in_place)
    with pytest.raises(FusionkitError, match="wrote into the tensors of video"):
        PerturbedDataset(base, [pert], splits=["test"]).videos("test")
    assert not torch.equal(base.videos("test")[0].features["audio"], before)  # why it stops


def test_frame_store_refuses_repeated_video_names():
    """Two videos of one name in a split would be scored twice but saved once: refused."""
    from fusionkit.engine.data import FrameStore

    videos = TinyDataset(TinyParams(videos=2)).videos("test")
    videos[1].name = videos[0].name
    with pytest.raises(FusionkitError, match=r"unique|repeated|duplicate"):
        FrameStore(videos, ["audio", "video"], [0, 1], window=64, hop=48)


TWIN = """
from torch import nn
from fusionkit import plugin

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add("head", "review_twin", build=lambda p, *, in_dim, n_targets: nn.Linear(in_dim,
                 n_targets), params=plugin.EmptyParams)
"""


def test_recipe_schema_survives_a_name_clash(tmp_path, monkeypatch):
    """A name two plugins register makes only that name invalid in the schema."""
    from fusionkit.core.schema import recipe_json_schema

    make_distribution(tmp_path, "fk-review-one", "fkr_twin_one", TWIN)
    make_distribution(tmp_path, "fk-review-two", "fkr_twin_two", TWIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = load_registry(strict=False)
    assert reg.clashes() == [("head", "review_twin")]
    schema = recipe_json_schema(reg)
    head = schema["$defs"]["HeadSpec"]
    assert "regression" in str(head)
    (twin,) = [c for c in head["allOf"] if c["if"]["properties"]["name"]["const"] == "review_twin"]
    assert twin["then"] is False and "more than one plugin" in twin["description"]


HALF_OK = """
from torch import nn
from fusionkit import plugin

class Head(nn.Module):
    def __init__(self, d, n):
        super().__init__()
        self.lin = nn.Linear(d, n)

    def forward(self, x, mask):
        return self.lin(x)

@plugin.hookimpl
def fusionkit_register_components(registry):
    registry.add("head", "review_half", build=lambda p, *, in_dim, n_targets: Head(in_dim,
                 n_targets), params=plugin.EmptyParams)
"""


def test_plugins_check_of_a_half_broken_distribution_does_not_pass(tmp_path, monkeypatch, capsys):
    """`plugins check DIST` fails (exit 1) when a plugin of the distribution did not load, and
    names it, rather than "1 of 1 components conform"."""
    import warnings

    from tests.conftest import user_cli

    (tmp_path / "fkr_half_ok.py").write_text(HALF_OK)
    (tmp_path / "fkr_half_broken.py").write_text("import missing_dependency_review_d\n")
    info = tmp_path / "fk_review_half-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fk-review-half\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(
        "[fusionkit]\nfkr_half_ok = fkr_half_ok\nfkr_half_broken = fkr_half_broken\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = load_registry(strict=False)
    assert [f.plugin for f in reg.failures if f.distribution == "fk-review-half"] == [
        "fkr_half_broken"
    ]
    cli = next(user_cli(monkeypatch, capsys, reg))
    code, out, _err = cli("plugins", "check", "fk-review-half", "--skip", "bf16-cpu")
    assert code == 1
    assert "plugin 'fkr_half_broken'" in out and "not loaded" in out
    assert "1 plugin(s) did not load" in out


class ItemFusion(nn.Module):
    """Reads a weight value in its constructor: works for real, not on the meta device."""

    fixed_length = None

    def __init__(self, in_dims: dict[str, int]) -> None:
        super().__init__()
        self.mods = sorted(in_dims)
        self.lin = nn.Linear(sum(in_dims.values()), 8)
        self.scale = float(self.lin.weight.detach().abs().max())
        self.out_dims = {"fused": 8}
        self.num_steps = 1

    def forward(self, feats, mask):
        return {"fused": self.lin(torch.cat([feats[m] for m in self.mods], -1)).unsqueeze(2)}


def build_item(params: plugin.EmptyParams, *, in_dims: dict[str, int]) -> ItemFusion:
    return ItemFusion(in_dims)


def test_constructor_reading_tensor_values_gets_the_right_hint(tmp_path):
    """Validation builds on the meta device: a constructor reading tensor values is told
    so, not to check the sizes of its params."""
    from fusionkit.core.errors import RecipeError
    from fusionkit.core.recipe import validate_recipe
    from fusionkit.engine.session import check_recipe

    reg = make_registry()
    reg.add("fusion", "review_item", build=build_item, params=plugin.EmptyParams)
    raw = tiny_recipe(tmp_path)
    raw["model"]["fusion"] = {"name": "review_item"}
    rc = validate_recipe(raw, "r.yaml", reg)
    with pytest.raises(RecipeError) as info:
        check_recipe(rc, reg)
    assert "memory" not in str(info.value) and "meta" in str(info.value)
