"""Detect operations that make the host wait for the accelerator (device-to-host syncs).

A training step that reads a tensor's value on the host (``.item()``, ``float(t)``,
``if t.any():``), asks for a data-dependent shape (``nonzero``, boolean indexing) or needs
lengths on the CPU (``pack_padded_sequence``) stalls the CPU until the GPU has caught up, so
the GPU idles while the next kernels are launched. Most ops doing so are visible at the
dispatcher on any device, so :func:`host_syncs` finds them on the CPU too.

Three reads are invisible on real CPU tensors, because no op is dispatched for them:
``.tolist()`` and ``.numpy()`` read the memory directly and ``.cpu()`` returns the tensor
itself. :func:`simulated_host_syncs` finds them by running a function on fake tensors (shapes
and devices only, no data), on a fake CUDA device (or a fake CPU): there ``.tolist()`` reads
values through an op, ``.numpy()`` raises and ``.cpu()`` is a copy from the device.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusionkit.core.errors import one_line

__all__ = ["SYNC_OPS", "HostSyncRecorder", "host_syncs", "simulated_host_syncs"]

#: aten op -> why it makes the host wait for the device.
SYNC_OPS: dict[str, str] = {
    "_local_scalar_dense": (
        "reads a value on the host (.item(), .tolist(), float(), int(), bool(), if t:)"
    ),
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


#: Why ``.numpy()`` is reported (seen only on fake tensors, where it raises).
NUMPY_REASON = "reads tensor values on the host (.numpy(), np.asarray(t))"


def _stand_in(x: Any) -> bool | int | float:
    """A Python scalar of ``x``'s dtype, for a value a fake tensor does not have."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
        return True
    if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
        return 1.0
    return 1


class HostSyncRecorder(TorchDispatchMode):
    """Records ``(op, reason)`` for every dispatched op that forces a device-to-host sync.

    Args:
        stand_in_scalars: answer a value read (``.item()``, ``.tolist()``) with 1 instead of
            dispatching it, so that a run on fake tensors (which have no values) goes on.
    """

    def __init__(self, *, stand_in_scalars: bool = False) -> None:
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self.stand_in_scalars = stand_in_scalars

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.found.append((name, SYNC_OPS[name]))
            if name == "_local_scalar_dense" and self.stand_in_scalars:
                return _stand_in(args[0] if args else None)
        elif name in _INDEX_OPS and _bool_index(args):
            self.found.append((name, "boolean-mask indexing: output shape depends on the data"))
        elif _to_host(func, args, kwargs):
            self.found.append((name, "copies a device tensor to the host"))
        return func(*args, **kwargs)


def host_syncs(fn: Callable[[], Any]) -> list[str]:
    """Run ``fn`` and return ``"op: reason"`` for each distinct op in it that forces a sync.

    Example:
        >>> import torch
        >>> host_syncs(lambda: torch.ones(3).sum().item())[0].split(" (")[0]
        '_local_scalar_dense: reads a value on the host'
        >>> host_syncs(lambda: torch.ones(3).tolist())  # no op on a CPU tensor: see below
        []
    """
    with HostSyncRecorder() as rec:
        fn()
    return list(dict.fromkeys(f"{op}: {why}" for op, why in rec.found))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence what fake-tensor runs log and warn about (failures there are expected)."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def simulated_host_syncs(
    fn: Callable[[str], Any],
    devices: tuple[str, ...] = ("cuda", "cpu"),
    *,
    ended_early: list[str] | None = None,
) -> list[str]:
    """Run ``fn(device)`` on fake tensors and list the syncs it forces, as :func:`host_syncs`
    does, plus the reads no op shows on real CPU tensors (``.tolist()``, ``.numpy()``, and
    ``.cpu()`` of a CUDA tensor).

    ``fn`` runs inside :class:`torch._subclasses.fake_tensor.FakeTensorMode`: tensors it
    creates or moves (``.to(device)``) are fake, and value reads return 1. Build modules
    before the call, one per device tried, and move them in ``fn``: the parameters of a
    module built under the fake mode cannot be moved (``.to`` fails) and the run would end
    before the forward pass. The devices are tried in order until one run gets to its end
    (a fake CUDA device needs no GPU, but not every op has a fake CUDA implementation); an
    op without a fake implementation ends that run early, keeping what was found until
    then; ``ended_early``, when given, gets one
    ``"device: error"`` line per such run. Backward passes do not run on fake CUDA tensors
    without a GPU, so ``fn`` should stick to the forward pass.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    found: list[tuple[str, str]] = []
    for device in devices:
        rec = HostSyncRecorder(stand_in_scalars=True)
        finished = False
        with _quiet(), FakeTensorMode(allow_non_fake_inputs=True):
            try:
                with rec:
                    fn(device)
                finished = True
            except Exception as exc:
                if ".numpy()" in str(exc):  # raised before any op is dispatched
                    rec.found.append(("numpy", NUMPY_REASON))
                    finished = True  # a finding, not a failure of the fake run
                elif ended_early is not None:
                    why = one_line(exc, pick="first")
                    ended_early.append(f"{device}: {type(exc).__name__}: {why}")
        found.extend(rec.found)
        if finished:
            break
    return list(dict.fromkeys(f"{op}: {why}" for op, why in found))
