"""Extraction throughput of the backbones, side by side in one run (random weights; nothing is
downloaded)::

    python -m fusionkit_affwild2.throughput                       # every preset, CPU
    python -m fusionkit_affwild2.throughput --only wavlm dinov2 --device cuda

Frames/s counts video frames (at ``--fps``) per second of wall time, from a 16 kHz waveform
or from face crops already decoded (``--crop`` px RGB) to feature rows: the log-mel front end
or the chunked encoding and per-frame pooling for audio, resizing and normalisation for faces.
Media decoding is not included.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import torch

__all__ = ["PRESETS", "main", "measure"]

#: name -> (kind, component, params); random weights, the defaults otherwise.
PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vggish": ("audio_backbone", "vggish", {}),
    "audio_cnn": ("audio_backbone", "audio_cnn", {}),
    "wav2vec2_base": ("audio_backbone", "wav2vec2", {"size": "base", "pretrained": False}),
    "hubert_base": ("audio_backbone", "hubert", {"size": "base", "pretrained": False}),
    "wavlm_base_plus": ("audio_backbone", "wavlm", {"size": "base_plus", "pretrained": False}),
    "wav2vec2_large": ("audio_backbone", "wav2vec2", {"size": "large", "pretrained": False}),
    "hubert_large": ("audio_backbone", "hubert", {"size": "large", "pretrained": False}),
    "wavlm_large": ("audio_backbone", "wavlm", {"size": "large", "pretrained": False}),
    "ir50": ("visual_backbone", "ir50", {}),
    "face_cnn": ("visual_backbone", "face_cnn", {}),
    "clip_vit_b16": ("visual_backbone", "clip_vit", {"pretrained": False}),
    "dinov2_s14_224": ("visual_backbone", "dinov2", {"pretrained": False, "img_size": 224}),
    "dinov2_s14_518": ("visual_backbone", "dinov2", {"pretrained": False}),
}


def _audio_run(model: torch.nn.Module, seconds: float, fps: float, batch: int, device: str):
    from fusionkit_affwild2.backbones import audio_input
    from fusionkit_affwild2.logmel import LogMel, frame_patches, patch_starts
    from fusionkit_affwild2.params import WaveformParams
    from fusionkit_affwild2.waveform import encode_chunked, frame_windows, pool_frames

    frames = round(seconds * fps)
    wave = 0.1 * torch.randn(round(seconds * 16000))
    if audio_input(model) == "waveform":
        wp = WaveformParams()
        hop, win = int(model.frame_hop), int(model.frame_window)

        def run() -> None:
            enc = encode_chunked(
                model,
                wave,
                chunk_frames=round(wp.chunk_seconds * 16000 / hop),
                context_frames=round(wp.context_seconds * 16000 / hop),
                chunks_per_batch=wp.chunks_per_batch,
                device=device,
            )
            rate = Fraction(fps).limit_denominator(1001)
            pool_frames(enc, frame_windows(frames, rate, 16000, hop, win, wave.numel(), "start"))

        return run, frames
    front = LogMel()

    @torch.inference_mode()
    def run_logmel() -> None:
        logmel = front(wave)
        starts = patch_starts(frames, fps, front.frames_per_second, 96, "start")
        for chunk in starts.split(batch):
            model(frame_patches(logmel, chunk, 96).to(device))

    return run_logmel, frames


def _visual_run(model: torch.nn.Module, crops: int, crop: int, batch: int, device: str):
    from fusionkit_affwild2.faces import prepare_faces

    size = int(model.input_size)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (crop, crop, 3), dtype=np.uint8) for _ in range(crops)]

    @torch.inference_mode()
    def run() -> None:
        for s in range(0, crops, batch):
            model(prepare_faces(images[s : s + batch], max(size, crop), size).to(device))

    return run, crops


def measure(
    name: str, *, seconds: float, fps: float, crops: int, crop: int, batch: int, device: str
) -> tuple[float, int, str]:
    """``(frames/s, parameters, input)`` of one preset (after one warm-up call)."""
    from fusionkit_affwild2.backbones import AudioBackboneSpec, VisualBackboneSpec

    kind, component, params = PRESETS[name]
    cls = AudioBackboneSpec if kind == "audio_backbone" else VisualBackboneSpec
    model = cls(name=component, params=params).build().to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    run: Callable[[], None]
    if kind == "audio_backbone":
        warm, _ = _audio_run(model, 1.0, fps, batch, device)
        run, frames = _audio_run(model, seconds, fps, batch, device)
        what = f"{seconds:g} s of 16 kHz audio, {fps:g} fps"
    else:
        warm, _ = _visual_run(model, min(2, crops), crop, batch, device)
        run, frames = _visual_run(model, crops, crop, batch, device)
        what = f"{crops} crops {crop}px -> {int(model.input_size)}px"
    warm()
    _sync(device)
    t0 = time.perf_counter()
    run()
    _sync(device)
    return frames / (time.perf_counter() - t0), n_params, what


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(PRESETS), help="presets to measure")
    ap.add_argument("--seconds", type=float, default=20.0, help="audio length per run")
    ap.add_argument("--fps", type=float, default=30.0, help="video frame rate")
    ap.add_argument("--crops", type=int, default=32, help="face crops per run")
    ap.add_argument("--crop", type=int, default=112, help="crop size (Aff-Wild2: 112)")
    ap.add_argument("--batch", type=int, default=64, help="patches / crops per call")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    names = args.only or list(PRESETS)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
        f"threads, load {load:.1f}; device {args.device}; torch {torch.__version__}"
    )
    if args.device.startswith("cuda"):
        print(f"gpu: {torch.cuda.get_device_name()}")
    print("| backbone | parameters | input | frames/s |")
    print("|---|---|---|---|")
    for name in names:
        rate, n_params, what = measure(
            name,
            seconds=args.seconds,
            fps=args.fps,
            crops=args.crops,
            crop=args.crop,
            batch=args.batch,
            device=args.device,
        )
        print(f"| `{name}` | {n_params / 1e6:.1f} M | {what} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
