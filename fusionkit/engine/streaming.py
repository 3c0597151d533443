"""Online (streaming) prediction: valence/arousal frame by frame from live features.

:class:`StreamingPredictor` keeps the most recent ``context`` frames of every modality in a
ring buffer and, for each pushed frame, runs the model on the buffered frames and returns the
prediction for the newest one. No future frame is ever used, so the algorithmic latency is one
frame; the compute latency is one forward pass over ``context`` frames.

- For a **causal** model (causal encoders such as ``tcn``, per-frame fusion and gate, a
  per-frame head) whose receptive field fits in ``context``, the streamed prediction for frame
  ``t`` equals the model applied to the whole video, read at frame ``t``. That is not always
  what ``fusionkit predict``/``eval`` give: they average overlapping windows, and a window
  that starts at frame ``s`` gives the frames ``s .. s + receptive_field - 2`` a truncated
  context, so those frames can differ from the streamed ones (a model whose encoders look at
  one frame at a time, e.g. ``linear``, gives the same numbers either way).
- For a model that attends across its window (``rjca`` correlates over all frames of the
  window), the streamed prediction is the *trailing-window* prediction: the components after
  the encoders see the encoder outputs of frames ``t - context + 1 .. t``, read at the last
  frame. An encoder that is not causal, or whose receptive field exceeds ``context``, is run
  on those frames alone, as the model on that window would; a causal encoder whose receptive
  field fits gives its outputs on the whole stream (each frame encoded from its own receptive
  field, so the earliest frames of the window see up to ``receptive_field - 1`` frames before
  it, as inside a longer video). It differs from the offline (centred, overlapping-window
  averaged) prediction, which uses future frames.
- An encoder with a streaming form (``init_stream(batch, device)`` and
  ``step(frame, state) -> (output, state)``, as ``tcn`` has) encodes each new frame in O(1)
  from its carried state, which equals encoding the whole stream.
- Otherwise an encoder that declares an integer ``receptive_field`` (a causal encoder: its
  output at frame ``t`` depends on frames ``t - receptive_field + 1 .. t`` only) is run
  once per frame on its receptive field, and its outputs are cached; other encoders re-encode
  the whole window at every frame.
- Components after the encoders that declare ``frame_local = True`` (output frame ``t``
  depends on input frame ``t`` only, in eval mode) are computed for the newest frame alone
  when everything after them is frame-local too: with ``tagf`` (a BiLSTM over the steps of
  each frame) and the ``regression`` head, only RJCA runs over the whole window.
- A fusion with a fixed window length (``rjca`` faithful mode) gets its window padded at the
  end while fewer frames than that have arrived, with the padding masked.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fusionkit.core.errors import DataError, FusionkitError, ShapeError
from fusionkit.core.interfaces import CausalEncoder, FrameLocal, StreamingEncoder
from fusionkit.engine.data import Normalizer
from fusionkit.engine.evaluate import autocast
from fusionkit.engine.model import FusionModel

__all__ = [
    "MAX_STREAM_FLOATS",
    "MAX_STREAM_FRAMES",
    "StreamedFrame",
    "StreamingPredictor",
    "check_features",
    "read_feature_file",
    "stream",
]


#: Most frames a features file given to ``fusionkit stream`` may hold (over 18 hours at 30 fps).
MAX_STREAM_FRAMES = 2_000_000
#: Most values (frames x features, over the modalities read) such a file may hold: 2 GiB as
#: float32. Both are checked from the arrays' headers, before anything is loaded.
MAX_STREAM_FLOATS = 512 << 20


class StreamingPredictor:
    """Frame-by-frame predictor over a trailing window.

    Args:
        model: a built :class:`~fusionkit.engine.model.FusionModel` (put in eval mode here).
        feature_dims: modality -> feature size of one frame.
        context: frames kept in the buffer (the window the model sees); a fusion's
            ``fixed_length``, when it has one, overrides it.
        normalizer: the run's feature z-scoring (``session.normalizer``), applied to every
            pushed frame.
        bf16: run the model under bf16 autocast (``session.bf16``: the precision the run was
            evaluated in), so that a frame-local model gives the numbers ``predict`` gives.

    :attr:`notes` says, one sentence each, why the streamed predictions are *not* those of
    the model applied to the whole video (empty when they are).

    Example::

        sp = StreamingPredictor(model, {"audio": 32, "video": 48}, context=300)
        va = sp.push({"audio": a_t, "video": v_t})  # (n_targets,) for frame t
    """

    def __init__(
        self,
        model: FusionModel,
        feature_dims: dict[str, int],
        context: int,
        normalizer: Normalizer | None = None,
        bf16: bool = False,
    ) -> None:
        fixed = model.fusion.fixed_length
        self.context = int(fixed or context)
        if self.context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.fixed = fixed is not None
        self.normalizer = normalizer
        self.bf16 = bf16
        self.model = model.eval()
        self.modalities = list(model.modalities)
        missing = [m for m in self.modalities if m not in feature_dims]
        if missing:
            raise ShapeError(f"feature_dims lacks {missing}; the model uses {self.modalities}")
        device = next(model.parameters()).device
        self.buffers = {
            m: torch.zeros(2 * self.context, feature_dims[m], device=device)
            for m in self.modalities
        }
        # causal encoders: modality -> receptive field; their outputs are cached per frame
        encoders = {m: model.encoders[m] for m in self.modalities}
        self.causal = {
            m: int(enc.receptive_field)
            for m, enc in encoders.items()
            if isinstance(enc, CausalEncoder) and 0 < int(enc.receptive_field) <= self.context
        }
        self.stateful = [m for m in self.causal if isinstance(encoders[m], StreamingEncoder)]
        self.encoded = {
            m: torch.zeros(2 * self.context, int(model.encoders[m].out_dim), device=device)
            for m in self.causal
        }
        # fusion, gate, head: from the first of a frame-local tail on, only the newest frame
        # is computed (a frame-local component's frame t depends on its input's frame t only)
        parts = (model.fusion, model.gate, model.head)
        tail = [isinstance(c, FrameLocal) and c.frame_local is True for c in parts]
        self.local_from = 3
        while self.local_from > 0 and tail[self.local_from - 1]:
            self.local_from -= 1
        self.device = device
        self.notes = self._notes(encoders, parts, tail, int(context))
        self.reset()

    def _notes(
        self, encoders: dict[str, object], parts: tuple[object, ...], tail: list[bool], asked: int
    ) -> list[str]:
        """Why the streamed predictions differ from the model on the whole video, if they do."""
        c, notes = self.context, []
        if self.fixed and asked != c:
            notes.append(
                f"the fusion takes windows of exactly {c} frames, so a context of {asked} is "
                "not used"
            )
        for m, enc in encoders.items():
            if not isinstance(enc, CausalEncoder):
                notes.append(
                    f"encoder {m!r} is not causal: it sees the last {c} frames only, so the "
                    "predictions are those of a trailing window, not of the whole video"
                )
            elif int(enc.receptive_field) > c:
                notes.append(
                    f"encoder {m!r} has a receptive field of {int(enc.receptive_field)} frames, "
                    f"more than the {c} frames of context kept: its outputs use a truncated "
                    "context, not the whole video's (give a longer context)"
                )
        across = [type(p).__name__ for p, local in zip(parts, tail, strict=True) if not local]
        if across:
            notes.append(
                f"{', '.join(across)} sees across frames: the predictions are those of the "
                f"trailing window of {c} frames (of encoder outputs; a causal encoder's reach "
                "back before the window by up to its receptive field), not of the whole video"
            )
        return notes

    def reset(self) -> None:
        """Forget every frame pushed so far (start of a new video)."""
        self.count = 0
        self.states = {m: self.model.encoders[m].init_stream(1, self.device) for m in self.stateful}

    @torch.no_grad()
    def push(self, frame: dict[str, Tensor]) -> Tensor:
        """Add one frame (``{modality: (F_m,)}``) and return its prediction ``(n_targets,)``."""
        with autocast(self.device, self.bf16):  # the precision predict and eval use
            return self._push(frame).float()

    def _push(self, frame: dict[str, Tensor]) -> Tensor:
        # Double-length buffer: each frame is written at i and i + context, so the last
        # ``context`` frames are always one contiguous slice (no per-frame roll or copy).
        c = self.context
        slot = self.count % c
        if self.normalizer is not None:  # a row of zeros is a frame without the modality
            # (a missing face): kept at zero as for the run's own data, which flags it absent
            frame = {
                m: self.normalizer.apply(m, x, present=(x != 0).any(dim=-1))
                if m in self.modalities
                else x
                for m, x in frame.items()
            }
        for m in self.modalities:
            x = frame.get(m)
            buf = self.buffers[m]
            if x is None or x.shape != buf.shape[1:]:
                got = None if x is None else tuple(x.shape)
                raise ShapeError(
                    f"streaming frame {self.count}: expected {m} of shape ({buf.shape[1]},); "
                    f"got {got}"
                )
            buf[slot] = x
            buf[slot + c] = x
        self.count += 1
        n = min(self.count, c)
        start = slot + 1 if self.count >= c else 0
        length = c if self.fixed else n
        mask = torch.zeros(1, length, dtype=torch.bool, device=self.device)
        mask[0, :n] = True
        feats = {}
        for m in self.modalities:
            if m in self.stateful:  # O(1): one step of the streaming form
                y, self.states[m] = self.model.encoders[m].step(frame[m][None], self.states[m])
                newest = y[0]
            if m in self.causal:
                if m not in self.stateful:  # encode the newest frame from its receptive field
                    k = min(n, self.causal[m])
                    recent = self.buffers[m][start + n - k : start + n].unsqueeze(0)
                    ones = torch.ones(1, k, dtype=torch.bool, device=self.device)
                    newest = self.model.encoders[m](recent, ones)[0, -1]
                self.encoded[m][slot] = newest
                self.encoded[m][slot + c] = newest
                x = self.encoded[m][start : start + n]
            else:
                x = self.buffers[m][start : start + n]
                if length > n:
                    x = torch.cat([x, x.new_zeros(length - n, x.shape[1])])
                feats[m] = self.model.encoders[m](x.unsqueeze(0), mask)
                continue
            if length > n:
                x = torch.cat([x, x.new_zeros(length - n, x.shape[1])])
            feats[m] = x.unsqueeze(0)
        return self._tail(feats, mask, n)

    def _tail(self, feats: dict[str, Tensor], mask: Tensor, n: int) -> Tensor:
        """Fusion, gate and head; those from ``local_from`` on see the newest frame only."""
        newest = slice(n - 1, n)
        model, cut = self.model, self.local_from
        if cut == 0:
            feats, mask = {m: x[:, newest] for m, x in feats.items()}, mask[:, newest]
        stacks = model.fusion(feats, mask)
        if cut == 1:
            stacks, mask = {s: x[:, newest] for s, x in stacks.items()}, mask[:, newest]
        fused = model.gate(stacks, mask).features
        if cut == 2:
            fused, mask = fused[:, newest], mask[:, newest]
        pred = model.head(fused, mask)
        return pred[0, 0 if cut < 3 else n - 1].float()


@dataclass
class StreamedFrame:
    """One frame of a stream: its index and time, the prediction, the compute latency."""

    index: int
    seconds: float
    prediction: Tensor
    latency: float


def read_feature_file(
    path: Path, modalities: list[str], feature_dims: dict[str, int] | None = None
) -> dict[str, Tensor]:
    """``{modality: (N, F_m)}`` from a ``.safetensors`` file (one tensor per modality) or a
    ``.npz`` archive (no pickle), checked as :func:`check_features` does (the modalities a
    model needs, equal lengths, at least one frame, the widths in ``feature_dims``, finite
    values). The arrays' shapes are read from their headers first, and a file holding more
    than :data:`MAX_STREAM_FRAMES` frames or :data:`MAX_STREAM_FLOATS` values is refused
    before any array is loaded (a compressed archive of zeros is tiny on disk)."""
    from fusionkit.engine.files import load_tensors, tensor_shapes

    if not path.is_file():
        raise DataError(f"features file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            shapes = tensor_shapes(path)
            _check_size(path, shapes)  # every tensor in it: the whole file is loaded
            tensors = load_tensors(path)[0]
        except FusionkitError as exc:
            raise DataError(str(exc)) from None
    elif path.suffix == ".npz":
        tensors = _read_npz(path, modalities)
    else:
        raise DataError(
            f"{path}: give a .safetensors or .npz file with one (frames, features) array per "
            "modality"
        )
    return check_features(tensors, path, modalities, feature_dims)


def _check_size(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse arrays (by their header shapes) beyond the bounds of a stream input."""
    for m, shape in shapes.items():
        frames = int(shape[0]) if shape else 1
        if frames > MAX_STREAM_FRAMES:
            raise DataError(
                f"{path}: modality {m!r} holds {frames:,} frames; fusionkit stream reads at most "
                f"{MAX_STREAM_FRAMES:,} frames per file: split the video into parts"
            )
    values = sum(math.prod(int(d) for d in shape) for shape in shapes.values())
    if values > MAX_STREAM_FLOATS:
        raise DataError(
            f"{path}: the arrays hold {values:,} values ({values * 4 / 2**30:.1f} GiB as "
            f"float32); fusionkit stream reads at most {MAX_STREAM_FLOATS:,} "
            f"({MAX_STREAM_FLOATS * 4 / 2**30:.0f} GiB) per file: split the video into parts"
        )


