"""Building blocks for components: padding-aware layers, shape checks and initialisation.

Windows are padded at the end (``mask``: ``(B, T)``, True on real frames). The usual ways of
keeping padding out of a BatchNorm or an RNN (``x[mask]``, ``pack_padded_sequence``,
``if mask.all():``) read tensor values on the host, so on a GPU every training step stalls
until the device has caught up. The functions here give the same results with device-side
arithmetic and indices only. Plugins reach them through :mod:`fusionkit.plugin`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from einops import EinopsError, parse_shape, rearrange
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fusionkit.core.errors import ShapeError

__all__ = [
    "check_mask",
    "check_shape",
    "check_shapes",
    "masked_batch_norm",
    "reverse_padded",
    "run_lstm",
    "shifted_bilstm",
    "xavier_init_",
]


def _axes_text(pattern: str, known: dict[str, int]) -> str:
    names = pattern.split()
    return "(" + ", ".join(n.upper() + (f"={known[n]}" if n in known else "") for n in names) + ")"


def check_shape(who: str, what: str, x: Tensor, pattern: str, **known: int) -> dict[str, int]:
    """The axis sizes of ``x`` named by an einops ``pattern``, after checking the rank and the
    ``known`` sizes; a mismatch raises :class:`ShapeError` naming ``who`` and ``what``.

    >>> check_shape("fusion 'mine'", "video", torch.zeros(2, 5, 8), "b t d", d=8)
    {'b': 2, 't': 5, 'd': 8}
    >>> check_shape("fusion 'mine'", "video", torch.zeros(2, 5, 4), "b t d", d=8)
    Traceback (most recent call last):
    ...
    fusionkit.core.errors.ShapeError: fusion 'mine' expected video (B, T, D=8); got (2, 5, 4)
    """
    unknown = [k for k in known if k not in pattern.split()]
    if unknown:
        raise ShapeError(
            f"{who}: the size of axis {unknown[0]!r} is given for {what}, but the pattern "
            f"{pattern!r} has no such axis"
        )
    want = _axes_text(pattern, known)
    try:
        dims = parse_shape(x, pattern)
    except (EinopsError, RuntimeError, ValueError):  # the rank differs
        raise ShapeError(f"{who} expected {what} {want}; got {tuple(x.shape)}") from None
    if any(dims[k] != v for k, v in known.items()):
        raise ShapeError(f"{who} expected {what} {want}; got {tuple(x.shape)}")
    return dims


def check_shapes(
    who: str,
    tensors: Mapping[str, Tensor],
    pattern: str,
    sizes: Mapping[str, Mapping[str, int]],
    shared: Sequence[str] = ("b", "t"),
) -> dict[str, int]:
    """Check several named tensors against one einops ``pattern``: each against its own known
    ``sizes[name]``, and the ``shared`` axes equal across all. Returns the shared sizes; a
    mismatch raises :class:`ShapeError` listing every expected and received shape.

    >>> x = {"audio": torch.zeros(2, 5, 3, 8), "video": torch.zeros(2, 5, 3, 16)}
    >>> sizes = {"audio": {"s": 3, "d": 8}, "video": {"s": 3, "d": 16}}
    >>> check_shapes("gate 'g'", x, "b t s d", sizes)
    {'b': 2, 't': 5}
    """
    missing = [name for name in sizes if name not in tensors]
    if missing:
        raise ShapeError(
            f"{who} expected tensors {sorted(sizes)}; got {sorted(tensors)} "
            f"(missing {missing[0]!r})"
        )
    found: dict[str, int] = {}
    try:
        for name in sizes:
            dims = check_shape(who, name, tensors[name], pattern, **found, **sizes[name])
            found = {a: dims[a] for a in shared}
    except ShapeError:
        axes = pattern.split()
        want = {
            n: _axes_text(pattern, {a: v for a, v in k.items() if a in axes})
            for n, k in sizes.items()
        }
        got = {n: tuple(tensors[n].shape) for n in sizes}
        one = ", ".join(a.upper() for a in shared)
        raise ShapeError(f"{who} expected {want} (one {one}); received {got}") from None
    return found


def check_mask(who: str, x: Tensor, mask: Tensor) -> None:
    """Raise :class:`ShapeError` unless ``mask`` is ``(B, T)`` matching ``x``'s leading axes."""
    if mask.dim() != 2 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ShapeError(
            f"{who}: mask must be (B, T) = {tuple(x.shape[:2])} like the features; "
            f"got {tuple(mask.shape)}"
        )


