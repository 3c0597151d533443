"""Entry point of the built-in baseline components."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import EmptyParams, Registry
from fusionkit_baselines.components import (
    ConcatFusion,
    ConcatParams,
    LastStepGate,
    LinearEncoder,
    LinearParams,
    RegressionHead,
    RegressionHeadParams,
)


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    registry.add(
        "encoder",
        "linear",
        build=lambda p, *, in_dim, modality: LinearEncoder(p, in_dim),
        params=LinearParams,
        summary="per-frame linear projection (no temporal context)",
    )
    registry.add(
        "fusion",
        "concat",
        build=lambda p, *, in_dims: ConcatFusion(p, in_dims),
        params=ConcatParams,
        summary="per-frame concatenation; with one encoder it is a unimodal baseline",
    )
    registry.add(
        "gate",
        "last",
        build=lambda p, *, in_dims, num_steps: LastStepGate(in_dims, num_steps),
        params=EmptyParams,
        summary="last step of each stream, concatenated (plain RJCA)",
    )
    registry.add(
        "head",
        "regression",
        build=lambda p, *, in_dim, n_targets: RegressionHead(p, in_dim, n_targets),
        params=RegressionHeadParams,
        summary="Linear-BatchNorm-LeakyReLU-Linear-tanh head as released",
    )
