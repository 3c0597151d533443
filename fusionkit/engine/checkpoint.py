"""The two checkpoint files of a run: the best weights and the resumable training state.

Both are safetensors files (no pickle). Everything that is not a tensor (the typed
:class:`TrainState`, the optimizer's scalars, the scheduler) is JSON in the file's metadata,
so one atomic rename commits a consistent checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from fusionkit.core.errors import CheckpointError
from fusionkit.engine.files import (
    json_metadata,
    load_tensors,
    parse_record,
    save_tensors,
    state_dict_mismatch,
)

__all__ = [
    "TrainState",
    "WeightsMismatch",
    "load_state",
    "load_weights",
    "save_state",
    "save_weights",
]


class WeightsMismatch(CheckpointError):
    """A readable weights file whose keys or shapes do not fit the model built for it."""


class TrainState(BaseModel):
    """Where training stands after the last finished epoch (epochs count from 1).

    Attributes:
        recipe_sha256: :meth:`~fusionkit.core.recipe.Recipe.training_sha256` of the recipe.
        epochs_done: finished epochs; the next one is ``epochs_done + 1``.
        best_epoch: the epoch whose weights are ``model.safetensors`` (``None`` before any).
        best_val_ccc_mean: its validation CCC-mean.
        best_weights_sha256: SHA-256 of that ``model.safetensors``: resume checks it.
        bad_epochs: epochs since the last improvement (early stopping).
        stopped_early: early stopping ended training.
        train_seconds: wall time of the finished epochs.
        history: one record per finished epoch (also in ``history.csv``).
        data_sha256: split role (``train``, ``val``) -> ``FrameStore.content_sha256`` of the
            data the first epoch trained on (``None`` in states of older versions).
        cpu_threads: torch CPU threads the first epoch trained with (``None`` on a GPU, and in
            states of older versions).
        world_size: processes the run trains on (``torchrun``; ``None`` in states of older
            versions): a resume under another number would change every step's batch.
        device_type: ``cpu`` or ``cuda``, where the first epoch trained (``None`` in states of
            older versions).
        precision: ``fp32`` or ``bf16``, how the first epoch trained (``None`` likewise): a
            resume on another device type or precision would mix two computations in one run.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    recipe_sha256: str
    epochs_done: int = Field(0, ge=0, le=100_000)  # training.epochs is at most 100,000
    best_epoch: int | None = Field(None, ge=1)
    best_val_ccc_mean: float | None = None
    best_weights_sha256: str | None = None
    bad_epochs: int = Field(0, ge=0)
    stopped_early: bool = False
    train_seconds: float = Field(0.0, ge=0.0)
    history: list[dict[str, Any]] = Field(default_factory=list)
    data_sha256: dict[str, str] | None = None
    cpu_threads: int | None = Field(None, ge=1)
    world_size: int | None = Field(None, ge=1)
    device_type: Literal["cpu", "cuda"] | None = None
    precision: Literal["fp32", "bf16"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainState:
        """A state whose parts disagree (edited, or not written by fusionkit) is refused: a
        resume from it would pick the wrong best epoch or count the wrong epochs."""
        if self.best_epoch is not None and self.best_epoch > self.epochs_done:
            raise ValueError(
                f"best_epoch {self.best_epoch} is after epochs_done {self.epochs_done}"
            )
        if len(self.history) > self.epochs_done:
            raise ValueError(
                f"history has {len(self.history)} epochs but epochs_done is {self.epochs_done}"
            )
        return self


def save_weights(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Save a model's state dict as safetensors (atomically)."""
    save_tensors(Path(path), model.state_dict(), {"fusionkit": json.dumps(meta or {})})


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Load safetensors weights into ``model`` strictly.

    Mismatches name the keys and shapes; unreadable files name the file.
    """
    p = Path(path)
    tensors, _ = load_tensors(p)
    _load_into(model, tensors, p)


def _load_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    problems = state_dict_mismatch(model.state_dict(), tensors)
    if problems:
        raise WeightsMismatch(
            f"{path} does not fit the model built from the run's recipe: {problems}"
        )
    model.load_state_dict(tensors, strict=True)


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
    scheduler: Any,
    state: TrainState,
    rng: dict[str, torch.Tensor],
) -> None:
    """Save everything needed to resume training bit for bit, in one atomic safetensors file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_info = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    meta = {
        "optimizer": json.dumps(opt_info),
        "scheduler": json.dumps(scheduler.state_dict()),
        "trainer": state.model_dump_json(),
    }
    save_tensors(Path(path), tensors, meta)


def read_train_state(path: str | Path) -> TrainState:
    """Only the :class:`TrainState` of a state file (no tensors loaded)."""
    from fusionkit.engine.files import tensors_metadata

    p = Path(path)
    return _parse_state(json_metadata(tensors_metadata(p), "trainer", p), p)


def _parse_state(raw: Any, path: Path) -> TrainState:
    if isinstance(raw, dict):
        raw = {"trainer": raw}  # so that a problem reads trainer.<key>
    return parse_record(_StateFile, raw, path, "training state; start a new run").trainer


class _StateFile(BaseModel):
    trainer: TrainState


def load_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore model, optimizer and scheduler from :func:`save_state`; returns
    ``(state, rng)``. Every problem is a :class:`CheckpointError` naming the file and key."""
    p = Path(path)
    tensors, meta = load_tensors(p)
    state = _parse_state(json_metadata(meta, "trainer", p), p)
    opt_info = json_metadata(meta, "optimizer", p)
    sched = json_metadata(meta, "scheduler", p)
    model_t = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    _load_into(model, model_t, p)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, opt_info))
        scheduler.load_state_dict(sched)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{p}: optimizer or scheduler state does not fit this model ({exc}); start a new run"
        ) from None
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return state, rng