def xavier_init_(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases on every ``nn.Linear`` inside ``module`` (the
    initialisation of the released RJCA/TAGF code); returns ``module``."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_uniform_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
    return module


def reverse_padded(x: Tensor, mask: Tensor) -> Tensor:
    """Reverse the valid frames of every item of ``x`` ``(B, T, ...)``; padding stays at the
    end. What a recurrent layer needs for its backward direction.

    Item ``b`` with ``L`` valid frames becomes ``x[b, L-1], ..., x[b, 0]`` followed by its
    padding (itself reversed). Applying it twice gives ``x`` back. Indices only, no host
    synchronisation.

    >>> x = torch.arange(4.0).reshape(1, 4, 1)
    >>> reverse_padded(x, torch.tensor([[True, True, True, False]]))[0, :, 0].tolist()
    [2.0, 1.0, 0.0, 3.0]
    """
    b, t = mask.shape
    lengths = mask.sum(dim=1, keepdim=True)  # (B, 1), on the device
    pos = torch.arange(t, device=x.device).expand(b, t)
    src = torch.where(pos < lengths, lengths - 1 - pos, t + lengths - 1 - pos)
    index = src.reshape(b, t, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)


def masked_batch_norm(bn: nn.BatchNorm1d, x: Tensor, keep: Tensor) -> Tensor:
    """``bn`` over the rows of ``x`` ``(N, C)`` where ``keep`` ``(N,)`` is True.

    In training mode (or without running statistics) this equals ``bn(x[keep])`` on the kept
    rows, including the running-statistics update (skipped when fewer than 2 rows are kept,
    where ``nn.BatchNorm1d`` would raise). Otherwise it is ``bn(x)`` on the kept rows: running
    statistics do not depend on the batch. The other rows are zeros in both modes, so that a
    later component that reads padded frames sees in evaluation what it was trained on.
    """
    if not bn.training and bn.track_running_stats:
        return bn(x) * rearrange(keep, "n -> n 1").to(x.dtype)
    xf = x if x.dtype == torch.float64 else x.float()  # statistics in at least float32
    w = rearrange(keep, "n -> n 1").to(xf.dtype)
    n = w.sum(dim=0)  # (1,), stays on the device
    mean = (xf * w).sum(dim=0) / n.clamp(min=1)
    var = ((xf - mean) ** 2 * w).sum(dim=0) / n.clamp(min=1)  # biased, as BatchNorm normalises
    y = (xf - mean) * torch.rsqrt(var + bn.eps)
    if bn.affine:
        y = y * bn.weight + bn.bias
    if bn.training and bn.track_running_stats:
        assert bn.running_mean is not None and bn.running_var is not None
        assert bn.num_batches_tracked is not None
        with torch.no_grad():
            update = n > 1
            bn.num_batches_tracked.add_(update.to(bn.num_batches_tracked.dtype).squeeze(0))
            if bn.momentum is None:  # cumulative moving average
                factor = 1.0 / bn.num_batches_tracked.clamp(min=1).to(mean.dtype)
            else:
                factor = torch.full_like(n, bn.momentum)
            unbiased = var * n / (n - 1).clamp(min=1)
            for stat, new in ((bn.running_mean, mean), (bn.running_var, unbiased)):
                blended = stat + factor * (new.to(stat.dtype) - stat)
                stat.copy_(torch.where(update, blended, stat))
    return (y * w).to(x.dtype)


def shifted_bilstm(lstm: nn.LSTM, seq: Tensor, mask: Tensor) -> Tensor:
    """A one-layer bidirectional ``lstm`` over ``seq`` ``(B, T, D)`` as if packed by lengths.

    Padded frames reach no valid frame in either direction and come out as zeros, as with
    ``pack_padded_sequence`` (which needs the lengths on the host), and it is faster than
    packing rows of unequal lengths on the CPU.

    The forward direction reads the rows as they are (padding at the end comes after every
    valid frame). The backward direction reads each row rotated so that its padding comes
    first (``left[b, i] = seq[b, (i - pad_b) mod T]``), hence after the valid frames in its
    reading order; its outputs are rotated back. Both run in one LSTM call over ``2B`` rows
    (the unused direction of each half is discarded).
    """
    if not (lstm.bidirectional and lstm.num_layers == 1 and lstm.batch_first):
        raise ValueError(
            "shifted_bilstm needs nn.LSTM(bidirectional=True, num_layers=1, batch_first=True); "
            f"got bidirectional={lstm.bidirectional}, num_layers={lstm.num_layers}, "
            f"batch_first={lstm.batch_first}"
        )
    b, t, _ = seq.shape
    hidden = lstm.hidden_size
    pad = t - mask.sum(dim=1)  # (B,) padded frames per row
    pos = torch.arange(t, device=seq.device)
    to_left = rearrange((pos[None] - pad[:, None]) % t, "b t -> b t 1")
    to_right = rearrange((pos[None] + pad[:, None]) % t, "b t -> b t 1")
    left = torch.gather(seq, 1, to_left.expand_as(seq))
    out, _ = run_lstm(lstm, torch.cat([seq, left]))  # (2B, T, 2H)
    fwd = out[:b, :, :hidden]
    bwd = torch.gather(out[b:, :, hidden:], 1, to_right.expand(b, t, hidden))
    h = torch.cat([fwd, bwd], dim=-1)
    return h * rearrange(mask, "b t -> b t 1").to(h.dtype)


#: Per autocast dtype: whether this CPU runs ``nn.LSTM`` under CPU autocast in that dtype.
_CPU_LSTM_RUNS_IN: dict[torch.dtype, bool] = {}


def _probe_cpu_lstm(dtype: torch.dtype) -> bool:
    lstm = nn.LSTM(2, 2, bidirectional=True, batch_first=True)
    x = torch.zeros(1, 2, 2, requires_grad=True)
    try:
        with torch.enable_grad(), torch.autocast("cpu", dtype=dtype):
            out, _ = lstm(x)
        out.float().sum().backward()
    except RuntimeError:  # oneDNN: "could not create a primitive descriptor ..."
        ok = False
    else:
        ok = True
    _CPU_LSTM_RUNS_IN[dtype] = ok
    return ok


def cpu_lstm_runs_in(dtype: torch.dtype) -> bool:
    """Whether ``nn.LSTM`` runs under ``torch.autocast("cpu", dtype)`` on this CPU.

    PyTorch hands a reduced-precision LSTM on the CPU to oneDNN, which has kernels for it on
    AVX-512 processors only; on an AVX2-only processor the call raises ``RuntimeError: could not
    create a primitive descriptor for the LSTM ...``. Probed once per process with a tiny LSTM.
    """
    known = _CPU_LSTM_RUNS_IN.get(dtype)
    if known is None:  # eager even inside torch.compile (disabling is applied here, not at
        # import: importing torch.compiler's machinery costs a second at every start)
        known = torch.compiler.disable(_probe_cpu_lstm)(dtype)
    return known


def _as_float(x: Tensor | PackedSequence) -> Tensor | PackedSequence:
    return x._replace(data=x.data.float()) if isinstance(x, PackedSequence) else x.float()


def run_lstm(
    lstm: nn.LSTM,
    x: Tensor | PackedSequence,
    hx: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
    """``lstm(x, hx)`` under CPU autocast on every processor.

    Under ``torch.autocast("cpu", bfloat16)`` (``training.precision: bf16`` on the CPU) on a
    processor whose oneDNN has no reduced-precision LSTM kernel (see :func:`cpu_lstm_runs_in`),
    the LSTM runs in float32 with autocast off and its outputs are cast to the autocast dtype,
    as ``nn.LSTM`` returns them where the kernel exists. Anywhere else it is ``lstm(x, hx)``.
    """
    data = x.data if isinstance(x, PackedSequence) else x
    if data.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return lstm(x, hx)
    low = torch.get_autocast_dtype("cpu")
    if low == torch.float32 or cpu_lstm_runs_in(low):
        return lstm(x, hx)
    with torch.autocast("cpu", enabled=False):
        state = None if hx is None else (hx[0].float(), hx[1].float())
        out, (h, c) = lstm(_as_float(x), state)
    out = out._replace(data=out.data.to(low)) if isinstance(out, PackedSequence) else out.to(low)
    return out, (h.to(low), c.to(low))
