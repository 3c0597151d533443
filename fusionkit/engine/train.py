"""Training: windows, ``1 - CCC`` loss, Adam, plateau schedule on validation CCC, early
stopping, per-epoch resumable checkpoints, and the final ABAW-protocol evaluation.

One epoch, in order: train steps -> validation -> (if better) the best weights, journaled ->
the training state (the commit point) -> ``history.csv``. A kill at any moment leaves the run
resumable to the same numbers; a non-finite loss or prediction stops training with the epoch,
the step and (when it is the cause) the modality whose inputs were not finite.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fusionkit.core.errors import CheckpointError, TrainingError, one_line
from fusionkit.core.interfaces import NamedSteps
from fusionkit.core.params import first_few
from fusionkit.engine.checkpoint import (
    TrainState,
    load_state,
    load_weights,
    read_train_state,
    save_state,
    save_weights,
)
from fusionkit.engine.data import FrameStore
from fusionkit.engine.distributed import Dist
from fusionkit.engine.evaluate import (
    SplitPredictions,
    evaluate,
    evaluate_splits,
    no_labels_error,
)
from fusionkit.engine.files import (
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    save_tensors,
)
from fusionkit.engine.graphs import GraphedStep
from fusionkit.engine.metrics import ccc_loss
from fusionkit.engine.progress import TrainProgress, train_progress
from fusionkit.engine.runs import (
    BEST_FILE,
    BEST_NEXT,
    HISTORY_FILE,
    METRICS_FILE,
    NORMALIZATION_FILE,
    PREDICTIONS_DIR,
    STATE_FILE,
    RunDir,
    resume_command,
)
from fusionkit.engine.session import (
    Session,
    available_cores,
    check_cuda_graphs,
    feature_identity,
)

__all__ = [
    "Diverged",
    "ResumeRefused",
    "RunResult",
    "Trainer",
    "recover_best_weights",
    "restore_threads",
    "resumed_threads",
]


class ResumeRefused(CheckpointError):
    """Resuming would continue a run under other conditions than its finished epochs had
    (other data, another number of processes); the message says how to resume it as it was
    or to start a new run."""


class Diverged(TrainingError):
    """The loss or the validation predictions stopped being finite. Resuming repeats the same
    steps (resume is exact), so the way on is a new run with another recipe or other data."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, dict[str, Any]]
    best_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, SplitPredictions] = field(default_factory=dict)


def resumed_threads(run: RunDir | Path) -> int | None:
    """The CPU threads a resume of ``run`` without ``training.num_threads`` trains with: those
    of its first epoch, capped at the cores available now; ``None`` when it has no readable
    state that records them (a state that cannot be read is left to :meth:`Trainer.restore`
    to report)."""
    path = run / STATE_FILE
    if not path.is_file():
        return None
    try:
        threads = read_train_state(path).cpu_threads
    except CheckpointError:
        return None
    return None if threads is None else min(threads, available_cores())


def resumed_device(run: RunDir | Path, spec: str) -> str:
    """The device a resume of ``run`` asks for: ``spec`` (``training.device``), except that
    ``auto`` resumes on the device type its first epoch trained on (``cpu`` on a machine with
    CUDA too), so that one run never mixes CPU and CUDA epochs; a state that cannot be read is
    left to :meth:`Trainer.restore` to report."""
    path = run / STATE_FILE
    if spec != "auto" or not path.is_file():
        return spec
    try:
        recorded = read_train_state(path).device_type
    except CheckpointError:
        return spec
    if recorded is None or (recorded == "cuda" and not torch.cuda.is_available()):
        return spec  # Trainer.restore says where the run must resume
    return recorded


def restore_threads(run: RunDir) -> None:
    """Before resuming ``run`` on the CPU without ``training.num_threads``: use
    :func:`resumed_threads`, so that the resumed epochs compute what an uninterrupted run
    would."""
    threads = resumed_threads(run)
    if threads is not None:
        torch.set_num_threads(threads)


