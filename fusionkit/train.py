"""Training loop: windows, ``1 - CCC`` loss, Adam, plateau schedule on validation CCC, early
stopping, per-epoch resumable checkpoints, and final ABAW-protocol evaluation."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fusionkit.checkpoint import (
    atomic_write_json,
    load_state,
    load_weights,
    save_state,
    save_tensors,
    save_weights,
)
from fusionkit.data import FrameStore
from fusionkit.distributed import barrier, init_from_env
from fusionkit.errors import DataError, RecipeError
from fusionkit.evaluate import SplitPredictions, evaluate
from fusionkit.interfaces import Dataset
from fusionkit.metrics import ccc_loss
from fusionkit.model import FusionModel, build_model
from fusionkit.recipe import Recipe
from fusionkit.registry import Registry, get_registry

__all__ = ["RunResult", "Trainer", "build_dataset", "resolve_device"]

STATE_FILE = "state.safetensors"
BEST_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise RecipeError(["training.device: 'cuda' requested but no CUDA device is available"])
    return torch.device(spec)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def build_dataset(recipe: Recipe, registry: Registry | None = None) -> Dataset:
    registry = registry or get_registry()
    comp = registry.get("dataset", recipe.data.name)
    return comp.build(comp.params.model_validate(recipe.data.params))


def target_columns(recipe: Recipe, dataset: Dataset) -> list[int]:
    cols = []
    for t in recipe.model.targets:
        if t not in dataset.targets:
            raise RecipeError(
                [
                    f"model.targets: {t!r} is not a label of dataset {recipe.data.name!r} "
                    f"(labels: {', '.join(dataset.targets)})"
                ]
            )
        cols.append(dataset.targets.index(t))
    return cols


def make_store(recipe: Recipe, dataset: Dataset, split: str, device: torch.device) -> FrameStore:
    if split not in dataset.splits():
        raise RecipeError(
            [
                f"split {split!r} is not provided by dataset {recipe.data.name!r} "
                f"(splits: {', '.join(dataset.splits())})"
            ]
        )
    videos = dataset.videos(split)
    if not videos:
        raise DataError(f"dataset {recipe.data.name!r} split {split!r} has no videos")
    return FrameStore(
        videos,
        sorted(recipe.model.encoders),
        target_columns(recipe, dataset),
        recipe.data.window,
        recipe.data.hop,
        device,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, dict[str, float]]
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    predictions: dict[str, SplitPredictions] = field(default_factory=dict)


class Trainer:
    """Trains one recipe into one run directory.

    Args:
        recipe: a validated recipe.
        run_dir: where ``state.safetensors``, ``model.safetensors`` and ``metrics.json`` go.
        console: rich console for progress and tables (``None``: quiet).
        on_epoch_end: optional callback ``(epoch, record)``, e.g. to interrupt in tests.
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        console: Console | None = None,
        registry: Registry | None = None,
        on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.console = console
        self.registry = registry or get_registry()
        self.on_epoch_end = on_epoch_end
        self._stores: dict[str, FrameStore] = {}  # evaluated splits, for save_predictions
        tr = recipe.training
        if tr.num_threads:
            torch.set_num_threads(tr.num_threads)
        self.device = resolve_device(tr.device)
        self.dist = init_from_env(self.device.type)  # torchrun: one process per device
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.bf16 = use_bf16(tr.precision, self.device)
        self.dataset = build_dataset(recipe, self.registry)
        if tr.perturbations:  # training-time perturbations: the train split only
            from fusionkit.perturb import PerturbedDataset, build_perturbation

            perts = [
                build_perturbation(p.name, p.params, p.seed, self.registry)
                for p in tr.perturbations
            ]
            self.dataset = PerturbedDataset(self.dataset, perts, [recipe.data.train_split])
        self.targets = tuple(recipe.model.targets)
        target_columns(recipe, self.dataset)  # fail before any work on an unknown target
        torch.manual_seed(tr.seed)
        self.model: FusionModel = build_model(recipe, self.dataset.feature_dims, self.registry)
        self.model.to(self.device)
        if self.dist.rank > 0:  # same initial weights everywhere, own dropout stream per rank
            torch.manual_seed(tr.seed + 7919 * self.dist.rank)

    def _log(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        """RNG state of this process, or of every process (keys suffixed by rank) under DDP."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.dist.enabled:
            return rng
        gathered: list[Any] = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, {k: v.cpu() for k, v in rng.items()})
        return {f"{k}.{r}": v for r, states in enumerate(gathered) for k, v in states.items()}

    def _set_rng_state(self, rng: dict[str, torch.Tensor]) -> None:
        suffix = f".{self.dist.rank}" if f"cpu.{self.dist.rank}" in rng else ""
        if "cpu" + suffix in rng:
            torch.set_rng_state(rng["cpu" + suffix])
        if "cuda" + suffix in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda" + suffix], self.device)

    def fit(self, resume: bool = False) -> RunResult:
        rc, tr = self.recipe, self.recipe.training
        train = make_store(rc, self.dataset, rc.data.train_split, self.device)
        val = make_store(rc, self.dataset, rc.data.val_split, self.device)
        model = self.model
        opt = torch.optim.Adam(model.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt,
            mode="max",
            factor=tr.plateau.factor,
            patience=tr.plateau.patience,
            min_lr=tr.plateau.min_lr,
        )
        state: dict[str, Any] = {
            "epoch": 0,
            "best_ccc": -math.inf,
            "best_epoch": -1,
            "bad_epochs": 0,
            "history": [],
            "stopped_early": False,
            "train_seconds": 0.0,
        }
        state_path = self.run_dir / STATE_FILE
        if resume and state_path.is_file():
            extra, rng = load_state(state_path, model, opt)
            sched.load_state_dict(extra["scheduler"])
            state = extra["trainer"]
            self._set_rng_state(rng)
            self._log(f"[cyan]resuming[/] {self.run_dir} after epoch {state['epoch']}")
        elif resume:
            self._log(f"[yellow]no checkpoint in {self.run_dir}; starting from scratch[/]")

        n_win = train.num_windows
        bs = tr.batch_size
        world, rank = self.dist.world_size, self.dist.rank
        # Under DDP each process takes every world-th window of the epoch's permutation
        # (padded by wrapping so that all processes run the same number of steps).
        per_rank = math.ceil(n_win / world)
        steps = math.ceil(per_rank / bs)
        fwd: torch.nn.Module = model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            fwd = DistributedDataParallel(model, device_ids=ids)
        if tr.compile:  # the weights stay those of `model`: checkpoints are unaffected
            fwd = torch.compile(fwd, mode=tr.compile_mode)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=self.console is None,
            transient=False,
        )
        with progress:
            ep_task = progress.add_task(
                "epochs", total=tr.epochs, completed=state["epoch"], info=""
            )
            step_task = progress.add_task("steps", total=steps, info="")
            while state["epoch"] < tr.epochs and not state["stopped_early"]:
                epoch = state["epoch"]
                t0 = time.perf_counter()
                model.train()
                gen = torch.Generator().manual_seed(tr.seed * 1_000_003 + epoch)
                perm = torch.randperm(n_win, generator=gen)
                if world > 1:
                    perm = torch.cat([perm, perm[: per_rank * world - n_win]])[rank::world]
                perm = perm.to(self.device)  # one copy per epoch, none per step
                loss_sum = torch.zeros((), device=self.device)
                progress.reset(step_task, total=steps)
                for i in range(steps):
                    opt.zero_grad(set_to_none=True)
                    loss_sum += self.backward_step(fwd, train, perm[i * bs : (i + 1) * bs])
                    opt.step()
                    progress.advance(step_task)
                if world > 1:
                    torch.distributed.all_reduce(loss_sum)
                    loss_sum /= world
                train_loss = float(loss_sum) / steps
                metrics, _ = evaluate(model, val, self.targets, rc.evaluation.batch_size, self.bf16)
                score = metrics["ccc_mean"]
                if not math.isfinite(score):
                    score = -1.0
                sched.step(score)
                improved = score > state["best_ccc"]
                if improved:
                    state.update(best_ccc=score, best_epoch=epoch, bad_epochs=0)
                if improved and self.dist.is_main:
                    save_weights(
                        self.run_dir / BEST_FILE, model, {"epoch": epoch, "val_ccc_mean": score}
                    )
                if not improved:
                    state["bad_epochs"] += 1
                elapsed = time.perf_counter() - t0
                record = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_ccc_mean": metrics["ccc_mean"],
                    **{f"val_ccc_{t}": metrics[f"ccc_{t}"] for t in self.targets},
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": elapsed,
                }
                state["history"].append(record)
                state["train_seconds"] += elapsed
                state["epoch"] = epoch + 1
                if state["bad_epochs"] >= tr.early_stopping:
                    state["stopped_early"] = True
                rng = self._rng_state()  # collective under DDP: every rank calls it
                if self.dist.is_main:
                    save_state(
                        self.run_dir / STATE_FILE,
                        model,
                        opt,
                        {"scheduler": sched.state_dict(), "trainer": state},
                        rng,
                    )
                barrier(self.dist)
                progress.update(
                    ep_task,
                    advance=1,
                    info=f"loss {train_loss:.4f}  val CCC {metrics['ccc_mean']:.4f}"
                    f"{' *' if improved else ''}  lr {record['lr']:.1e}",
                )
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, record)
        if state["stopped_early"]:
            self._log(
                f"early stop after epoch {state['epoch'] - 1} (best epoch {state['best_epoch']})"
            )
        barrier(self.dist)
        return self.finish(state)

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
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = fwd(batch.inputs, batch.mask)
        loss = ccc_loss(out.pred.float(), batch.targets, loss_mask)
        loss.backward()
        if tr.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
        return loss.detach()

    def finish(self, state: dict[str, Any]) -> RunResult:
        """Reload the best weights and evaluate every split listed in the recipe."""
        best = self.run_dir / BEST_FILE
        if best.is_file():
            load_weights(best, self.model)
        elif self.dist.is_main:
            save_weights(best, self.model, {"epoch": -1})
        results, preds = self.evaluate_splits()
        if not self.dist.is_main:  # rank 0 writes the run directory
            return RunResult(self.run_dir, results, state["best_epoch"], state["history"], preds)
        payload = {
            "run": self.recipe.run_name,
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            "best_val_ccc_mean": state["best_ccc"] if math.isfinite(state["best_ccc"]) else None,
            "train_seconds": state["train_seconds"],
            "parameters": count_parameters(self.model),
            "device": str(self.device),
            "precision": "bf16" if self.bf16 else "fp32",
            "compile": self.recipe.training.compile,
            "splits": results,
            "history": state["history"],
        }
        atomic_write_json(self.run_dir / METRICS_FILE, payload)
        if self.recipe.evaluation.save_predictions:
            self.save_predictions(preds)
        if self.recipe.evaluation.robustness:  # perturbation sweeps on the best weights
            from fusionkit.robustness import run_recipe_robustness

            run_recipe_robustness(self.run_dir, trainer=self)
        return RunResult(self.run_dir, results, state["best_epoch"], state["history"], preds)

    def evaluate_splits(self) -> tuple[dict[str, dict[str, float]], dict[str, SplitPredictions]]:
        results, preds = {}, {}
        for split in self.recipe.evaluation.splits:
            store = make_store(self.recipe, self.dataset, split, self.device)
            m, p = evaluate(
                self.model, store, self.targets, self.recipe.evaluation.batch_size, self.bf16
            )
            results[split], preds[split] = m, p
            self._stores[split] = store
        return results, preds

    def save_predictions(self, preds: dict[str, SplitPredictions]) -> None:
        for split, p in preds.items():
            store = self._stores[split]
            tensors: dict[str, torch.Tensor] = {}
            for i, name in enumerate(store.names):
                sl = store.video_slice(i)
                tensors[f"pred/{name}"] = p.pred[sl]
                tensors[f"target/{name}"] = store.targets[sl].cpu()
                tensors[f"label_mask/{name}"] = store.target_mask[sl].cpu().to(torch.uint8)
                for s, w in p.gate_weights.items():
                    tensors[f"gate/{s}/{name}"] = w[sl]
            meta = {"targets": json.dumps(list(self.targets)), "videos": json.dumps(store.names)}
            save_tensors(self.run_dir / "predictions" / f"{split}.safetensors", tensors, meta)
