"""The public namespace plugin authors use: typed registration, kinds, helpers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fusionkit import plugin
from fusionkit.core.recipe import FusionSpec
from fusionkit.core.registry import Registry


def test_reverse_padded_reverses_each_items_valid_frames_and_is_its_own_inverse():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 2)
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    out = plugin.reverse_padded(x, mask)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out[b, :n], x[b, :n].flip(0))  # valid frames reversed
        assert set(map(tuple, out[b, n:].tolist())) == set(map(tuple, x[b, n:].tolist()))
    torch.testing.assert_close(plugin.reverse_padded(out, mask), x)
    assert plugin.host_syncs(lambda: plugin.reverse_padded(x, mask)) == []


def test_check_shape_names_the_component_the_input_and_both_shapes():
    x = torch.zeros(2, 5, 4)
    assert plugin.check_shape("gate 'g'", "audio", x, "b t d", d=4) == {"b": 2, "t": 5, "d": 4}
    with pytest.raises(
        plugin.ShapeError, match=r"gate 'g' expected audio \(B, T, D=8\); got \(2, 5, 4\)"
    ):
        plugin.check_shape("gate 'g'", "audio", x, "b t d", d=8)
    with pytest.raises(plugin.ShapeError, match=r"\(B, T, S, D\); got \(2, 5, 4\)"):
        plugin.check_shape("gate 'g'", "audio", x, "b t s d")


def test_xavier_init_sets_every_linear_and_zero_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    plugin.xavier_init_(net)
    for lin in (net[0], net[2]):
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.8 * bound
        assert (lin.bias == 0).all()


class _Params(plugin.Params):
    width: int = 4


def test_registration_checks_the_build_signature_of_the_kind():
    reg = Registry()

    @plugin.register("fusion", "ok_fusion")
    def good(params: _Params, *, in_dims: dict[str, int]):
        """A fusion."""

    def bad(params: _Params, *, dims: dict[str, int]):  # wrong keyword
        """Not a fusion."""

    reg.add("fusion", "ok_fusion", build=good)
    assert reg.get("fusion", "ok_fusion").params is _Params  # from the annotation
    assert reg.get("fusion", "ok_fusion").summary == "A fusion"
    with pytest.raises(
        plugin.PluginError, match=r"does not match the fusion build signature.*in_dims"
    ):
        reg.add("fusion", "bad_fusion", build=bad)
    with pytest.raises(plugin.PluginError, match="unknown kind 'fuzion'"):
        reg.add("fuzion", "x", build=good)


def test_build_checks_what_the_build_function_returns_naming_the_missing_attribute(registry):
    reg = Registry(_kinds=dict(registry._kinds), _items=dict(registry._items))

    class NoLength(nn.Module):  # a fusion without fixed_length
        out_dims = {"fused": 3}  # noqa: RUF012
        num_steps = 1

        def forward(self, feats, mask):
            return feats

    reg.add("fusion", "no_length", build=lambda p, *, in_dims: NoLength())
    spec = FusionSpec.model_validate({"name": "no_length"}, context={"registry": reg})
    with pytest.raises(plugin.RecipeError, match=r"lacks \['fixed_length'\]"):
        spec.build(reg, in_dims={"audio": 3})


def test_a_plugin_declares_a_kind_and_a_spec_picks_its_components():
    from typing import ClassVar, Protocol, runtime_checkable

    from pydantic import BaseModel

    @runtime_checkable
    class Scorer(Protocol):
        def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    class ScorerBuild(Protocol):
        def __call__(self, params: BaseModel) -> Scorer: ...

    class ScorerSpec(plugin.ComponentSpec):
        kind: ClassVar[str] = "scorer"

    reg = Registry()
    reg.add_kind(plugin.Kind("scorer", ScorerBuild, Scorer, summary="scores"))
    reg.add("scorer", "double", build=lambda p: lambda x: 2 * x, params=_Params)
    spec = ScorerSpec.model_validate(
        {"name": "double", "params": {"width": 9}}, context={"registry": reg}
    )
    assert spec.params.width == 9 and spec.build(reg)(torch.ones(1)).item() == 2.0
    with pytest.raises(Exception, match="unknown scorer 'tripple'"):
        ScorerSpec.model_validate({"name": "tripple"}, context={"registry": reg})


def test_old_top_level_names_still_work_with_a_warning():
    import fusionkit

    fusionkit.__dict__.pop("GateOutput", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from fusionkit import GateOutput
    assert GateOutput is plugin.GateOutput
    assert [w.category for w in caught] == [FutureWarning]
    assert "fusionkit.plugin.GateOutput" in str(caught[0].message)


def test_message_helpers_keep_a_long_error_on_one_line():
    """``one_line`` picks the line a message needs and bounds its length; ``first_few``
    names the first items of a long list and counts the rest."""
    from fusionkit.plugin import first_few, one_line

    exc = ValueError("shape mismatch\n\n   expected  (2, 3)\n")
    assert one_line(exc) == "shape mismatch; expected (2, 3)"
    assert one_line(exc, pick="first") == "shape mismatch"
    assert one_line(exc, pick="final") == "expected (2, 3)"
    assert one_line(ValueError("")) == "" and one_line(None) == ""
    long = "x" * 50
    assert one_line(long, limit=10) == "x" * 10 + " ..."
    assert one_line(long, limit=None) == long == one_line(long, limit=50)
    names = [f"v{i}" for i in range(12)]
    assert first_few(names, 3) == "v0, v1, v2, and 9 more"
    assert first_few(names[:3], 3, "; ") == "v0; v1; v2"
