"""Entry point of the RJCA family: fusion ``rjca``; gates ``grjca``, ``tagf``, ``tagf_temporal``."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import Registry
from fusionkit_rjca.fusion import RJCAFusion, RJCAParams
from fusionkit_rjca.gates import (
    GRJCAGate,
    GRJCAParams,
    TAGFGate,
    TAGFParams,
    TAGFTemporalGate,
    TAGFTemporalParams,
)


def build_rjca(params: RJCAParams, *, in_dims: dict[str, int]) -> RJCAFusion:
    """Recursive joint cross-attention over exactly two modalities."""
    return RJCAFusion(params, in_dims)


def build_grjca(params: GRJCAParams, *, in_dims: dict[str, int], num_steps: int) -> GRJCAGate:
    return GRJCAGate(params, in_dims, num_steps)


def build_tagf(params: TAGFParams, *, in_dims: dict[str, int], num_steps: int) -> TAGFGate:
    return TAGFGate(params, in_dims, num_steps)


def build_tagf_temporal(
    params: TAGFTemporalParams, *, in_dims: dict[str, int], num_steps: int
) -> TAGFTemporalGate:
    return TAGFTemporalGate(params, in_dims, num_steps)


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    registry.add(
        "fusion",
        "rjca",
        build=build_rjca,
        params=RJCAParams,
        summary="recursive joint cross-attention (audio-video); stack of all steps per modality",
    )
    registry.add(
        "gate",
        "grjca",
        build=build_grjca,
        params=GRJCAParams,
        summary="GRJCA: softmax(Linear(last step)/0.1) over steps, ReLU (as released)",
    )
    registry.add(
        "gate",
        "tagf",
        build=build_tagf,
        params=TAGFParams,
        summary="TAGF: BiLSTM across the recursion steps of each frame (as released)",
    )
    registry.add(
        "gate",
        "tagf_temporal",
        build=build_tagf_temporal,
        params=TAGFTemporalParams,
        summary="TAGF time-aware reading: BiLSTM over time -> per-frame step weights",
    )