def _read_npz(path: Path, modalities: list[str]) -> dict[str, Tensor]:
    """The arrays of ``modalities`` in a ``.npz`` archive; their ``.npy`` headers (shape,
    dtype) and uncompressed sizes are checked before any of them is loaded."""
    import zipfile

    import numpy as np

    def unreadable(why: object) -> DataError:
        return DataError(
            f"{path} is not a readable .npz archive ({why}); give one written by numpy.savez "
            "or numpy.savez_compressed"
        )

    try:
        if not zipfile.is_zipfile(path):
            raise unreadable("not a zip archive of .npy arrays")
        with zipfile.ZipFile(path) as zf:
            members = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
            missing = [m for m in modalities if m not in members]
            if missing:
                raise DataError(
                    f"{path} has no {missing[0]!r} array (it has: {', '.join(members)})"
                )
            shapes, dtypes = {}, {}
            for m in modalities:
                info = members[m]
                if info.file_size > 4 * MAX_STREAM_FLOATS + (1 << 20):
                    raise DataError(
                        f"{path}: array {m!r} is {info.file_size / 2**30:.1f} GiB uncompressed; "
                        f"fusionkit stream reads at most {MAX_STREAM_FLOATS * 4 / 2**30:.0f} "
                        "GiB per file: split the video into parts"
                    )
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                shapes[m], dtypes[m] = shape, dtype
            _check_size(path, shapes)
            for m, dtype in dtypes.items():
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise DataError(
                        f"{path}: array {m!r} holds {dtype} values; give real numbers "
                        "(float32, float16 or integers)"
                    )
            tensors = {}
            for m in modalities:
                with zf.open(members[m]) as fh:
                    tensors[m] = torch.from_numpy(np.lib.format.read_array(fh, allow_pickle=False))
            return tensors
    except FusionkitError:
        raise
    except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, RuntimeError) as exc:
        raise unreadable(exc) from None


