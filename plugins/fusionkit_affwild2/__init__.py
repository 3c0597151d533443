"""fusionkit_affwild2: the Aff-Wild2 dataset read as distributed, raw-media feature
extraction (PyAV decoding, torchaudio log-mel, audio and face backbones, foundation models
from torchaudio and timm), and the generic ``features`` dataset for features made elsewhere.
See ``docs/data.md``.

Modules: :mod:`~fusionkit_affwild2.dataset` (``affwild2``), :mod:`~fusionkit_affwild2.features`
(``features``), :mod:`~fusionkit_affwild2.layout` (the official tree, labels, folds),
:mod:`~fusionkit_affwild2.media` (PyAV), :mod:`~fusionkit_affwild2.logmel`,
:mod:`~fusionkit_affwild2.faces`, :mod:`~fusionkit_affwild2.backbones`,
:mod:`~fusionkit_affwild2.foundation_audio` (wav2vec2, hubert, wavlm),
:mod:`~fusionkit_affwild2.foundation_visual` (clip_vit, dinov2, timm),
:mod:`~fusionkit_affwild2.waveform` (waveform backbones on the video clock),
:mod:`~fusionkit_affwild2.extraction` (the jobs), :mod:`~fusionkit_affwild2.throughput`
(``python -m fusionkit_affwild2.throughput``). The package itself imports none of them, so
loading the plugin registry does not import PyAV, torchaudio or timm.
"""
