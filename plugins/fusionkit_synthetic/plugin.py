"""Entry point of the embedded ``synthetic`` dataset."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import Registry
from fusionkit_synthetic.dataset import build
from fusionkit_synthetic.params import SyntheticParams


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    registry.add(
        "dataset",
        "synthetic",
        build=build,
        params=SyntheticParams,
        summary="embedded audio-visual valence/arousal data (no files; deterministic by seed)",
    )
