"""Training steps replayed from a CUDA graph (``training.cuda_graphs``).

Small fusion models leave a GPU idle most of a step: the host spends longer launching a few
hundred small kernels than the device spends running them. Capturing the whole step (batch
gather, forward, loss, backward, clipping, Adam) once and replaying it removes that launch
cost. The captured step reads its windows from one fixed buffer, so only full batches are
replayed; a smaller last batch runs eagerly. A graph bakes in the learning rate, so the step is
captured again whenever the rate changes (the plateau schedule). Every step, replayed or eager,
is a real training step on real windows, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from fusionkit.core.errors import TrainingError, one_line

#: one training step on a batch of window indices: zero grads, forward, backward, optimizer
#: step; returns the detached loss
Step = Callable[[Tensor], Tensor]
#: records ``fn`` as a graph without running it and returns the function that replays it
Capture = Callable[[Callable[[], object]], Callable[[], None]]
R = TypeVar("R")


def on_side_stream(fn: Callable[[], R], device: torch.device) -> R:
    """``fn()`` on a fresh CUDA side stream, ordered after and before the current stream's
    work, as the warm-up before a capture must run (on the CPU: just ``fn()``)."""
    if device.type != "cuda":
        return fn()
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        out = fn()
    main.wait_stream(side)
    return out


def cuda_capture(device: torch.device) -> Capture:
    """The :data:`Capture` of ``device``: ``torch.cuda.graph`` on a private memory pool."""

    def capture(fn: Callable[[], object]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph):
            fn()
        return graph.replay

    return capture


class GraphedStep:
    """Runs :data:`Step` s, replaying full batches from a captured graph.

    Args:
        step: one eager training step.
        batch_size: the windows of a full batch; other sizes run eagerly.
        device: where the windows buffer lives (the training device).
        lrs: the optimizer's current learning rates; a change triggers a new capture.
        warmup: eager steps before the first capture (run on a side stream, as capturing
            requires: it lets cuDNN, cuBLAS and the optimizer state initialise first).
        capture: how a graph is captured (default: CUDA's; tests pass a stand-in).
    """

    def __init__(
        self,
        step: Step,
        batch_size: int,
        device: torch.device,
        lrs: Callable[[], tuple[float, ...]],
        warmup: int = 3,
        capture: Capture | None = None,
    ) -> None:
        self.step = step
        self.lrs = lrs
        self.warmup = warmup
        self.device = device
        self.capture = capture or cuda_capture(device)
        self.windows = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.replay: Callable[[], None] | None = None
        self.loss: Tensor | None = None
        self.captured_lrs: tuple[float, ...] | None = None
        #: graphs captured so far (one, plus one per learning-rate change)
        self.captures = 0
        self._eager_full = 0

    def __call__(self, windows: Tensor) -> Tensor:
        if windows.shape != self.windows.shape:
            return self.step(windows)  # the smaller last batch of an epoch
        if self._eager_full < self.warmup:
            self._eager_full += 1
            return on_side_stream(lambda: self.step(windows), self.device)
        if self.replay is None or self.lrs() != self.captured_lrs:
            self._capture()
        assert self.replay is not None and self.loss is not None
        self.windows.copy_(windows)
        self.replay()
        return self.loss

    def _capture(self) -> None:
        self.replay = self.loss = None  # the old graph's memory goes back first

        def fn() -> Tensor:
            self.loss = self.step(self.windows)
            return self.loss

        try:
            self.replay = self.capture(fn)
        except RuntimeError as exc:  # e.g. a host read of a tensor value while capturing
            raise TrainingError(
                "training.cuda_graphs: the training step could not be captured as a CUDA "
                f"graph ({one_line(exc, pick='first')}); a component reads tensor values on "
                "the host or changes shapes with the data (`fusionkit plugins check` names "
                "such ops): set training.cuda_graphs to false"
            ) from exc
        self.captured_lrs = self.lrs()
        self.captures += 1
