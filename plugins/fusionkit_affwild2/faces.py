"""Face crops: JPEG decoding (PyAV's FFmpeg MJPEG decoder, no extra imaging library) and the
resize / centre-crop / ``[-1, 1]`` scaling the visual backbones expect."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import torch
from einops import rearrange
from torch import Tensor

from fusionkit.plugin import DataError

__all__ = ["decode_jpeg", "prepare_faces", "read_faces"]


class _Decoder:
    """A reusable MJPEG decoder context (recreated after an error).

    Damaged data is an error (FFmpeg's ``err_detect=explode``): by default the decoder conceals
    a broken or truncated entropy stream and returns a partly grey face without a word."""

    def __init__(self) -> None:
        self.ctx: av.CodecContext | None = None

    def __call__(self, data: bytes) -> np.ndarray:
        if self.ctx is None:
            self.ctx = av.CodecContext.create("mjpeg", "r")
            self.ctx.options = {"err_detect": "explode"}
        try:
            frames = self.ctx.decode(av.Packet(data))
            if not frames:
                frames = self.ctx.decode(None)
        except av.FFmpegError:
            self.ctx = None
            raise
        if not frames:
            raise ValueError("no image decoded")
        return frames[0].to_ndarray(format="rgb24")


def decode_jpeg(path: Path, decoder: _Decoder | None = None) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB of a JPEG file; a DataError names an unreadable file."""
    decoder = decoder or _Decoder()
    try:
        return decoder(path.read_bytes())
    except (OSError, av.FFmpegError, ValueError) as exc:
        raise DataError(
            f"cannot decode face crop {path}: {exc}; the file is damaged or truncated: copy or "
            "crop it again"
        ) from None


def prepare_faces(images: Sequence[np.ndarray], resize: int, input_size: int) -> Tensor:
    """Resize each crop to ``resize`` (bilinear, antialiased), centre-crop ``input_size`` and
    scale to ``[-1, 1]``: ``(B, 3, input_size, input_size)`` float32."""
    if input_size > resize:
        raise DataError(
            f"the visual backbone needs {input_size}x{input_size} faces but crops are resized "
            f"to {resize}; set data.params.video.resize >= {input_size}"
        )
    out = []
    for img in images:
        x = rearrange(torch.from_numpy(np.ascontiguousarray(img)), "h w c -> 1 c h w").float()
        if x.shape[-2:] != (resize, resize):
            x = torch.nn.functional.interpolate(
                x, size=(resize, resize), mode="bilinear", antialias=True, align_corners=False
            )
        out.append(x)
    batch = torch.cat(out) if out else torch.zeros(0, 3, resize, resize)
    lo = (resize - input_size) // 2
    batch = batch[:, :, lo : lo + input_size, lo : lo + input_size]
    return (batch / 255.0 - 0.5) / 0.5


def read_faces(paths: Sequence[Path], resize: int, input_size: int) -> Tensor:
    """Decode and prepare a batch of crop files."""
    decoder = _Decoder()
    return prepare_faces([decode_jpeg(p, decoder) for p in paths], resize, input_size)