def recover_best_weights(run: RunDir, state: TrainState | None) -> None:
    """Finish or undo a best-weights write a kill interrupted, then check that
    ``model.safetensors`` is the file the training state names.

    New best weights are first written to ``model.next.safetensors``; the state that names
    them is the commit point; then they are renamed over ``model.safetensors``. So a leftover
    ``model.next`` is renamed when the state names it and deleted otherwise.

    Raises:
        CheckpointError: ``model.safetensors`` is missing or differs from the state's record,
            and cannot be restored.
    """
    nxt, best = run / BEST_NEXT, run / BEST_FILE
    want = state.best_weights_sha256 if state else None
    if nxt.is_file():
        if want is not None and file_sha256(nxt) == want:
            os.replace(nxt, best)
        else:
            nxt.unlink()
    if want is None:
        if best.is_file():
            why = (
                f"{run / STATE_FILE} is missing or not a regular file, so nothing records "
                "which epoch it holds"
                if state is None
                else "the training state records no best epoch"
            )
            raise CheckpointError(
                f"{best} exists but {why}; the run's files do not belong together: start a new run"
            )
        return
    if not best.is_file():
        raise CheckpointError(
            f"{best} is missing but the training state says epoch {state.best_epoch} wrote it; "
            "restore the file, or start a new run (resuming would save other weights as the best)"
        )
    if file_sha256(best) != want:
        raise CheckpointError(
            f"{best} is not the file saved at epoch {state.best_epoch} (its SHA-256 differs from "
            "the training state); restore it, or start a new run"
        )


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CUDA, the CPU allocator, Python)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


