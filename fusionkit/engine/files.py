"""Files fusionkit writes and reads: atomic replacement, safetensors, bounded JSON.

Every write goes to a temporary file beside the target and is renamed over it only when it
is complete and flushed, so a crash, a kill or a full disk leaves the previous file intact.
Failures become one :class:`~fusionkit.core.errors.CheckpointError` naming the file. JSON is
always valid JSON: a float that is not finite is written as ``null``. Nothing here unpickles.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
from pydantic import BaseModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fusionkit.core.errors import CheckpointError, one_line
from fusionkit.core.params import first_few

M = TypeVar("M", bound=BaseModel)

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cast_like",
    "clean_temp_files",
    "file_sha256",
    "finite_json",
    "load_tensors",
    "new_temp_folder",
    "parse_record",
    "read_json",
    "save_tensors",
    "state_dict_mismatch",
    "tensor_shapes",
    "tensors_metadata",
    "write_flushed",
]

#: Largest JSON file read back (metrics, grid records, manifests).
MAX_JSON_BYTES = 64 << 20
_TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` with the permissions a plain ``open`` would give
    (``mkstemp`` makes it 0600, which would leave reports unreadable to others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def _write_failed(path: Path, exc: BaseException) -> CheckpointError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return CheckpointError(
        f"could not write {path}: {why}; the previous version of the file (if any) is intact "
        "(free disk space or fix permissions, then run the command again)"
    )


def _atomic_replace(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    try:
        fd, tmp = _temp_beside(path)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_failed(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_temp_folder(beside: Path) -> Path:
    """A new empty folder next to ``beside`` (its name starts with ``.`` and ends in ``.tmp``)
    with the permissions a plain ``mkdir`` would give it (``mkdtemp`` makes it 0700)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{beside.name}.", suffix=_TMP_SUFFIX, dir=beside.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def write_flushed(path: Path, data: bytes) -> None:
    """Write a new file and flush it to disk (for files of a temporary folder that is renamed
    into place whole; :func:`atomic_write_bytes` replaces a single file)."""
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: never half-written."""
    _atomic_replace(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically; non-finite floats become ``null``."""
    text = json.dumps(finite_json(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file (at most 64 MiB); any problem is a :class:`CheckpointError` naming it."""
    p = Path(path)
    if not p.is_file():
        kind = "a folder" if p.is_dir() else "missing"
        raise CheckpointError(f"{what} {p} is {kind}")
    if p.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} {p} is larger than {MAX_JSON_BYTES >> 20} MiB")
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{what} {p} is not valid JSON ({one_line(exc)})") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {p} cannot be read ({exc.strerror or exc})") from None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Write tensors and string metadata as one safetensors file, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        fd, tmp = _temp_beside(path)
        os.close(fd)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    try:
        if _utf8_path(Path(tmp)):
            save_file(tensors, tmp, metadata=meta)
        else:  # the library takes UTF-8 paths only: write its bytes ourselves
            from safetensors.torch import save

            Path(tmp).write_bytes(save(tensors, metadata=meta))
        os.chmod(tmp, 0o666 & ~_umask())  # save_file recreates the file with its own mode
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_failed(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unreadable(path: Path, exc: BaseException | str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable safetensors file ({exc}); it may be truncated or written by "
        "another program"
    )


def _utf8_path(path: Path) -> bool:
    """Whether ``path`` can be handed to the safetensors library, which takes UTF-8 strings
    only (a name made of other bytes is read through Python's own file reading instead)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Largest safetensors header read (the library's own limit).
_MAX_HEADER_BYTES = 100_000_000


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read with Python's file reading."""
    import struct

    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _unreadable(path, "shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES:
                raise _unreadable(path, f"header of {n} bytes")
            raw = fh.read(n)
        header = json.loads(raw.decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested too deep
        raise _unreadable(path, f"header is not JSON: {one_line(exc)}") from None
    if not isinstance(header, dict):
        raise _unreadable(path, "header is not a JSON object")
    return header


def tensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without reading its tensors."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} is {'a folder' if p.is_dir() else 'missing'}")
    if not _utf8_path(p):
        meta = _read_header(p).get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _unreadable(p, "its metadata is not a map of strings")
        return dict(meta)
    try:
        with safe_open(str(p), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise _unreadable(p, exc) from None


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, from its header alone (no tensor
    is read)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p} is {'a folder' if p.is_dir() else 'missing'}")
    header = _read_header(p)
    shapes = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _unreadable(p, f"tensor {key!r} has no valid shape in the header")
        shapes[key] = tuple(shape)
    return shapes


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; problems name the file."""
    p = Path(path)
    meta = tensors_metadata(p)
    try:
        if not _utf8_path(p):
            from safetensors.torch import load

            return load(p.read_bytes()), meta
        return load_file(str(p)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(p, exc) from None


def json_metadata(meta: dict[str, str], key: str, path: Path) -> Any:
    """Parse one JSON value of a safetensors file's metadata; problems name file and key."""
    if key not in meta:
        raise CheckpointError(f"{path} has no {key!r} metadata; it was not written by fusionkit")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as exc:  # not JSON, or nested too deep
        raise CheckpointError(
            f"{path}: metadata {key!r} is not valid JSON ({one_line(exc)})"
        ) from None


def parse_record(model: type[M], raw: Any, path: Path, what: str) -> M:
    """``raw`` (read from ``path``) validated as ``model``; a problem names the file, the first
    wrong key and what the file is."""
    from pydantic import ValidationError

    from fusionkit.core.params import describe_validation_error

    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = describe_validation_error(exc, model)[0]
        raise CheckpointError(f"{path}: not a valid {what} ({first})") from None


def clean_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted atomic write left in ``folder`` (and its
    sub-folders one level down); returns what was removed."""
    root = Path(folder)
    removed = []
    for pattern in (f".*{_TMP_SUFFIX}", f"*/.*{_TMP_SUFFIX}"):
        for p in root.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def non_finite_tensor(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """``"'name' (k of n values are NaN or infinite)"`` for the first floating-point tensor
    holding a NaN or an infinity, else ``None`` (weights that would make every output NaN)."""
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not t.is_meta:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"{key!r} ({bad} of {t.numel()} values are NaN or infinite)"
    return None


def cast_like(
    own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``loaded`` (keys and shapes as ``own``'s) in the dtypes of a module's ``own`` state
    dict, e.g. a float64 checkpoint as the module's float32, so that what is checked is what
    the module will hold.

    Raises:
        ValueError: a tensor of another kind than the module's (integers or booleans where it
            holds floats, fractions where it holds integers, complex against real), or values
            beyond the module dtype's range (they would become infinite).
    """

    def name(t: torch.Tensor) -> str:
        return str(t.dtype).removeprefix("torch.")

    kinds = [
        f"{k!r} ({name(v)} in the file, {name(own[k])} in the module)"
        for k, v in loaded.items()
        if (own[k].is_floating_point() and not v.is_floating_point())
        or (v.is_complex() != own[k].is_complex())
        or (
            not own[k].is_floating_point()
            and v.is_floating_point()
            and not bool((v == v.round()).all())
        )
    ]
    if kinds:
        raise ValueError(
            f"tensors of another kind than the module holds: {first_few(kinds, sep='; ')}"
        )
    out = {}
    for k, v in loaded.items():
        dtype = own[k].dtype
        if v.is_floating_point() and not bool(v.isfinite().all()):
            raise ValueError(f"tensor {k!r} holds NaN or infinite values")
        if v.dtype != dtype and v.numel() and not dtype.is_floating_point and dtype != torch.bool:
            info = torch.iinfo(dtype)  # an integer beyond the module's would wrap around
            if float(v.min()) < info.min or float(v.max()) > info.max:
                raise ValueError(
                    f"tensor {k!r} holds values from {float(v.min()):.6g} to "
                    f"{float(v.max()):.6g}, beyond {name(own[k])}'s range"
                )
        out[k] = v if v.dtype == dtype else v.to(dtype)
        if out[k].is_floating_point() and not bool(out[k].isfinite().all()):
            raise ValueError(
                f"tensor {k!r} holds {name(v)} values beyond {name(own[k])}'s range (largest "
                f"|x| {float(v.abs().max()):.3g}), which become infinite in the module's "
                f"{name(own[k])}"
            )
    return out


def state_dict_mismatch(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> str:
    """Describe how ``loaded`` differs from a module's ``own`` state dict ("" if it fits):
    missing and unexpected keys and shape mismatches, a few of each."""

    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    shapes = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(loaded))
        if tuple(loaded[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {first_few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {first_few(unexpected)}")
    if shapes:
        parts.append("shape mismatch " + first_few(shapes, sep="; "))
    return ", ".join(parts)
