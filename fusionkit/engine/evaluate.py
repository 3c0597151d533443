"""ABAW-protocol evaluation: overlapping window predictions averaged per frame, then one CCC
over all labelled frames of all videos of a split."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fusionkit.core.errors import TrainingError
from fusionkit.engine.data import FrameStore
from fusionkit.engine.metrics import regression_metrics
from fusionkit.engine.model import FusionModel
from fusionkit.engine.session import Session

__all__ = [
    "SplitPredictions",
    "autocast",
    "evaluate",
    "evaluate_splits",
    "no_labels_error",
    "predict",
]


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast context on the given device, or a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@dataclass
class SplitPredictions:
    """Per-frame predictions of a split, aligned with the store's concatenated frames.

    Attributes:
        pred: ``(N, n_targets)`` averaged over the windows covering each frame.
        gate_weights: stream -> ``(N, S)`` averaged the same way.
    """

    pred: Tensor
    gate_weights: dict[str, Tensor]


@torch.no_grad()
def predict(
    model: FusionModel, store: FrameStore, batch_size: int, bf16: bool = False
) -> SplitPredictions:
    model.eval()
    device = store.device
    n = store.num_frames
    pred_sum: Tensor | None = None
    gate_sum: dict[str, Tensor] = {}
    count = torch.zeros(n, device=device)
    for lo in range(0, store.num_windows, batch_size):
        idx = torch.arange(lo, min(lo + batch_size, store.num_windows))
        batch = store.batch(idx)
        with autocast(device, bf16):
            out = model(batch.inputs, batch.mask)
        valid = batch.mask.reshape(-1)
        flat_idx = batch.frame_index.reshape(-1)[valid]
        p = out.pred.float().reshape(-1, out.pred.shape[-1])[valid]
        if pred_sum is None:
            pred_sum = torch.zeros(n, p.shape[-1], device=device)
        pred_sum.index_add_(0, flat_idx, p)
        count.index_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=count.dtype))
        for s, w in out.gate_weights.items():
            wf = w.float().reshape(-1, w.shape[-1])[valid]
            if s not in gate_sum:
                gate_sum[s] = torch.zeros(n, w.shape[-1], device=device)
            gate_sum[s].index_add_(0, flat_idx, wf)
    assert pred_sum is not None
    denom = count.clamp_min(1.0)[:, None]
    return SplitPredictions(
        pred=(pred_sum / denom).cpu(),
        gate_weights={s: (g / denom).cpu() for s, g in gate_sum.items()},
    )


def no_labels_error(what: str, frames: int, videos: int, need: str) -> TrainingError:
    """The error for a split that has frames but not one labelled frame: a metric of it
    would be NaN or, worse, a number made of nothing."""
    return TrainingError(
        f"{what} has no labelled frames (every label is masked: {frames} frames in {videos} "
        f"video(s)); {need}"
    )


def evaluate(
    model: FusionModel,
    store: FrameStore,
    targets: tuple[str, ...],
    batch_size: int,
    bf16: bool = False,
    split: str | None = None,
) -> tuple[dict[str, float], SplitPredictions]:
    """Metrics of one split (ABAW protocol) and its per-frame predictions.

    Raises:
        TrainingError: the split has no labelled frame, so there is nothing to score
            (:func:`predict` gives the predictions of such a split).
    """
    keep = store.target_mask.cpu()
    if not bool(keep.any()):
        raise no_labels_error(
            f"split {split!r}" if split is not None else store.where,
            store.num_frames,
            len(store.names),
            "no metric can be computed on it: evaluate a labelled split (per-frame predictions "
            "without labels: fusionkit predict RUN --split "
            f"{split if split is not None else 'SPLIT'})",
        )
    preds = predict(model, store, batch_size, bf16)
    metrics = regression_metrics(preds.pred[keep], store.targets.cpu()[keep], targets)
    return metrics, preds


def evaluate_splits(
    session: Session, splits: list[str], where: str = "the model"
) -> tuple[dict[str, dict[str, Any]], dict[str, SplitPredictions], dict[str, FrameStore]]:
    """Metrics, predictions and stores (whose ``fingerprint()`` identifies the data) of
    ``splits``.

    Raises:
        TrainingError: a split has no labelled frame, or the model predicts non-finite values
            (no metrics are made of either).
    """
    results: dict[str, dict[str, Any]] = {}
    preds: dict[str, SplitPredictions] = {}
    stores: dict[str, FrameStore] = {}
    rc = session.recipe
    for split in splits:
        store = session.store(split)
        m, p = evaluate(
            session.model, store, session.targets, rc.evaluation.batch_size, session.bf16, split
        )
        if not bool(torch.isfinite(p.pred).all()):
            raise TrainingError(
                f"{where} predicts non-finite values on split {split!r}; no metrics were made"
            )
        results[split], preds[split], stores[split] = m, p, store
    return results, preds, stores
