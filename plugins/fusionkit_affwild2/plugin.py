"""Entry point: the ``affwild2`` and ``features`` datasets and the extraction backbones."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import Registry
from fusionkit_affwild2 import backbones as bb
from fusionkit_affwild2.params import AffWild2Params, FeaturesParams


def _build_affwild2(params: AffWild2Params):
    from fusionkit_affwild2.dataset import AffWild2Dataset

    return AffWild2Dataset(params)


def _build_features(params: FeaturesParams):
    from fusionkit_affwild2.features import FeaturesDataset

    return FeaturesDataset(params)


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    registry.add(
        "dataset",
        "affwild2",
        build=_build_affwild2,
        params=AffWild2Params,
        summary="Aff-Wild2 VA track from its official tree (features cached by fusionkit extract)",
    )
    registry.add(
        "dataset",
        "features",
        build=_build_features,
        params=FeaturesParams,
        summary="per-video feature arrays (.npy/.safetensors) + Aff-Wild2-format label files",
    )
    registry.add(
        "audio_backbone",
        "vggish",
        build=bb.build_vggish,
        params=bb.VGGishParams,
        summary="VGGish CNN: 96x64 log-mel patch -> 128-d (as released; random or safetensors)",
    )
    registry.add(
        "audio_backbone",
        "audio_cnn",
        build=bb.build_audio_cnn,
        params=bb.AudioCNNParams,
        summary="light conv net on log-mel patches (any patch size)",
    )
    registry.add(
        "visual_backbone",
        "ir50",
        build=bb.build_ir50,
        params=bb.IR50Params,
        summary="IR-ResNet-50, strides 1,2,2,2, 40x40 faces -> 512-d L2-normalised (as released)",
    )
    registry.add(
        "visual_backbone",
        "face_cnn",
        build=bb.build_face_cnn,
        params=bb.FaceCNNParams,
        summary="light conv net on face crops",
    )
