"""Detect operations that make the host wait for the accelerator (device-to-host syncs).

A training step that reads a tensor's value on the host (``.item()``, ``float(t)``,
``if t.any():``), asks for a data-dependent shape (``nonzero``, boolean indexing) or needs
lengths on the CPU (``pack_padded_sequence``) stalls the CPU until the GPU has caught up, so
the GPU idles while the next kernels are launched. The ops doing so are visible at the
dispatcher on any device, so :func:`host_syncs` finds them on the CPU too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "HostSyncRecorder", "host_syncs"]

#: aten op -> why it makes the host wait for the device.
SYNC_OPS: dict[str, str] = {
    "_local_scalar_dense": "reads a value on the host (.item(), float(), int(), bool(), if t:)",
    "is_nonzero": "reads a value on the host (bool(t))",
    "equal": "returns a Python bool (torch.equal)",
    "nonzero": "output shape depends on the data",
    "masked_select": "output shape depends on the data",
    "_unique": "output shape depends on the data",
    "_unique2": "output shape depends on the data",
    "unique_dim": "output shape depends on the data",
    "unique_consecutive": "output shape depends on the data",
    "_pack_padded_sequence": "needs the sequence lengths on the host",
}

_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _bool_index(args: tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _to_host(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """A copy from an accelerator tensor to the CPU."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    name = func.overloadpacket.__name__
    if name == "_to_copy":
        dev = kwargs.get("device")
        return dev is not None and torch.device(dev).type == "cpu"
    return False


class HostSyncRecorder(TorchDispatchMode):
    """Records ``(op, reason)`` for every dispatched op that forces a device-to-host sync."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.found.append((name, SYNC_OPS[name]))
        elif name in _INDEX_OPS and _bool_index(args):
            self.found.append((name, "boolean-mask indexing: output shape depends on the data"))
        elif _to_host(func, args, kwargs):
            self.found.append((name, "copies a device tensor to the host"))
        return func(*args, **kwargs)


def host_syncs(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn`` and return ``"op: reason"`` for each distinct op in it that forces a sync.

    Example:
        >>> import torch
        >>> host_syncs(lambda: torch.ones(3).sum().item())
        ['_local_scalar_dense: reads a value on the host (.item(), float(), int(), bool(), if t:)']
    """
    with HostSyncRecorder() as rec:
        fn()
    return list(dict.fromkeys(f"{op}: {why}" for op, why in rec.found))
