"""Entry point of the built-in perturbations."""

from __future__ import annotations

import fusionkit
from fusionkit.registry import Registry
from fusionkit_perturbations.corrupt import (
    ModalityDropout,
    ModalityDropoutParams,
    Noise,
    NoiseParams,
    SpanDropout,
    SpanDropoutParams,
)
from fusionkit_perturbations.temporal import (
    FrameDrop,
    FrameDropParams,
    Jitter,
    JitterParams,
    Shift,
    ShiftParams,
)


@fusionkit.hookimpl
def fusionkit_register_components(registry: Registry) -> None:
    add = registry.add
    add(
        "perturbation",
        "shift",
        build=Shift,
        params=ShiftParams,
        summary="shift one modality by k frames (+k: frame i shows i-k), edge-padded",
    )
    add(
        "perturbation",
        "jitter",
        build=Jitter,
        params=JitterParams,
        summary="shift one modality of each video by a random k in [-max_k, max_k]",
    )
    add(
        "perturbation",
        "frame_drop",
        build=FrameDrop,
        params=FrameDropParams,
        summary="drop frames with probability p; a dropped frame repeats the last one",
    )
    add(
        "perturbation",
        "noise",
        build=Noise,
        params=NoiseParams,
        summary="additive Gaussian noise at snr_db per video and modality",
    )
    add(
        "perturbation",
        "modality_dropout",
        build=ModalityDropout,
        params=ModalityDropoutParams,
        summary="remove a whole modality (all frames = fill) with probability p",
    )
    add(
        "perturbation",
        "span_dropout",
        build=SpanDropout,
        params=SpanDropoutParams,
        summary="set a fraction `rate` of frames, in spans of `span` frames, to fill",
    )
