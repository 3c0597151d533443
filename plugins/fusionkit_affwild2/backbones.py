"""Feature extractors run by ``fusionkit extract``: audio and visual backbones.

Contracts (what the ``affwild2`` extractor feeds a registered backbone):

* ``audio_backbone`` reads one of two inputs, declared by the module's ``input`` attribute
  (absent means ``"logmel"``, so older backbones keep working unchanged):

  - ``input = "logmel"``: ``(B, patch_frames, n_mels)`` log-mel patches -> ``(B, out_dim)``,
    one patch per video frame (``vggish``, ``audio_cnn``);
  - ``input = "waveform"`` (:class:`WaveformBackbone`): ``(B, samples)`` mono waveforms at the
    module's ``sample_rate`` -> ``(B, T, out_dim)`` encoder frames, frame ``j`` covering
    samples ``[j * frame_hop, j * frame_hop + frame_window)`` (``wav2vec2``, ``hubert``,
    ``wavlm`` in :mod:`~fusionkit_affwild2.foundation_audio`). The extractor cuts long audio
    into chunks and averages, for each video frame, the encoder frames that overlap its
    window (:mod:`~fusionkit_affwild2.waveform`).

* ``visual_backbone``: ``(B, 3, input_size, input_size)`` RGB faces scaled to ``[-1, 1]``
  -> ``(B, out_dim)``; the module exposes ``input_size`` (a backbone with another
  normalisation, such as the timm ones in :mod:`~fusionkit_affwild2.foundation_visual`,
  converts inside its ``forward``).

Built with random weights (seeded by ``seed``) or loaded from a user-supplied safetensors file
(``weights``; never a pickle); the foundation backbones also take ``pretrained: true``
(weights fetched by torchaudio / timm on the user's machine). Key names follow the widely used
PyTorch ports, so converted
weights load directly: ``vggish`` uses the ``features.*`` / ``embeddings.*`` layout of the
torchvggish port, ``ir50`` the ``input_layer`` / ``body`` / ``output_layer`` layout of the
arcface IR backbones (a ``module.`` prefix is stripped).

``fusionkit weights convert SRC.pth OUT.safetensors --arch vggish|ir50`` makes such a file
from a released PyTorch checkpoint. It calls the optional ``convert_state_dict(sd) -> sd``
method of the built module (defined here by :class:`VGGish` and :class:`IR50`), which maps a
released key layout onto the module's own; any module may define it. It receives a plain
``{name: tensor}`` dict, returns the mapped dict, and reports what it drops with
``warnings.warn`` (shown to the user as a note); the command then checks every tensor against
the module's state dict.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, ClassVar, Protocol, runtime_checkable

import torch
from einops import rearrange
from pydantic import BaseModel, Field, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from fusionkit.plugin import (
    ComponentSpec,
    DataError,
    Kind,
    Params,
    cast_like,
    first_few,
    non_finite_tensor,
    register,
    state_dict_mismatch,
)

__all__ = [
    "IR50",
    "KINDS",
    "AudioBackbone",
    "AudioBackboneSpec",
    "AudioCNN",
    "AudioCNNParams",
    "FaceCNN",
    "FaceCNNParams",
    "IR50Params",
    "VGGish",
    "VGGishParams",
    "VisualBackbone",
    "VisualBackboneSpec",
    "WaveformBackbone",
    "audio_input",
    "load_backbone_weights",
    "read_weights",
]


@runtime_checkable
class AudioBackbone(Protocol):
    """``(B, patch_frames, n_mels)`` log-mel patches -> ``(B, out_dim)`` (or, with
    ``input = "waveform"``, the :class:`WaveformBackbone` contract)."""

    out_dim: int

    def __call__(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class WaveformBackbone(Protocol):
    """``(B, samples)`` mono waveforms at ``sample_rate`` -> ``(B, T, out_dim)`` encoder
    frames; frame ``j`` covers samples ``[j * frame_hop, j * frame_hop + frame_window)``, so a
    waveform of ``n >= frame_window`` samples gives ``1 + (n - frame_window) // frame_hop``
    frames."""

    input: str  # "waveform"
    out_dim: int
    sample_rate: int
    frame_hop: int
    frame_window: int

    def __call__(self, x: Tensor) -> Tensor: ...


def audio_input(module: object) -> str:
    """What an ``audio_backbone`` reads: ``"logmel"`` (the default) or ``"waveform"``."""
    kind = getattr(module, "input", "logmel")
    if kind not in ("logmel", "waveform"):
        raise DataError(
            f"audio_backbone {type(module).__name__} declares input={kind!r}; expected "
            "'logmel' or 'waveform'"
        )
    if kind == "waveform" and not isinstance(module, WaveformBackbone):
        missing = [
            a
            for a in ("out_dim", "sample_rate", "frame_hop", "frame_window")
            if not hasattr(module, a)
        ]
        raise DataError(
            f"audio_backbone {type(module).__name__} declares input='waveform' but lacks "
            f"{', '.join(missing)}"
        )
    return kind


@runtime_checkable
class VisualBackbone(Protocol):
    """``(B, 3, input_size, input_size)`` faces in ``[-1, 1]`` -> ``(B, out_dim)``."""

    out_dim: int
    input_size: int

    def __call__(self, x: Tensor) -> Tensor: ...


class AudioBackboneBuild(Protocol):
    def __call__(self, params: BaseModel) -> AudioBackbone: ...


class VisualBackboneBuild(Protocol):
    def __call__(self, params: BaseModel) -> VisualBackbone: ...


#: The kinds this plugin declares: feature extractors run by ``fusionkit extract``.
KINDS = (
    Kind(
        "audio_backbone",
        AudioBackboneBuild,
        AudioBackbone,
        module=True,
        summary="log-mel patch or waveform -> embedding (feature extraction)",
        distribution="fusionkit",
    ),
    Kind(
        "visual_backbone",
        VisualBackboneBuild,
        VisualBackbone,
        module=True,
        summary="face crop -> embedding (feature extraction)",
        distribution="fusionkit",
    ),
)


class AudioBackboneSpec(ComponentSpec):
    """An ``audio_backbone`` chosen in a dataset's params (``name`` + ``params``)."""

    kind: ClassVar[str] = "audio_backbone"


