"""Self-supervised speech encoders as ``audio_backbone`` components (``input = "waveform"``):
``wav2vec2``, ``hubert`` and ``wavlm``, the architectures of the ``torchaudio.pipelines``
bundles WAV2VEC2_BASE / _LARGE, HUBERT_BASE / _LARGE, WAVLM_BASE / _BASE_PLUS / _LARGE.

* **Weights.** ``pretrained: true`` (default) calls the bundle's ``get_model()``: torchaudio
  downloads the checkpoint once through ``torch.hub`` on the user's machine (cached under
  ``$TORCH_HOME/hub/checkpoints``). ``weights: FILE.safetensors`` loads a file instead (the
  bundle's own key layout, ``feature_extractor.*`` / ``encoder.*``; ``fusionkit weights
  convert`` turns the bundle's ``.pth`` into one). ``pretrained: false`` without ``weights``
  gives random weights seeded by ``seed`` (features without meaning; ``extract`` warns).
  Architecture-only builds (on the meta device) never fetch anything.
* **Input.** ``(B, samples)`` mono 16 kHz waveforms. The large HuBERT and WavLM models
  layer-normalise each waveform first, as their bundles do.
* **Output.** ``(B, T, D)`` at 50 Hz (``frame_hop`` 320 samples, ``frame_window`` 400). Each
  row combines the transformer layers' outputs (as ``extract_features`` returns them) with a
  fixed weight vector: one ``layer``, the mean of the ``last_k``, given ``layer_weights``, or
  (default) the uniform mean of all layers. Nothing is learned: extraction is frozen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from fusionkit.plugin import DataError, Params, one_line, register
from fusionkit_affwild2.backbones import MAX_SEED, load_backbone_weights, read_weights

__all__ = [
    "BUNDLES",
    "HubertParams",
    "SpeechEncoder",
    "SpeechParams",
    "Wav2Vec2Params",
    "WavLMParams",
    "layer_mix",
]

#: (family, size) -> (torchaudio.pipelines bundle, torchaudio.models factory, layers,
#: layer-normalised waveform). The factories build the bundles' architectures (a test checks
#: them against the bundles' configurations).
BUNDLES: dict[tuple[str, str], tuple[str, str, int, bool]] = {
    ("wav2vec2", "base"): ("WAV2VEC2_BASE", "wav2vec2_base", 12, False),
    ("wav2vec2", "large"): ("WAV2VEC2_LARGE", "wav2vec2_large", 24, False),
    ("hubert", "base"): ("HUBERT_BASE", "hubert_base", 12, False),
    ("hubert", "large"): ("HUBERT_LARGE", "hubert_large", 24, True),
    ("wavlm", "base"): ("WAVLM_BASE", "wavlm_base", 12, False),
    ("wavlm", "base_plus"): ("WAVLM_BASE_PLUS", "wavlm_base", 12, False),
    ("wavlm", "large"): ("WAVLM_LARGE", "wavlm_large", 24, True),
}


class SpeechParams(Params):
    """A torchaudio speech encoder: weights and the transformer layers to combine."""

    family: ClassVar[str] = ""
    size: str
    pretrained: bool = Field(
        True,
        description="without weights: fetch the bundle's pretrained weights through torchaudio "
        "(downloaded once, cached by torch.hub); false: random weights (features mean nothing)",
    )
    weights: Path | None = Field(
        None,
        description="safetensors file with the encoder's weights (bundle key layout); "
        "overrides pretrained",
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random initialisation")
    layer: int | None = Field(
        None,
        description="use one transformer layer: 1..L, or negative from the end (-1 = last)",
    )
    last_k: int | None = Field(
        None, ge=1, description="use the mean of the last k transformer layers"
    )
    layer_weights: list[float] | None = Field(
        None,
        description="fixed non-negative weights, one per transformer layer (L), normalised to "
        "sum 1 (default with layer and last_k unset: the uniform mean of all layers)",
    )

    @property
    def bundle(self) -> str:
        return BUNDLES[(self.family, self.size)][0]

    @property
    def num_layers(self) -> int:
        return BUNDLES[(self.family, self.size)][2]

    @model_validator(mode="after")
    def _one_choice(self) -> SpeechParams:
        chosen = [k for k in ("layer", "last_k", "layer_weights") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"set at most one of layer, last_k, layer_weights (got {chosen})")
        n = self.num_layers
        if self.layer is not None and not (1 <= abs(self.layer) <= n):
            raise ValueError(f"layer must be in 1..{n} or -{n}..-1 for {self.bundle}")
        if self.last_k is not None and self.last_k > n:
            raise ValueError(f"last_k must be <= {n} (the layers of {self.bundle})")
        w = self.layer_weights
        if w is not None and (len(w) != n or min(w) < 0 or sum(w) <= 0):
            raise ValueError(
                f"layer_weights needs {n} non-negative numbers (one per layer of {self.bundle}) "
                f"with a positive sum, got {len(w)}"
            )
        return self


class Wav2Vec2Params(SpeechParams):
    """wav2vec 2.0 (torchaudio WAV2VEC2_BASE / WAV2VEC2_LARGE, LibriSpeech 960 h)."""

    family: ClassVar[str] = "wav2vec2"
    size: Literal["base", "large"] = Field("base", description="base (12 layers, 768-d) or large")


class HubertParams(SpeechParams):
    """HuBERT (torchaudio HUBERT_BASE, LibriSpeech 960 h / HUBERT_LARGE, Libri-Light 60k h)."""

    family: ClassVar[str] = "hubert"
    size: Literal["base", "large"] = Field(
        "base", description="base (12 layers, 768-d) or large (24 layers, 1024-d)"
    )


class WavLMParams(SpeechParams):
    """WavLM (torchaudio WAVLM_BASE, WAVLM_BASE_PLUS, WAVLM_LARGE)."""

    family: ClassVar[str] = "wavlm"
    size: Literal["base", "base_plus", "large"] = Field(
        "base_plus",
        description="base, base_plus (both 12 layers, 768-d; base_plus saw 94k h of speech) "
        "or large (24 layers, 1024-d)",
    )


def layer_mix(params: SpeechParams) -> list[float]:
    """The ``L`` weights that combine the transformer layers' outputs (sum 1)."""
    n = params.num_layers
    if params.layer is not None:
        w = [0.0] * n
        w[params.layer - 1 if params.layer > 0 else n + params.layer] = 1.0
    elif params.last_k is not None:
        w = [0.0] * (n - params.last_k) + [1.0] * params.last_k
    elif params.layer_weights is not None:
        w = [float(x) for x in params.layer_weights]
    else:
        w = [1.0] * n
    total = sum(w)
    return [x / total for x in w]