def check_features(
    tensors: dict[str, Tensor],
    source: Path | str,
    modalities: list[str],
    feature_dims: dict[str, int] | None = None,
) -> dict[str, Tensor]:
    """``{modality: (N, F_m) float32}`` for ``modalities``, or a :class:`DataError` naming
    ``source`` and the modality: a missing array, arrays not ``(frames, features)`` of one
    length, zero frames, a width other than ``feature_dims[m]`` (the run's), or a value that
    is not finite in float32 (NaN, inf, or beyond float32's range), with its first frame."""
    missing = [m for m in modalities if m not in tensors]
    if missing:
        raise DataError(f"{source} has no {missing[0]!r} array (it has: {', '.join(tensors)})")
    lengths = {m: tuple(tensors[m].shape) for m in modalities}
    if any(len(s) != 2 for s in lengths.values()) or len({s[0] for s in lengths.values()}) != 1:
        raise DataError(f"{source}: arrays must be (frames, features) of one length; got {lengths}")
    if next(iter(lengths.values()))[0] == 0:
        raise DataError(f"{source} holds 0 frames; give at least one frame of every modality")
    out = {}
    for m in modalities:
        width = lengths[m][1]
        if feature_dims is not None and m in feature_dims and width != feature_dims[m]:
            raise DataError(
                f"{source}: modality {m!r} has {width} features per frame; the run's model "
                f"expects {feature_dims[m]} (give the features the run was trained on)"
            )
        x = tensors[m]
        if x.dtype == torch.bool or x.is_complex():
            raise DataError(f"{source}: modality {m!r} is {x.dtype}; give real numbers")
        x = x.float()
        bad = ~torch.isfinite(x)
        if bad.any():
            frame, col = (int(i) for i in bad.nonzero()[0])
            raise DataError(
                f"{source}: modality {m!r} has a non-finite value ({float(x[frame, col])}) at "
                f"frame {frame} (feature {col}; NaN, inf, or beyond float32's range): fix or "
                "drop those frames; fusionkit does not predict from non-finite features"
            )
        out[m] = x
    return out


def stream(
    predictor: StreamingPredictor,
    features: dict[str, Tensor],
    fps: float,
    realtime: bool = False,
) -> Iterator[StreamedFrame]:
    """Push every frame of ``features`` through ``predictor``, as a live source would (paced
    at ``fps`` when ``realtime``), yielding each frame's prediction and latency."""
    predictor.reset()
    n = next(iter(features.values())).shape[0]
    start = time.perf_counter()
    for i in range(n):
        if realtime:
            due = start + i / fps
            time.sleep(max(0.0, due - time.perf_counter()))
        t0 = time.perf_counter()
        pred = predictor.push({m: x[i] for m, x in features.items()})
        if pred.device.type == "cuda":
            torch.cuda.synchronize(pred.device)
        yield StreamedFrame(i, i / fps, pred.cpu(), time.perf_counter() - t0)