class VisualBackboneSpec(ComponentSpec):
    """A ``visual_backbone`` chosen in a dataset's params (``name`` + ``params``)."""

    kind: ClassVar[str] = "visual_backbone"


#: Largest ``seed`` of a backbone's random initialisation (``torch.manual_seed`` takes a
#: 64-bit integer; the synthetic dataset uses the same bound).
MAX_SEED = 2**63 - 1
#: Largest width of one conv block of the light CNN backbones, and most blocks.
MAX_CHANNELS = 4096
MAX_BLOCKS = 16

#: Conv block widths of ``audio_cnn`` / ``face_cnn``: positive and bounded, so a typo is one
#: line from ``recipe validate`` instead of a traceback or an allocation failure.
_Channels = list[Annotated[int, Field(ge=1, le=MAX_CHANNELS)]]


class _WeightsParams(Params):
    weights: Path | None = Field(
        None, description="safetensors file with the backbone's weights (default: random init)"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random initialisation")


def check_weights_file(path: Path, key: str) -> None:
    """Refuse, from its header alone (cheap: no tensor is read), a weights file that cannot be
    loaded: missing, a folder, a PyTorch pickle, or not a whole safetensors file. ``key``:
    the recipe key that names it."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"backbone weights {path} is a folder; set {key} to a .safetensors file")
    if not path.is_file():
        raise DataError(
            f"backbone weights file {path} does not exist; set {key} to an existing "
            ".safetensors file"
        )
    try:
        with safe_open(str(path), "pt") as fh:
            fh.keys()
    except (SafetensorError, OSError, ValueError) as exc:
        convert = (
            "; a PyTorch checkpoint (.pth, .pt) converts with `fusionkit weights convert`"
            if zipfile.is_zipfile(path) or path.suffix in (".pth", ".pt", ".bin", ".ckpt")
            else ""
        )
        raise DataError(
            f"backbone weights {path} ({key}) are not a readable safetensors file: {exc}{convert}"
        ) from None


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors weights file, without ``module.`` prefixes; errors name
    the file (and a tensor holding NaN or infinite values)."""
    if not Path(path).is_file():
        raise DataError(f"backbone weights file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(
            f"backbone weights {path} are not a readable safetensors file: {exc}"
        ) from None
    _refuse_non_finite(tensors, path)
    return _renamed(tensors, lambda k: k.removeprefix("module."), f"backbone weights {path}")


def _renamed(sd: dict[str, Tensor], rename: Callable[[str], str], where: str) -> dict[str, Tensor]:
    """``sd`` with each key renamed; two keys of one new name (``x`` beside ``module.x``: two
    copies of the weights, e.g. a model and its EMA or a wrapped and an unwrapped save) are
    refused, where one copy would silently overwrite parts of the other."""
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        new = rename(key)
        if new in out:
            raise DataError(
                f"{where} holds {origin[new]!r} and {key!r}, two copies of one tensor (a file "
                "with two copies of the weights, e.g. a model and its EMA): save one copy only"
            )
        out[new], origin[new] = value, key
    return out


def _refuse_non_finite(tensors: dict[str, Tensor], path: Path) -> None:
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise DataError(
            f"backbone weights {path}: tensor {bad}; such weights turn every feature into NaN: "
            "convert the weights again from a checkpoint of a healthy model"
        )


def load_backbone_weights(
    module: nn.Module, path: Path, tensors: dict[str, Tensor] | None = None
) -> None:
    """Load safetensors weights strictly; a mismatch (or a tensor holding NaN or infinite
    values) names the file and the keys. ``tensors``: the file's tensors already read (and
    mapped) by the caller."""
    if tensors is None:
        tensors = read_weights(path)  # refuses non-finite tensors
    else:
        _refuse_non_finite(tensors, path)
    own = module.state_dict()
    problems = state_dict_mismatch(own, tensors)
    if problems:
        raise DataError(f"backbone weights {path} do not fit {type(module).__name__}: {problems}")
    try:  # what `fusionkit weights convert` checks too: integers for floats, values out of range
        tensors = cast_like(own, tensors)
    except ValueError as exc:
        raise DataError(
            f"backbone weights {path}: {exc}; convert the checkpoint with `fusionkit weights "
            "convert`, or check that the file holds these weights"
        ) from None
    module.load_state_dict(tensors, strict=True)


def _strip_prefixes(
    sd: dict[str, Tensor], own: Iterable[str], wrappers: Iterable[str] = ()
) -> dict[str, Tensor]:
    """Keys without DataParallel ``module.`` prefixes (at any depth of wrapping), then without
    a wrapper module's prefix (e.g. ``backbone.``) that the module's own keys do not have."""

    def unwrapped(key: str) -> str:
        while key.startswith("module."):
            key = key.removeprefix("module.")
        return key

    out = _renamed(sd, unwrapped, "the checkpoint")
    own = set(own)
    for prefix in wrappers:
        if not any(k.startswith(prefix) for k in own) and any(k.startswith(prefix) for k in out):
            out = _renamed(out, lambda k, p=prefix: k.removeprefix(p), "the checkpoint")
    return out


def _drop(sd: dict[str, Tensor], keys: list[str], why: str) -> dict[str, Tensor]:
    """``sd`` without ``keys``; a warning (a note for the user) names them and says why."""
    keys = sorted(keys)
    if keys:
        warnings.warn(f"dropped {len(keys)} tensor(s) ({first_few(keys, 4)}): {why}", stacklevel=3)
    gone = set(keys)
    return {k: v for k, v in sd.items() if k not in gone}


# --------------------------------------------------------------------------- audio

#: Names of the PCA post-processing tensors of the torchvggish port (``pproc.*``).
_PCA_NAMES = ("pca_eigen_vectors", "pca_matrix", "pca_means")


class VGGishParams(_WeightsParams):
    """VGGish (fixed architecture: 96x64 patches -> 128-d)."""

    final_relu: bool = Field(
        True,
        description="ReLU after the last layer, as in the torchvggish port; the TensorFlow "
        "original has none (the weights are the same either way)",
    )


class VGGish(nn.Module):
    """VGGish: 6 conv layers in 4 blocks (64, 128, 2x256, 2x512, 2x2 max-pool after each
    block) then FC 12288 -> 4096 -> 4096 -> 128, ReLU after every layer but (optionally) the
    last (72.1 M parameters).

    ``(B, 96, 64)`` log-mel patches -> ``(B, 128)``.
    """

    out_dim = 128
    patch_shape = (96, 64)

    def __init__(self, final_relu: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for block in ((64,), (128,), (256, 256), (512, 512)):
            for c_out in block:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 128),
            nn.ReLU(inplace=True) if final_relu else nn.Identity(),
        )

    def convert_state_dict(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a released VGGish state dict onto this module's keys.

        Accepts the torchvggish port's layout (``features.{0,3,6,8,11,13}.*``,
        ``embeddings.{0,2,4}.*``; ``vggish-10086976.pth``), also inside a wrapper
        (``backbone.``, as the ABAW code's ``AudioBackbone`` saves it) and with DataParallel
        ``module.`` prefixes. The PCA post-processing tensors (``pproc.pca_eigen_vectors`` or
        ``pca_matrix``, ``pproc.pca_means``) are kept as buffers when the architecture has
        them; this one outputs the raw embedding and has none, so they are dropped with a
        note.
        """
        own = self.state_dict()
        sd = _strip_prefixes(sd, own, ("backbone.", "vggish."))
        pca = [k for k in sd if k.rsplit(".", 1)[-1] in _PCA_NAMES and k not in own]
        return _drop(
            sd,
            pca,
            "PCA post-processing of the torchvggish port; this VGGish outputs the raw 128-d "
            "embedding (no PCA buffers)",
        )

    def forward(self, patches: Tensor) -> Tensor:
        if tuple(patches.shape[1:]) != self.patch_shape:
            raise DataError(
                f"vggish expects (B, 96, 64) log-mel patches, got {tuple(patches.shape)}; keep "
                "logmel.patch_frames=96 and logmel.n_mels=64"
            )
        x = self.features(rearrange(patches, "b t mel -> b 1 t mel"))
        # flatten in (time, mel, channel) order, as the original TensorFlow model does
        return self.embeddings(rearrange(x, "b c t mel -> b (t mel c)"))


class AudioCNNParams(_WeightsParams):
    """A light audio CNN (any patch size)."""

    channels: _Channels = Field(
        default_factory=lambda: [32, 64, 128],
        min_length=1,
        max_length=MAX_BLOCKS,
        description=f"conv block widths (1..{MAX_CHANNELS} each, at most {MAX_BLOCKS} blocks)",
    )
    dim: int = Field(128, ge=1, description="embedding size")


class AudioCNN(nn.Module):
    """Conv3x3-BN-ReLU-MaxPool blocks, global average pooling, Linear: ``(B, T, M) -> (B, dim)``."""

    def __init__(self, params: AudioCNNParams) -> None:
        super().__init__()
        self.out_dim = params.dim
        self.blocks = _conv_stack(1, params.channels)
        self.proj = nn.Linear(params.channels[-1], params.dim)

    def forward(self, patches: Tensor) -> Tensor:
        x = self.blocks(rearrange(patches, "b t mel -> b 1 t mel"))
        return self.proj(x.mean(dim=(2, 3)))


def _conv_stack(c_in: int, channels: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_out in channels:
        layers += [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2, ceil_mode=True),
        ]
        c_in = c_out
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- visual


class IR50Params(_WeightsParams):
    """IR-ResNet-50 as released for 40x40 faces."""

    input_size: int = Field(40, ge=8, description="face size (multiple of 8; as released: 40)")
    dim: int = Field(512, ge=1, description="embedding size (as released: 512)")
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="dropout of the output layer")
    l2_normalize: bool = Field(True, description="L2-normalise the embedding (as released)")

    @model_validator(mode="after")
    def _multiple_of_8(self) -> IR50Params:
        if self.input_size % 8:
            raise ValueError(f"input_size must be a multiple of 8, got {self.input_size}")
        return self


class _IRUnit(nn.Module):
    """Improved-residual bottleneck: BN-Conv-PReLU-Conv-BN plus a (projected) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        if c_in == c_out:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
            nn.PReLU(c_out),
            nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IR50(nn.Module):
    """IR-ResNet-50 (arcface ``ir`` mode): stages of 3, 4, 14, 3 units with 64, 128, 256, 512
    channels and strides 1, 2, 2, 2 (a 40x40 face gives a 5x5x512 map), then
    BN -> Dropout -> FC(512 * (s/8)^2 -> 512) -> BN1d and (as released) L2 normalisation.

    ``(B, 3, s, s)`` in ``[-1, 1]`` -> ``(B, dim)``.
    """

    def __init__(self, params: IR50Params) -> None:
        super().__init__()
        self.input_size = params.input_size
        self.out_dim = params.dim
        self.l2_normalize = params.l2_normalize
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64)
        )
        units: list[nn.Module] = []
        c_in = 64
        for c_out, count, stride in ((64, 3, 1), (128, 4, 2), (256, 14, 2), (512, 3, 2)):
            for k in range(count):
                units.append(_IRUnit(c_in, c_out, stride if k == 0 else 1))
                c_in = c_out
        self.body = nn.Sequential(*units)
        side = params.input_size // 8
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(params.dropout),
            nn.Flatten(),
            nn.Linear(512 * side * side, params.dim),
            nn.BatchNorm1d(params.dim),
        )

    def convert_state_dict(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a released IR-50 state dict onto this module's keys.

        Accepts the arcface ``Backbone`` layout (``input_layer.*``, ``body.<unit>.*``,
        ``output_layer.*``) directly or inside the ABAW code's ``VisualBackbone`` wrapper, as
        ``res50_ir_0.887.pth`` is saved: ``backbone.`` prefixes are removed and its FER+
        classifier (``logits.*``) is dropped with a note (the embedding is taken before it).
        DataParallel ``module.`` prefixes are removed; BatchNorm ``num_batches_tracked``
        counters missing from checkpoints of old PyTorch versions are set to 0 (they do not
        change the outputs in eval mode).
        """
        own = self.state_dict()
        sd = _strip_prefixes(sd, own, ("backbone.",))
        head = [k for k in sd if k.startswith("logits.") and k not in own]
        sd = _drop(
            sd, head, "the FER+ classifier of the released model; the embedding is its input"
        )
        for key, value in own.items():
            if key.endswith(".num_batches_tracked") and key not in sd:
                prefix = key.removesuffix("num_batches_tracked")
                if f"{prefix}running_mean" in sd:
                    sd[key] = torch.zeros_like(value, device="cpu")
        return sd

    def forward(self, faces: Tensor) -> Tensor:
        if faces.shape[-1] != self.input_size or faces.shape[-2] != self.input_size:
            raise DataError(
                f"ir50 expects {self.input_size}x{self.input_size} faces, got {tuple(faces.shape)}"
            )
        x = self.output_layer(self.body(self.input_layer(faces)))
        return nn.functional.normalize(x, dim=-1) if self.l2_normalize else x


class FaceCNNParams(_WeightsParams):
    """A light face CNN."""

    input_size: int = Field(40, ge=4, description="face size fed to the network")
    channels: _Channels = Field(
        default_factory=lambda: [32, 64, 128],
        min_length=1,
        max_length=MAX_BLOCKS,
        description=f"conv block widths (1..{MAX_CHANNELS} each, at most {MAX_BLOCKS} blocks)",
    )
    dim: int = Field(512, ge=1, description="embedding size")


class FaceCNN(nn.Module):
    """Conv3x3-BN-ReLU-MaxPool blocks, global average pooling, Linear."""

    def __init__(self, params: FaceCNNParams) -> None:
        super().__init__()
        self.input_size = params.input_size
        self.out_dim = params.dim
        self.blocks = _conv_stack(3, params.channels)
        self.proj = nn.Linear(params.channels[-1], params.dim)

    def forward(self, faces: Tensor) -> Tensor:
        return self.proj(self.blocks(faces).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- builders


def _make(factory, params: _WeightsParams) -> nn.Module:
    """Build under a private RNG seeded by ``params.seed`` (the global RNG is untouched),
    then load the weights file if one is given; returns the module in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        module = factory()
    if params.weights is not None:
        load_backbone_weights(module, params.weights)
    return module.eval()


@register("audio_backbone", "vggish")
def build_vggish(params: VGGishParams) -> VGGish:
    """VGGish CNN: 96x64 log-mel patch -> 128-d (as released; random or safetensors)."""
    return _make(lambda: VGGish(params.final_relu), params)


@register("audio_backbone", "audio_cnn")
def build_audio_cnn(params: AudioCNNParams) -> AudioCNN:
    """Light conv net on log-mel patches (any patch size)."""
    return _make(lambda: AudioCNN(params), params)


@register("visual_backbone", "ir50")
def build_ir50(params: IR50Params) -> IR50:
    """IR-ResNet-50, strides 1,2,2,2, 40x40 faces -> 512-d L2-normalised (as released)."""
    return _make(lambda: IR50(params), params)


@register("visual_backbone", "face_cnn")
def build_face_cnn(params: FaceCNNParams) -> FaceCNN:
    """Light conv net on face crops."""
    return _make(lambda: FaceCNN(params), params)


def describe(module: nn.Module) -> tuple[int, int | None]:
    """``(out_dim, input_size or None)`` of a built backbone."""
    return int(module.out_dim), getattr(module, "input_size", None)