class SpeechEncoder(nn.Module):
    """A torchaudio ``Wav2Vec2Model`` (its ``feature_extractor`` and ``encoder``, so the state
    dict is the bundle's) with a fixed mix of transformer layers.

    ``(B, samples)`` at 16 kHz -> ``(B, T, out_dim)`` at 50 Hz.
    """

    input = "waveform"
    sample_rate = 16000

    def __init__(self, model: nn.Module, mix: list[float], normalize_waveform: bool) -> None:
        super().__init__()
        self.feature_extractor = model.feature_extractor
        self.encoder = model.encoder
        self.mix = mix
        self.used_layers = max(i for i, w in enumerate(mix) if w > 0) + 1
        self.normalize_waveform = normalize_waveform
        self.out_dim = int(self.encoder.feature_projection.projection.out_features)
        convs = [layer.conv for layer in self.feature_extractor.conv_layers]
        self.frame_hop = math.prod(int(c.stride[0]) for c in convs)
        window, step = 1, 1
        for c in convs:
            window += (int(c.kernel_size[0]) - 1) * step
            step *= int(c.stride[0])
        self.frame_window = window

    def convert_state_dict(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a torchaudio checkpoint onto this module's keys: drops the ``model.`` prefix of
        the bundles' waveform-normalising wrapper, renames the pre-parametrisation
        weight-norm keys (``weight_g`` / ``weight_v``) of the positional convolution."""
        out = {}
        for key, value in sd.items():
            key = key.removeprefix("model.")
            if key.endswith("pos_conv_embed.conv.weight_g"):
                key = key.replace("weight_g", "parametrizations.weight.original0")
            elif key.endswith("pos_conv_embed.conv.weight_v"):
                key = key.replace("weight_v", "parametrizations.weight.original1")
            out[key] = value
        return out

    def forward(self, wave: Tensor) -> Tensor:
        if wave.dim() != 2 or wave.shape[1] < self.frame_window:
            raise DataError(
                f"speech encoder expects (B, samples >= {self.frame_window}) waveforms, got "
                f"{tuple(wave.shape)}"
            )
        if self.normalize_waveform:
            wave = nn.functional.layer_norm(wave, wave.shape[-1:])
        x, _ = self.feature_extractor(wave, None)
        layers = self.encoder.extract_features(x, None, self.used_layers)
        out = torch.zeros_like(layers[0])
        for w, h in zip(self.mix, layers, strict=False):
            if w > 0:
                out = out + w * h
        return out


def _fetch_pretrained(name: str, bundle_name: str) -> nn.Module:
    """The bundle's model with its pretrained weights (torchaudio downloads them once)."""
    import torchaudio

    bundle = getattr(torchaudio.pipelines, bundle_name)
    try:
        loaded = bundle.get_model()
    except (OSError, RuntimeError, ValueError) as exc:
        reason = one_line(exc, limit=200) or type(exc).__name__
        raise DataError(
            f"audio_backbone '{name}': cannot fetch the pretrained torchaudio.pipelines."
            f"{bundle_name} weights ({reason}); run once with network access (cached under "
            f"{torch.hub.get_dir()}), or set weights: FILE.safetensors, or pretrained: false "
            "for random weights"
        ) from None
    return loaded if hasattr(loaded, "feature_extractor") else loaded.model


def build_speech(name: str, params: SpeechParams) -> SpeechEncoder:
    """The encoder of ``params``: pretrained, from a weights file, or random (seeded)."""
    import torchaudio

    bundle_name, factory, _, normalize = BUNDLES[(params.family, params.size)]
    on_meta = torch.get_default_device().type == "meta"
    if params.pretrained and params.weights is None and not on_meta:
        model = _fetch_pretrained(name, bundle_name)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            model = getattr(torchaudio.models, factory)()
    encoder = SpeechEncoder(model, layer_mix(params), normalize)
    if params.weights is not None:
        tensors = encoder.convert_state_dict(read_weights(params.weights))
        load_backbone_weights(encoder, params.weights, tensors)
    return encoder.eval()


@register("audio_backbone", "wav2vec2")
def build_wav2vec2(params: Wav2Vec2Params) -> SpeechEncoder:
    """wav2vec 2.0 base/large on 16 kHz waveforms -> 50 Hz frames (torchaudio bundles)."""
    return build_speech("wav2vec2", params)


@register("audio_backbone", "hubert")
def build_hubert(params: HubertParams) -> SpeechEncoder:
    """HuBERT base/large on 16 kHz waveforms -> 50 Hz frames (torchaudio bundles)."""
    return build_speech("hubert", params)


@register("audio_backbone", "wavlm")
def build_wavlm(params: WavLMParams) -> SpeechEncoder:
    """WavLM base/base_plus/large on 16 kHz waveforms -> 50 Hz frames (torchaudio bundles)."""
    return build_speech("wavlm", params)
