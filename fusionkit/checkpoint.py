"""Run-directory I/O: atomic writes, safetensors weights, resumable training state.

Nothing here unpickles: weights and optimizer tensors live in safetensors files, everything
else in JSON (inside the safetensors header metadata for the training state, so that one
atomic rename commits a consistent checkpoint).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fusionkit.errors import CheckpointError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "load_state",
    "load_weights",
    "save_state",
    "save_weights",
    "state_dict_mismatch",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` with the permissions a plain ``open`` would give
    (``mkstemp`` makes it 0600, which would leave reports unreadable to others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    return fd, tmp


def _atomic_replace(path: Path, write) -> None:
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename: never half-written."""
    _atomic_replace(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # save_file recreates the file with its own mode
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or from "
            "another program: delete it and re-run, or point to the right run directory"
        ) from None


def save_weights(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Save a model's state dict as safetensors (atomically)."""
    save_tensors(Path(path), model.state_dict(), {"fusionkit": json.dumps(meta or {})})


def load_weights(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load safetensors weights into ``model`` strictly; mismatches name the keys and shapes."""
    tensors, meta = load_tensors(Path(path))
    _load_into(model, tensors, Path(path))
    return json.loads(meta.get("fusionkit", "{}"))


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    problems = state_dict_mismatch(model.state_dict(), tensors)
    if problems:
        raise CheckpointError(
            f"{path} does not fit the model built from the run's recipe: {problems}"
        )
    model.load_state_dict(tensors, strict=True)


def state_dict_mismatch(own: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> str:
    """Describe how ``loaded`` differs from a module's ``own`` state dict ("" if it fits):
    missing and unexpected keys and shape mismatches, a few of each."""

    def few(keys: list[str]) -> str:
        return f"{keys[:5]}{'...' if len(keys) > 5 else ''}"

    missing = sorted(set(own) - set(loaded))
    unexpected = sorted(set(loaded) - set(own))
    shapes = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(loaded))
        if tuple(loaded[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {few(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {few(unexpected)}")
    if shapes:
        parts.append("shape mismatch " + "; ".join(shapes[:5]))
    return ", ".join(parts)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if not name.startswith("optim."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for pid, vals in info["scalars"].items():
        state.setdefault(int(pid), {}).update(vals)
    return {"state": state, "param_groups": info["param_groups"]}


def save_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    rng: dict[str, torch.Tensor],
) -> None:
    """Save everything needed to resume training bit-for-bit, in one atomic safetensors file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_info = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    meta = {"optimizer": json.dumps(opt_info), "extra": json.dumps(extra)}
    save_tensors(Path(path), tensors, meta)


def load_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model and optimizer from :func:`save_state`; returns ``(extra, rng)``."""
    p = Path(path)
    tensors, meta = load_tensors(p)
    if "optimizer" not in meta or "extra" not in meta:
        raise CheckpointError(f"{p} is not a fusionkit training state (no optimizer metadata)")
    model_t = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    _load_into(model, model_t, p)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, json.loads(meta["optimizer"])))
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return json.loads(meta["extra"]), rng
