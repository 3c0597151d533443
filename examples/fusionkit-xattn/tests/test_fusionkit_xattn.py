"""fusionkit-xattn's own tests: the fusionkit conformance kit plus component-specific behaviour."""

from __future__ import annotations

import importlib.metadata as md

import pytest
import torch

pytest.importorskip("fusionkit_xattn", reason="fusionkit-xattn is not installed (pip install -e .)")

from fusionkit.testing import check_component, check_fusion, check_gate

from fusionkit_xattn.fusion import XAttnFusion, XAttnParams, build_xattn
from fusionkit_xattn.gate import GatedLateParams, build_gated


@pytest.mark.parametrize(
    "params",
    [
        XAttnParams(dim=16, heads=2, layers=2),
        XAttnParams(dim=16, heads=4, layers=1, window=3, dropout=0.0),
    ],
)
def test_xattn_fusion_conforms(params):
    check_fusion(build_xattn, params, name="xattn").assert_ok()


def test_xattn_fusion_conforms_with_three_modalities():
    params = XAttnParams(dim=8, heads=2, layers=1)
    dims = {"audio": 5, "video": 7, "text": 3}
    check_fusion(build_xattn, params, name="xattn", in_dims=dims).assert_ok()


@pytest.mark.parametrize(
    "params", [GatedLateParams(hidden=8), GatedLateParams(modality_gate=False, temperature=0.5)]
)
def test_gated_late_fusion_conforms(params):
    check_gate(build_gated, params, name="xattn_gated").assert_ok()


def test_window_bounds_the_receptive_field():
    fusion = XAttnFusion(XAttnParams(dim=8, heads=2, layers=1, window=2), {"audio": 4, "video": 4})
    fusion.eval()
    feats = {m: torch.randn(1, 20, 4) for m in ("audio", "video")}
    mask = torch.ones(1, 20, dtype=torch.bool)
    base = fusion(feats, mask)
    feats["video"][:, 15] += 5.0  # one layer, window 2: audio frames 13..17 may change, no other
    moved = (fusion(feats, mask)["audio"] - base["audio"]).abs().amax(dim=(0, 2, 3))
    assert torch.nonzero(moved > 0).flatten().tolist() == [13, 14, 15, 16, 17]


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="heads"):
        XAttnParams(dim=10, heads=4)


def _installed() -> bool:
    try:
        md.distribution("fusionkit-xattn")
    except md.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="the entry point exists only once pip-installed")
@pytest.mark.parametrize(("kind", "name"), [("fusion", "xattn"), ("gate", "xattn_gated")])
def test_registered_components_conform(kind, name):
    report = check_component(kind, name)
    report.assert_ok()
    assert report.distribution == "fusionkit-xattn"