class Trainer:
    """Trains one session into one run directory.

    Args:
        session: recipe, dataset and model on their device.
        run: the run directory (locked by this process on rank 0).
        progress: where epochs are reported (default: nothing).
        dist: the torchrun job this process belongs to (default: a single process).
        on_epoch_end: optional callback ``(epoch, record)``, e.g. to interrupt in tests.
    """

    def __init__(
        self,
        session: Session,
        run: RunDir,
        progress: TrainProgress | None = None,
        dist: Dist | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.session = session
        self.recipe = session.recipe
        self.run = run
        self.model = session.model
        self.device = session.device
        self.bf16 = session.bf16
        #: how every epoch computes, as the training state and metrics.json record it
        self.precision: Literal["fp32", "bf16"] = "bf16" if self.bf16 else "fp32"
        self.targets = session.targets
        self.progress = progress or train_progress(None)
        self.dist = dist or Dist()
        self.on_epoch_end = on_epoch_end
        tr = self.recipe.training
        check_cuda_graphs(self.recipe, self.device, self.dist.world_size)
        self.graphs = tr.cuda_graphs
        self.optimizer = torch.optim.Adam(  # fused: one kernel for all parameters
            self.model.parameters(),
            lr=tr.lr,
            weight_decay=tr.weight_decay,
            fused=True,
            capturable=self.graphs,  # the step count stays on the device, as graphs need
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer,
            mode="max",
            factor=tr.plateau.factor,
            patience=tr.plateau.patience,
            min_lr=tr.plateau.min_lr,
            # a gain is a score strictly above the best, as for the best epoch and early
            # stopping (torch's default asks for 1e-4 of the best more: on negative CCC, less)
            threshold=0.0,
            threshold_mode="abs",
            eps=0.0,  # every decay down to min_lr (torch skips those under 1e-8 by default)
        )
        self.state = TrainState(
            recipe_sha256=self.recipe.training_sha256(),
            world_size=self.dist.world_size,
            device_type=self.device.type,
            precision=self.precision,
        )
        self._tb: Any = None  # TensorBoard writer, when training.loggers asks for it
        self._identity: dict[str, str] | None = None  # the dataset's FeatureIdentity
        if self.dist.rank > 0:  # same initial weights everywhere, own dropout stream per rank
            torch.manual_seed(self.dist.seed(tr.seed))

    # ------------------------------------------------------------------ state

    def _rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return self.dist.gather_rng(rng)  # collective under DDP: every rank calls it

    def _set_rng_state(self, rng: dict[str, torch.Tensor]) -> None:
        own = self.dist.own_rng(rng)
        try:  # every state fusionkit writes has one: without it the resume would not be exact
            torch.set_rng_state(own["cpu"])
            if "cuda" in own and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda"], self.device)
        except (KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"{self.run / STATE_FILE}: its random-number state is missing or damaged "
                f"({one_line(exc, pick='first')}); the run cannot resume exactly: start a new run"
            ) from None

    def restore(self) -> None:
        """Continue from the run's last committed epoch, after checking that its files agree
        with each other (see :func:`recover_best_weights`). A run with no finished epoch
        starts from scratch."""
        path = self.run / STATE_FILE
        if not path.is_file():
            self._recover(None)
            return
        state, rng = load_state(path, self.model, self.optimizer, self.scheduler)
        if state.recipe_sha256 != self.recipe.training_sha256():
            raise CheckpointError(
                f"{path} was written by a different recipe than {self.run}/recipe.yaml; the "
                "run's files do not belong together: start a new run"
            )
        have = state.world_size
        if have is not None and have != self.dist.world_size:
            raise ResumeRefused(
                f"{self.run} trains on {have} process(es) and this is "
                f"{self.dist.world_size}: every step would see another batch of windows. "
                f"Resume it as it was: {resume_command(self.run.path, have)}"
            )
        setup = (self.device.type, self.precision)
        if state.device_type is not None and (state.device_type, state.precision) != setup:
            raise ResumeRefused(
                f"{self.run}: its {state.epochs_done} finished epoch(s) trained on "
                f"{state.device_type} in {state.precision}, and this process would go on on "
                f"{setup[0]} in {setup[1]}: one run would mix two computations. Resume it "
                f"where it trained (training.device: auto resumes on {state.device_type} "
                "when this machine has it), or start a new run"
            )
        # a state of an older version does not say: recorded from now on
        state.world_size = self.dist.world_size
        state.device_type, state.precision = setup
        for group in self.optimizer.param_groups:  # loaded with the saved run's setting
            group["capturable"] = self.graphs
        self._recover(state)
        self.state = state
        self._set_rng_state(rng)

    def _recover(self, state: TrainState | None) -> None:
        """:func:`recover_best_weights` on rank 0 alone (it renames or deletes files), its
        verdict shared with the other processes, which go on only once it is done."""
        problem = None
        if self.dist.is_main:
            try:
                recover_best_weights(self.run, state)
            except CheckpointError as exc:
                problem = str(exc)
        problem = self.dist.broadcast(problem)
        if problem is not None:
            raise CheckpointError(problem)

    # ------------------------------------------------------------------ one epoch

    def backward_step(
        self, fwd: torch.nn.Module, store: FrameStore, windows: torch.Tensor
    ) -> torch.Tensor:
        """Gather ``windows`` of ``store``, forward, loss and backward (gradients clipped when
        ``training.grad_clip``); returns the detached loss. Nothing in it waits for the device:
        no tensor value is read on the host (``tests/test_train.py`` checks it)."""
        tr = self.recipe.training
        batch = store.batch(windows)
        # mask_padding=False (as released): padded frames count, with target 0
        loss_mask = batch.target_mask if tr.mask_padding else batch.target_mask | ~batch.mask
        # a CUDA graph must not capture autocast's cache of cast weights (freed on exit)
        with torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=not self.graphs
        ):
            out = fwd(batch.inputs, batch.mask)
        loss = ccc_loss(out.pred.float(), batch.targets, loss_mask)
        loss.backward()
        if tr.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        return loss.detach()

    def _step_fn(
        self, fwd: torch.nn.Module, train: FrameStore
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """One training step on a batch of windows (zero grads, :meth:`backward_step`, Adam);
        with ``training.cuda_graphs`` full batches replay a captured graph of it."""

        def step(windows: torch.Tensor) -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.backward_step(fwd, train, windows)
            self.optimizer.step()
            return loss

        if not self.graphs:
            return step
        return GraphedStep(
            step,
            self.recipe.training.batch_size,
            self.device,
            lambda: tuple(float(g["lr"]) for g in self.optimizer.param_groups),
        )

    def _train_epoch(
        self,
        step: Callable[[torch.Tensor], torch.Tensor],
        train: FrameStore,
        epoch: int,
        steps: int,
    ) -> float:
        """One pass over the training windows; returns the mean loss. Non-finite losses are
        tracked on the device and checked once, at the end of the epoch."""
        tr = self.recipe.training
        bs = tr.batch_size
        self.model.train()
        gen = torch.Generator().manual_seed(tr.seed * 1_000_003 + epoch - 1)
        perm = self.dist.shard(torch.randperm(train.num_windows, generator=gen))
        perm = perm.to(self.device)  # one copy per epoch, none per step
        loss_sum = torch.zeros((), device=self.device)
        first_bad = torch.full((), steps, device=self.device, dtype=torch.long)
        for i in range(steps):
            loss = step(perm[i * bs : (i + 1) * bs])
            first_bad = torch.where(
                torch.isfinite(loss) | (first_bad < steps), first_bad, torch.full_like(first_bad, i)
            )
            loss_sum += loss
            self.progress.step()
        # every process stops on the first non-finite step of any of them (averaged gradients
        # made every replica non-finite), with the message of the process that saw it
        bad, rank = self.dist.first_flagged(first_bad, steps)
        if bad < steps:
            why = None
            if rank == self.dist.rank:
                windows = perm[bad * bs : (bad + 1) * bs]
                why = self._non_finite(train, windows, epoch, bad + 1, steps)
            raise Diverged(self.dist.broadcast(why, src=rank))
        return float(self.dist.mean(loss_sum)) / steps

    def _non_finite(
        self, store: FrameStore, windows: torch.Tensor, epoch: int, step: int, steps: int
    ) -> str:
        """The message of a non-finite loss at ``step`` of ``epoch`` (on this process)."""
        batch = store.batch(windows)
        cause = next(
            (m for m, x in sorted(batch.inputs.items()) if not bool(torch.isfinite(x).all())),
            None,
        )
        why = (
            f"the {cause} inputs of that batch are not finite"
            if cause
            else "the inputs were finite, so the model diverged or produced NaN (lower "
            "training.lr, set training.grad_clip, or check the component)"
        )
        done = self.state.epochs_done
        kept = (
            f"the run keeps its last finished epoch ({done})" if done else "no epoch had finished"
        )
        d = self.dist
        where = f" (process {d.rank} of {d.world_size})" if d.enabled else ""
        return (
            f"training stopped: the loss is not finite at epoch {epoch}, step {step} of "
            f"{steps}{where}; {why}. Nothing of this epoch was saved; {kept}"
        )

    def _check_labels(self, train: FrameStore, val: FrameStore) -> None:
        """Refuse, before the first epoch, a split that training, model selection or the
        final evaluation needs labels of but that has not one labelled frame (its CCC would
        be NaN every epoch and a best epoch would be picked on nothing)."""
        rc = self.recipe
        for split, store, need in (
            (rc.data.train_split, train, "training needs labels: choose another data.train_split"),
            (rc.data.val_split, val, "model selection needs labels: choose another data.val_split"),
        ):
            if not bool(store.target_mask.any()):
                raise no_labels_error(f"split {split!r}", store.num_frames, len(store.names), need)
        scored: dict[str, str] = {}
        for split in rc.evaluation.splits:
            scored.setdefault(split, "evaluation.splits")
        for i, spec in enumerate(rc.evaluation.robustness):
            for split in spec.splits:
                scored.setdefault(split, f"evaluation.robustness.{i}.splits")
        scored.pop(rc.data.val_split, None)  # checked above
        for split, where in scored.items():
            videos = self.session.dataset.videos(split)
            if not any(bool(v.label_mask.bool().any()) for v in videos):
                raise no_labels_error(
                    f"split {split!r}",
                    sum(v.num_frames for v in videos),
                    len(videos),
                    f"it cannot be scored: remove it from {where} (per-frame predictions "
                    f"without labels: fusionkit predict RUN --split {split})",
                )

    def _check_same_data(self, train: FrameStore, val: FrameStore) -> None:
        """Record what the first epoch trains and selects on; refuse to resume onto other data
        (features re-extracted, labels edited, videos added), which would give numbers that
        belong to neither."""
        st = self.state
        if st.epochs_done > 0 and not st.data_sha256:
            return  # a state of an older version recorded nothing to compare with
        digests = {"train": train.content_sha256(), "val": val.content_sha256()}
        if st.epochs_done == 0:
            st.data_sha256 = digests
            return
        saved = st.data_sha256 or {}
        changed = [role for role, d in digests.items() if saved.get(role, d) != d]
        if changed:
            rc = self.recipe
            split = {"train": rc.data.train_split, "val": rc.data.val_split}
            which = " and the ".join(f"{r} split {split[r]!r}" for r in changed)
            raise ResumeRefused(
                f"{self.run}: the {which} differ from the data its {st.epochs_done} finished "
                "epoch(s) trained on (features, labels or videos changed since, or its "
                f"{NORMALIZATION_FILE}, which z-scores them); resuming would mix the two: "
                "restore the data and the run's files as they were, or start a new run"
            )

    def _check_threads(self) -> None:
        """Record the CPU threads of the first epoch; say so when a resumed run continues with
        another number, since its sums then round differently from an uninterrupted run's."""
        if self.device.type != "cpu":
            return
        st, now = self.state, torch.get_num_threads()
        if st.epochs_done == 0:
            st.cpu_threads = now
        elif st.cpu_threads is not None and st.cpu_threads != now:
            warnings.warn(
                f"{self.run}: its first {st.epochs_done} epoch(s) trained with {st.cpu_threads} "
                f"CPU thread(s) and it continues with {now}, so its numbers will differ slightly "
                "from an uninterrupted run's",
                stacklevel=3,
            )

    def _validate(self, val: FrameStore, epoch: int) -> dict[str, Any]:
        # each rank updated BatchNorm statistics on its own shard: evaluate rank 0's model
        # everywhere, so that all ranks agree on the schedule and early stopping
        self.dist.sync_buffers(self.model)
        metrics, preds = evaluate(
            self.model,
            val,
            self.targets,
            self.recipe.evaluation.batch_size,
            self.bf16,
            self.recipe.data.val_split,
        )
        if not bool(torch.isfinite(preds.pred).all()):
            raise Diverged(
                f"training stopped: the model's validation predictions are not finite after "
                f"epoch {epoch}; {self._divergence_cause(val)}"
            )
        return metrics

    def _divergence_cause(self, val: FrameStore) -> str:
        """What made predictions non-finite, as far as the model and data tell, and the fix."""
        state = [*self.model.named_parameters(), *self.model.named_buffers()]
        broken = [n for n, t in state if t.is_floating_point() and not bool(t.isfinite().all())]
        large = {m: float(x.abs().max()) for m, x in val.features.items() if x.numel()}
        extreme = [f"{m} {v:.1e}" for m, v in sorted(large.items()) if v > 1e6]
        if not broken:
            return "lower training.lr or set training.grad_clip"
        where = f"the model holds non-finite values ({first_few(broken)})"
        if extreme:
            return (
                f"{where}, and the validation features reach extreme values ({', '.join(extreme)}):"
                " scale the features (data.normalize: zscore) or fix those frames"
            )
        if all(n.endswith(("running_mean", "running_var")) for n in broken):
            return (
                f"{where}: running statistics, which an extreme input value overflows; check "
                "the scale of the training features (data.normalize: zscore) or fix the data"
            )
        return f"{where}; lower training.lr or set training.grad_clip"

    def _commit_epoch(self, epoch: int, record: dict[str, Any], score: float) -> bool:
        """Best weights (journaled), then the training state: the epoch's commit point."""
        st = self.state
        improved = st.best_val_ccc_mean is None or score > st.best_val_ccc_mean
        if improved:
            st.best_val_ccc_mean, st.best_epoch, st.bad_epochs = score, epoch, 0
        else:
            st.bad_epochs += 1
        st.history.append(record)
        st.train_seconds += record["seconds"]
        st.epochs_done = epoch
        # stopped: epochs were left to run (reaching the count on the last one stops nothing)
        tr = self.recipe.training
        st.stopped_early = st.bad_epochs >= tr.early_stopping and epoch < tr.epochs
        rng = self._rng_state()
        if self.dist.is_main:
            if improved:
                meta = {"epoch": epoch, "val_ccc_mean": score, "recipe_sha256": st.recipe_sha256}
                save_weights(self.run / BEST_NEXT, self.model, meta)
                st.best_weights_sha256 = file_sha256(self.run / BEST_NEXT)
            save_state(self.run / STATE_FILE, self.model, self.optimizer, self.scheduler, st, rng)
            if improved:
                os.replace(self.run / BEST_NEXT, self.run / BEST_FILE)
            self._write_history()
        self.dist.barrier()
        return improved

    def _log_tensorboard(self, record: dict[str, Any]) -> None:
        """One point per scalar of the epoch record in ``<run>/tensorboard`` (rank 0)."""
        if "tensorboard" not in self.recipe.training.loggers or not self.dist.is_main:
            return
        if self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError(
                    "training.loggers: tensorboard needs the tensorboard package: "
                    "pip install 'fusionkit[tensorboard]' (or remove it from the recipe)"
                ) from None
            self._tb = SummaryWriter(str(self.run / "tensorboard"))
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, record["epoch"])
        self._tb.flush()

    def _write_history(self) -> None:
        """Rewrite ``history.csv`` from the committed state, one row per finished epoch
        (atomic; a kill between the state and this file is repaired by the next epoch or by
        :meth:`finish`)."""
        if not self.state.history:
            return
        buf = io.StringIO()
        cols = list(self.state.history[0])
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for rec in self.state.history:
            writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
        atomic_write_text(self.run / HISTORY_FILE, buf.getvalue())

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> RunResult:
        """Train until ``training.epochs`` or early stopping, then :meth:`finish`."""
        rc, tr = self.recipe, self.recipe.training
        if resume:
            self.restore()
        if resume and self.state.epochs_done > 0:
            self.session.load_normalizer(self.run)  # the statistics the run started with
        else:
            self.session.fit_normalizer()
            if self.dist.is_main:
                self.session.save_normalizer(self.run)
        train = self.session.store(rc.data.train_split, self.session.train_dataset)
        val = self.session.store(rc.data.val_split)
        self._check_labels(train, val)
        self._check_same_data(train, val)
        # read before the first epoch: a dataset plugin failing at it fails before the work
        self._identity = feature_identity(self.session.dataset)
        self._check_threads()
        bs = tr.batch_size
        steps = math.ceil(self.dist.windows_per_rank(train.num_windows) / bs)
        fwd = self.dist.wrap(self.model, self.device)
        if tr.compile:  # the weights stay those of `model`: checkpoints are unaffected
            fwd = torch.compile(fwd, mode=tr.compile_mode)
        step = self._step_fn(fwd, train)
        st = self.state
        self.progress.start(tr.epochs, st.epochs_done, steps)
        try:
            while st.epochs_done < tr.epochs and not st.stopped_early:
                epoch = st.epochs_done + 1
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]  # the epoch's, before the plateau step
                train_loss = self._train_epoch(step, train, epoch, steps)
                metrics = self._validate(val, epoch)
                score = metrics["ccc_mean"]
                self.scheduler.step(score)
                record = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_ccc_mean": score,
                    **{f"val_ccc_{t}": metrics[f"ccc_{t}"] for t in self.targets},
                    "lr": lr,
                    "seconds": time.perf_counter() - t0,
                }
                improved = self._commit_epoch(epoch, record, score)
                self._log_tensorboard(record)
                self.progress.epoch(record, improved)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, record)
        except (RuntimeError, MemoryError) as exc:
            if not _out_of_memory(exc):
                raise
            raise TrainingError(
                f"out of memory on {self.device} at epoch {st.epochs_done + 1} "
                f"({one_line(exc, pick='first', limit=160)}): a training step holds "
                f"training.batch_size={tr.batch_size} windows of data.window={rc.data.window} "
                f"frames (evaluation: evaluation.batch_size={rc.evaluation.batch_size}); "
                "lower them, or use a device with more memory"
            ) from None
        finally:
            self.progress.close()
            if self._tb is not None:
                self._tb.close()
        self.dist.barrier()
        return self.finish()

    # ------------------------------------------------------------------ the end

    def finish(self) -> RunResult:
        """Reload the best weights, evaluate every split of the recipe, write predictions,
        then ``metrics.json``, then mark the run complete (in that order: a run is complete
        only when everything it writes is)."""
        st = self.state
        if st.best_epoch is None:
            raise TrainingError(
                f"{self.run}: no epoch finished (training.epochs={self.recipe.training.epochs}); "
                "there are no weights to evaluate"
            )
        load_weights(self.run / BEST_FILE, self.model)
        results, preds, stores = evaluate_splits(
            self.session,
            list(self.recipe.evaluation.splits),
            f"the best weights (epoch {st.best_epoch})",
        )
        out = RunResult(self.run.path, results, st.best_epoch, st.history, preds)
        if not self.dist.is_main:  # rank 0 writes the run directory
            return out
        written = []
        if self.recipe.evaluation.save_predictions:
            written += self.save_predictions(preds, stores)
        self._write_history()
        payload = {
            "run": self.recipe.run_name,
            "best_epoch": st.best_epoch,
            "epochs_run": st.epochs_done,
            "stopped_early": st.stopped_early,
            "best_val_ccc_mean": st.best_val_ccc_mean,
            "train_seconds": st.train_seconds,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "precision": self.precision,
            "compile": self.recipe.training.compile,
            "cuda_graphs": self.graphs,
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "world_size": self.dist.world_size,
            "recipe_sha256": st.recipe_sha256,
            "splits": results,
            "history": st.history,
            "data_fingerprints": {split: store.fingerprint() for split, store in stores.items()},
            # what `fusionkit robustness` and `eval` check the features they read against
            "features_sha256": {split: self.session.data_hashes(split)[0] for split in stores},
            # the data the weights were trained and selected on (reports never pool seeds of
            # other training data into one row)
            "trained_on": {
                "train": self._data_record(self.recipe.data.train_split),
                "val": self._data_record(self.recipe.data.val_split),
            },
        }
        if self._identity is not None:  # what reloading the run checks the data by
            payload["feature_identity"] = self._identity
        atomic_write_json(self.run / METRICS_FILE, payload)
        if self.session.normalizer is not None:
            written.append(NORMALIZATION_FILE)
        self.run.mark_complete([METRICS_FILE, BEST_FILE, *written])
        return out

    def _data_record(self, split: str) -> dict[str, str]:
        """What ``metrics.json`` says of a split the run trained or selected on."""
        features, labels = self.session.data_hashes(split)
        return {"split": split, "features_sha256": features, "labels_fingerprint": labels}

    def save_predictions(
        self, preds: dict[str, SplitPredictions], stores: dict[str, FrameStore]
    ) -> list[str]:
        names = []
        for split, p in preds.items():
            store = stores[split]
            tensors: dict[str, torch.Tensor] = {}
            for i, name in enumerate(store.names):
                sl = store.video_slice(i)
                tensors[f"pred/{name}"] = p.pred[sl]
                tensors[f"target/{name}"] = store.targets[sl].cpu()
                tensors[f"label_mask/{name}"] = store.target_mask[sl].cpu().to(torch.uint8)
                for s, w in p.gate_weights.items():
                    tensors[f"gate/{s}/{name}"] = w[sl]
                for f, on in store.flags.items():
                    if bool(on[sl].any()):
                        tensors[f"flag/{f}/{name}"] = on[sl].to(torch.uint8)
            meta = {
                "targets": json.dumps(list(self.targets)),
                "videos": json.dumps(store.names),
                "data_fingerprint": store.fingerprint(),
            }
            fusion = self.model.fusion
            if isinstance(fusion, NamedSteps):
                meta["step_names"] = json.dumps([str(n) for n in fusion.step_names])
            rel = f"{PREDICTIONS_DIR}/{split}.safetensors"
            save_tensors(self.run / rel, tensors, meta)
            names.append(rel)
        return names
