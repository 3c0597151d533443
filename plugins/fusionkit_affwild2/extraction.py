"""Extraction jobs: raw media -> per-frame audio features, face crops -> per-frame visual
features, each written as one cache file (see :mod:`fusionkit_affwild2.cache`).

Jobs are small picklable records run by :func:`execute` in worker processes; each builds its
backbone once per process, on the job's device (``cuda`` when ``device: auto`` finds one),
and feeds it batches. Audio goes through log-mel patches or, for a backbone declaring
``input = "waveform"``, through :mod:`~fusionkit_affwild2.waveform` (chunked encoding, then
per-frame pooling).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit.plugin import ComponentSpec, DataError
from fusionkit_affwild2.backbones import audio_input
from fusionkit_affwild2.cache import CacheFolder, file_sha256
from fusionkit_affwild2.faces import read_faces
from fusionkit_affwild2.layout import crop_indices
from fusionkit_affwild2.logmel import LogMel, frame_patches, patch_starts
from fusionkit_affwild2.media import MediaInfo, load_audio_lead, probe
from fusionkit_affwild2.params import LogMelParams, WaveformParams
from fusionkit_affwild2.waveform import encode_chunked, encoder_frames, frame_windows, pool_frames

__all__ = [
    "AudioJob",
    "BackboneInfo",
    "VisualJob",
    "backbone_dims",
    "backbone_identity",
    "backbone_info",
    "build_backbone",
    "execute",
    "random_init",
    "resolve_device",
]

_MODELS: dict[str, nn.Module] = {}


def resolve_device(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise DataError("data.params.device: 'cuda' requested but no CUDA device is available")
    return spec


def build_backbone(
    spec: ComponentSpec, device: str, weights_sha256: str | None = None
) -> nn.Module:
    """The backbone ``spec`` (validated) on ``device`` in eval mode (memoised per process).

    ``weights_sha256``: what the cache folder the features go to was named after; a weights
    file that no longer has it (replaced while a long extraction ran) is refused, where its
    features would be filed under the old weights."""
    now = _weights_sha256(spec)
    if weights_sha256 is not None and now is not None and now != weights_sha256:
        raise DataError(
            f"backbone weights file {spec.params.weights} changed since this extraction "
            f"started (SHA-256 {weights_sha256[:12]}... then, {now[:12]}... now): run "
            "`fusionkit extract` again, which files the new weights' features apart"
        )
    key = json.dumps([spec.kind, spec.model_dump(mode="json"), device, now], sort_keys=True)
    if key not in _MODELS:
        _MODELS[key] = spec.build().to(device).eval()
    return _MODELS[key]


_HASHES: dict[tuple[str, int, int], str] = {}


def _weights_sha256(spec: ComponentSpec) -> str | None:
    """SHA-256 of the spec's weights file (None without one), hashed once per process for a
    file of the same size and modification time."""
    weights = getattr(spec.params, "weights", None)
    if weights is None:
        return None
    path = Path(weights)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


@dataclass(frozen=True)
class BackboneInfo:
    """What the extractor needs to know of a backbone before running it."""

    out_dim: int
    input_size: int | None
    input: str  # audio backbones: "logmel" or "waveform"


_INFO: dict[str, BackboneInfo] = {}


def _spec_key(spec: ComponentSpec) -> str:
    return json.dumps([spec.kind, spec.name, spec.params.model_dump(mode="json")], sort_keys=True)


def _info(spec: ComponentSpec) -> BackboneInfo:
    fields = type(spec.params).model_fields
    update = {k: v for k, v in (("weights", None), ("pretrained", False)) if k in fields}
    if update:
        spec = spec.model_copy(update={"params": spec.params.model_copy(update=update)})
    with torch.device("meta"):
        module = spec.build()
    kind = audio_input(module) if spec.kind == "audio_backbone" else "image"
    return BackboneInfo(int(module.out_dim), getattr(module, "input_size", None), kind)


def backbone_info(spec: ComponentSpec) -> BackboneInfo:
    """A backbone's output size, input size and input kind, from its architecture alone
    (built on the meta device: no memory, no weights read or downloaded)."""
    key = _spec_key(spec)
    if key not in _INFO:
        _INFO[key] = _info(spec)
    return _INFO[key]


def backbone_dims(spec: ComponentSpec) -> tuple[int, int | None]:
    """``(out_dim, input_size)`` of a backbone (see :func:`backbone_info`)."""
    info = backbone_info(spec)
    return info.out_dim, info.input_size


def random_init(spec: ComponentSpec) -> bool:
    """Whether a backbone with a ``weights`` param gets random weights: no weights file and
    no ``pretrained: true``."""
    p = spec.params
    if "weights" not in type(p).model_fields:
        return False
    return p.weights is None and not getattr(p, "pretrained", False)


def backbone_identity(spec: ComponentSpec) -> dict[str, Any]:
    """What defines a backbone's outputs: name, params, and the weights file's SHA-256 in
    place of its path (moving the file keeps the caches valid, changing it does not)."""
    params = spec.params.model_dump(mode="json")
    weights = params.pop("weights", None)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise DataError(f"backbone weights file {path} does not exist")
        params["weights_sha256"] = _weights_sha256(spec)
    return {"name": spec.name, "params": params}


@torch.inference_mode()
def _run_batched(model: nn.Module, inputs: list[Tensor], device: str) -> Tensor:
    outs = [model(x.to(device)).float().cpu() for x in inputs]
    return torch.cat(outs) if outs else torch.zeros(0, int(model.out_dim))


@dataclass(frozen=True)
class AudioJob:
    """Audio features of one raw video: one row per video frame.

    Writes ``features`` ``(F, D)`` and ``present`` ``(F,)`` (the frame's patch or window
    overlaps real audio) with ``info`` = the media's
    :class:`~fusionkit_affwild2.media.MediaInfo` plus the audio length and its frame count
    (``logmel_frames`` or ``encoder_frames``).
    """

    item: str
    media: str
    cache_root: str
    extractor: dict[str, Any]
    versions: dict[str, str]
    backbone: ComponentSpec
    logmel: dict[str, Any]
    anchor: str
    sync: str
    frame_count: str
    batch_size: int
    device: str
    waveform: dict[str, Any] | None = None

    def run(self) -> None:
        path = Path(self.media)
        info = probe(path, self.frame_count)  # type: ignore[arg-type]
        if info.num_frames == 0:
            raise DataError(f"media file {path} has no video frames")
        model = build_backbone(self.backbone, self.device, _named_sha(self.extractor))
        if audio_input(model) == "waveform":
            tensors, extra = self._waveform_features(model, path, info)
        else:
            tensors, extra = self._logmel_features(model, path, info)
        folder = CacheFolder(self.cache_root, "audio", self.extractor, self.versions)
        folder.write(self.item, tensors, {"media": path}, {**info.to_dict(), **extra})

    def _waveform_features(
        self, model: nn.Module, path: Path, info: MediaInfo
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        wp = WaveformParams.model_validate(self.waveform or {})
        rate, hop, win = int(model.sample_rate), int(model.frame_hop), int(model.frame_window)
        wave, lead = load_audio_lead(path, rate, self.sync)  # type: ignore[arg-type]
        n = wave.numel()
        real = encoder_frames(n, hop, win)
        if n < win:  # too short for one encoder frame: pad with silence, present stays False
            wave = torch.nn.functional.pad(wave, (0, win - n))
        frames = encode_chunked(
            model,
            wave,
            chunk_frames=max(1, round(wp.chunk_seconds * rate / hop)),
            context_frames=round(wp.context_seconds * rate / hop),
            chunks_per_batch=wp.chunks_per_batch,
            device=self.device,
        )
        width = None if wp.window_ms is None else Fraction(str(wp.window_ms)) / 1000
        windows = frame_windows(
            info.num_frames,
            Fraction(info.fps_exact),
            rate,
            hop,
            win,
            n,
            self.anchor,  # type: ignore[arg-type]
            width,
            lead,
        )
        present = windows.present & (real > 0)
        feats = pool_frames(frames, windows)
        return {"features": feats.contiguous(), "present": present}, {
            "audio_seconds": n / rate,
            "audio_lead_seconds": lead / rate,
            "encoder_frames": real,
        }

    def _logmel_features(
        self, model: nn.Module, path: Path, info: MediaInfo
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        lm_params = LogMelParams.model_validate(self.logmel)
        front = LogMel(lm_params)
        wave, lead = load_audio_lead(path, lm_params.sample_rate, self.sync)  # type: ignore[arg-type]
        real = 0 if wave.numel() < front.win else 1 + (wave.numel() - front.win) // front.hop
        # the first log-mel frame whose window reaches the recording (after the silence put
        # before an audio stream that starts late)
        first = 0 if lead < front.win else (lead - front.win) // front.hop + 1
        logmel = front(wave)
        starts = patch_starts(
            info.num_frames,
            info.fps,
            front.frames_per_second,
            lm_params.patch_frames,
            self.anchor,  # type: ignore[arg-type]
        )
        present = (starts < real) & (starts + lm_params.patch_frames > first)
        feats = torch.cat(
            [
                _run_batched(
                    model, [frame_patches(logmel, chunk, lm_params.patch_frames)], self.device
                )
                for chunk in starts.split(self.batch_size)
            ]
        )
        return {"features": feats.contiguous(), "present": present}, {
            "audio_seconds": wave.numel() / lm_params.sample_rate,
            "audio_lead_seconds": lead / lm_params.sample_rate,
            "logmel_frames": real,
        }


@dataclass(frozen=True)
class VisualJob:
    """Visual features of one trial's face crops: row ``k`` from ``%05d.jpg`` of ``k + 1``.

    Writes ``features`` ``(K, D)`` (zeros where no crop) and ``present`` ``(K,)``, with ``K``
    the highest crop number.
    """

    item: str
    crops: str
    cache_root: str
    extractor: dict[str, Any]
    versions: dict[str, str]
    backbone: ComponentSpec
    resize: int
    batch_size: int
    device: str

    def run(self) -> None:
        folder_path = Path(self.crops)
        crops = crop_indices(folder_path)
        model = build_backbone(self.backbone, self.device, _named_sha(self.extractor))
        size = int(getattr(model, "input_size", self.resize))
        n = max(crops) + 1 if crops else 0
        order = sorted(crops)
        outs = []
        for s in range(0, len(order), self.batch_size):
            faces = read_faces(
                [crops[i] for i in order[s : s + self.batch_size]], self.resize, size
            )
            outs.append(_run_batched(model, [faces], self.device))
        out = torch.cat(outs) if outs else torch.zeros(0, int(model.out_dim))
        feats = torch.zeros(n, int(model.out_dim))
        present = torch.zeros(n, dtype=torch.bool)
        if order:
            idx = torch.tensor(order)
            feats[idx] = out
            present[idx] = True
        folder = CacheFolder(self.cache_root, "video", self.extractor, self.versions)
        folder.write(
            self.item,
            {"features": feats, "present": present},
            {"crops": folder_path},
            {"crops": len(order), "max_frame": n},
        )


def _named_sha(extractor: dict[str, Any]) -> str | None:
    """The weights SHA-256 a cache folder's extractor identity names (None without one)."""
    backbone = extractor.get("backbone")
    params = backbone.get("params") if isinstance(backbone, dict) else None
    sha = params.get("weights_sha256") if isinstance(params, dict) else None
    return sha if isinstance(sha, str) else None


def execute(job: AudioJob | VisualJob) -> None:
    """Worker entry point of :func:`fusionkit.extract.run_jobs`."""
    job.run()
