"""Entry point: the ``affwild2`` and ``features`` datasets, the backbone kinds and backbones
(the classic ones in :mod:`~fusionkit_affwild2.backbones`, the foundation ones in
:mod:`~fusionkit_affwild2.foundation_audio` and :mod:`~fusionkit_affwild2.foundation_visual`).

The datasets are imported when built, and the foundation backbones import torchaudio / timm
only when built, so that loading the registry imports neither PyAV, torchaudio nor timm.
"""

from __future__ import annotations

from typing import Any

from fusionkit import plugin
from fusionkit_affwild2 import backbones, foundation_audio, foundation_visual
from fusionkit_affwild2.params import AffWild2Params, FeaturesParams


@plugin.register("dataset", "affwild2")
def build_affwild2(params: AffWild2Params) -> Any:
    """Aff-Wild2 VA track from its official tree (features cached by fusionkit extract)."""
    from fusionkit_affwild2.dataset import AffWild2Dataset

    return AffWild2Dataset(params)


@plugin.register("dataset", "features")
def build_features(params: FeaturesParams) -> Any:
    """Per-video feature arrays (.npy/.safetensors) + Aff-Wild2-format label files."""
    from fusionkit_affwild2.features import FeaturesDataset

    return FeaturesDataset(params)


@plugin.hookimpl
def fusionkit_register_kinds(registry: plugin.Registry) -> None:
    for kind in backbones.KINDS:
        registry.add_kind(kind)


@plugin.hookimpl
def fusionkit_register_components(registry: plugin.Registry) -> None:
    import sys

    registry.add_module(backbones, foundation_audio, foundation_visual, sys.modules[__name__])
