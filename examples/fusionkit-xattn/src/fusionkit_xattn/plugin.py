"""The entry point fusionkit loads: registers the ``xattn`` fusion and the ``xattn_gated`` gate."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import Registry

from fusionkit_xattn.fusion import XAttnFusion, XAttnParams
from fusionkit_xattn.gate import GatedLateFusion, GatedLateParams


def build_xattn(params: XAttnParams, *, in_dims: dict[str, int]) -> XAttnFusion:
    """Cross-modal transformer fusion over two or more modalities."""
    return XAttnFusion(params, in_dims)


def build_gated(
    params: GatedLateParams, *, in_dims: dict[str, int], num_steps: int
) -> GatedLateFusion:
    """Gated late fusion: attention over steps, then a per-frame modality gate."""
    return GatedLateFusion(params, in_dims, num_steps)


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    registry.add(
        "fusion",
        "xattn",
        build=build_xattn,
        params=XAttnParams,
        summary="cross-modal transformer: each modality attends to the others; stack per block",
    )
    registry.add(
        "gate",
        "xattn_gated",
        build=build_gated,
        params=GatedLateParams,
        summary="gated late fusion: attention over steps, sigmoid gate per modality",
    )
