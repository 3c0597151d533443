"""training.cuda_graphs: which steps replay a captured graph, when it is captured again, where
the option is refused, and (on a GPU) that graphed training trains what eager training does."""

from __future__ import annotations

import json

import pytest
import torch

from fusionkit.core.errors import RecipeError, TrainingError
from fusionkit.core.recipe import training_sha256_of, training_view_of, validate_recipe
from fusionkit.engine.graphs import GraphedStep
from fusionkit.engine.runs import METRICS_FILE, RunDir
from fusionkit.engine.session import build_session, check_cuda_graphs, check_recipe
from fusionkit.engine.train import Trainer
from tests.conftest import tiny_recipe

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class FakeCapture:
    """Stands in for CUDA's capture: the step's Python runs once while capturing (as under
    ``torch.cuda.graph``, where no kernel executes); replay runs the captured step."""

    def __init__(self) -> None:
        self.captures = 0
        self.capturing = False

    def __call__(self, fn):
        self.captures += 1
        self.capturing = True
        fn()
        self.capturing = False
        return fn


def _recording_step(calls: list, cap: FakeCapture):
    def step(windows: torch.Tensor) -> torch.Tensor:
        if not cap.capturing:  # a real capture trains nothing
            calls.append(windows.tolist())
        return windows.sum().float()

    return step


def test_full_batches_replay_after_warmup_and_the_last_smaller_batch_runs_eagerly() -> None:
    calls: list = []
    lr = [1e-3]
    cap = FakeCapture()
    g = GraphedStep(
        _recording_step(calls, cap),
        3,
        torch.device("cpu"),
        lambda: tuple(lr),
        warmup=2,
        capture=cap,
    )
    batches = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])]
    losses = [float(g(b)) for b in batches]
    assert cap.captures == 1 and g.captures == 1
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # each step on its own windows, in order
    assert losses == [3.0, 12.0, 21.0]
    assert float(g(torch.tensor([9, 10, 11]))) == 30.0  # replayed: the buffer holds the windows
    assert float(g(torch.tensor([12, 13]))) == 25.0  # smaller: eager, no new capture
    assert calls[3:] == [[9, 10, 11], [12, 13]] and cap.captures == 1


def test_a_learning_rate_change_captures_the_step_again() -> None:
    """A graph bakes in the learning rate: after the plateau schedule lowers it, the next full
    batch is captured anew (else training would go on at the old rate)."""
    lr = [1e-3]
    cap = FakeCapture()
    g = GraphedStep(
        _recording_step([], cap), 2, torch.device("cpu"), lambda: tuple(lr), warmup=0, capture=cap
    )
    g(torch.tensor([0, 1]))
    g(torch.tensor([2, 3]))
    assert cap.captures == 1
    lr[0] = 3e-4
    g(torch.tensor([4, 5]))
    assert cap.captures == 2 and g.captured_lrs == (3e-4,)
    g(torch.tensor([6, 7]))
    assert cap.captures == 2


def test_a_step_that_cannot_be_captured_stops_with_the_key_and_the_fix() -> None:
    def refusing(fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    g = GraphedStep(
        _recording_step([], FakeCapture()), 2, torch.device("cpu"), lambda: (1e-3,), 0, refusing
    )
    with pytest.raises(TrainingError, match=r"training\.cuda_graphs: the training step") as exc:
        g(torch.tensor([0, 1]))
    msg = str(exc.value)
    assert "operation not permitted when stream is capturing" in msg and "\n" not in msg
    assert "set training.cuda_graphs to false" in msg


def test_the_trainer_through_graphed_steps_trains_what_eager_steps_train(
    tmp_path, registry, monkeypatch
) -> None:
    """The trainer's use of :class:`GraphedStep` (windows buffer, loss accounting, smaller last
    batches, a new capture per learning rate), on the CPU with a capture stand-in that, like a
    real capture, leaves weights and optimizer untouched: the same run as eager steps."""
    import copy

    import fusionkit.engine.graphs as graphs_mod

    made: list[GraphedStep] = []

    def stand_in(device):
        def capture(fn):
            tr = trainers[-1]
            saved = copy.deepcopy((tr.model.state_dict(), tr.optimizer.state_dict()))
            rng = torch.get_rng_state()
            fn()  # the Python runs; the state is put back: capturing trains nothing
            tr.model.load_state_dict(saved[0])
            tr.optimizer.load_state_dict(saved[1])
            torch.set_rng_state(rng)
            return fn

        return capture

    monkeypatch.setattr(graphs_mod, "cuda_capture", stand_in)
    real_step_fn = Trainer._step_fn

    def recording(self, fwd, train):
        fn = real_step_fn(self, fwd, train)
        if isinstance(fn, GraphedStep):
            made.append(fn)
        return fn

    monkeypatch.setattr(Trainer, "_step_fn", recording)
    trainers: list[Trainer] = []

    def fit(graphs: bool):
        raw = tiny_recipe(tmp_path / str(graphs), epochs=8, batch_size=5, seed=3, lr=0.03)
        raw["training"]["plateau"] = {"patience": 0, "factor": 0.5, "min_lr": 1e-6}
        rc = validate_recipe(raw, "tiny", registry)
        run = RunDir.create(rc, registry)
        tr = Trainer(build_session(rc, registry), run)
        tr.graphs = graphs  # on the CPU the recipe switch is refused; the step is what is tested
        trainers.append(tr)
        result = tr.fit()
        run.unlock()
        return result

    graphed, eager = fit(True), fit(False)
    assert len(made) == 1
    recorded = [json.loads((r.run_dir / METRICS_FILE).read_text()) for r in (graphed, eager)]
    assert [m["cuda_graphs"] for m in recorded] == [True, False]  # metrics.json says how
    lrs = {round(r["lr"], 12) for r in graphed.history}
    assert len(lrs) > 1  # the plateau schedule did lower the rate during the run
    assert made[0].captures == len(lrs)  # one capture per learning rate
    assert [r["train_loss"] for r in graphed.history] == pytest.approx(
        [r["train_loss"] for r in eager.history], rel=1e-6
    )
    for split in ("val", "test"):
        assert graphed.metrics[split] == pytest.approx(eager.metrics[split], rel=1e-6)


def test_cuda_graphs_and_compile_together_are_refused(tmp_path, registry) -> None:
    raw = tiny_recipe(tmp_path, cuda_graphs=True, compile=True)
    with pytest.raises(RecipeError, match=r"training\.cuda_graphs: .*compile_mode") as exc:
        validate_recipe(raw, "tiny.yaml", registry)
    assert "tiny.yaml" in str(exc.value)


def test_cuda_graphs_off_cuda_and_under_torchrun_are_refused_naming_the_key(
    tmp_path, registry
) -> None:
    rc = validate_recipe(
        tiny_recipe(tmp_path, cuda_graphs=True, device="cpu"), "tiny.yaml", registry
    )
    with pytest.raises(RecipeError, match=r"training\.cuda_graphs: true needs a CUDA device"):
        check_recipe(rc, registry)  # what `fusionkit recipe validate` runs
    with pytest.raises(RecipeError, match=r"set training\.cuda_graphs to false"):
        Trainer(build_session(rc, registry), RunDir.create(rc, registry))
    with pytest.raises(RecipeError, match="this job has 2"):
        check_cuda_graphs(rc, torch.device("cuda"), world_size=2)
    check_cuda_graphs(rc, torch.device("cuda"), world_size=1)  # one GPU process: fine


def test_cuda_graphs_do_not_change_what_a_run_trains(tmp_path, registry) -> None:
    """The switch changes speed only: the training hash (resume check) is the same with it on,
    off, or absent (a run recorded before the option existed)."""
    on = validate_recipe(tiny_recipe(tmp_path, cuda_graphs=True), "tiny", registry)
    off = validate_recipe(tiny_recipe(tmp_path), "tiny", registry)
    old = off.model_dump(mode="json")
    del old["training"]["cuda_graphs"]
    assert on.training_sha256() == off.training_sha256()
    assert off.training_sha256() == training_sha256_of(training_view_of(old))
    changed = validate_recipe(tiny_recipe(tmp_path, lr=1e-3), "tiny", registry)
    assert changed.training_sha256() != off.training_sha256()


@CUDA
def test_graphed_steps_on_cuda_match_eager_steps_through_a_learning_rate_change() -> None:
    dev = torch.device("cuda")

    def run(graphs: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(32, 8), torch.nn.Tanh())
        model = model.to(dev)
        head = torch.nn.Linear(8, 1).to(dev)
        params = [*model.parameters(), *head.parameters()]
        opt = torch.optim.Adam(params, lr=1e-2, fused=True, capturable=True)

        def step(windows: torch.Tensor) -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = head(model(windows)).square().mean()
            loss.backward()
            opt.step()
            return loss.detach()

        lrs = lambda: tuple(float(g["lr"]) for g in opt.param_groups)  # noqa: E731
        fn = GraphedStep(step, 4, dev, lrs, warmup=2) if graphs else step
        perm = torch.randperm(30, generator=torch.Generator().manual_seed(1)).to(dev)
        for epoch in range(3):
            for i in range(0, 30, 4):  # 7 full batches and one of 2
                fn(perm[i : i + 4])
            if epoch == 1:
                opt.param_groups[0]["lr"] = 1e-3
        if graphs:
            assert fn.captures == 2
        torch.cuda.synchronize()
        return [p.detach().cpu() for p in params]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@CUDA
def test_a_recipe_trained_with_cuda_graphs_matches_eager_training(
    tmp_path, registry, monkeypatch
) -> None:
    import fusionkit.engine.train as train_mod

    made: list[GraphedStep] = []

    class Recorded(GraphedStep):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(train_mod, "GraphedStep", Recorded)

    def fit(graphs: bool):
        raw = tiny_recipe(tmp_path / str(graphs), device="cuda", epochs=3, cuda_graphs=graphs)
        raw["model"]["head"]["params"]["dropout"] = 0.0  # the same arithmetic on both sides
        rc = validate_recipe(raw, "tiny", registry)
        run = RunDir.create(rc, registry)
        result = Trainer(build_session(rc, registry), run).fit()
        run.unlock()
        return result

    graphed, eager = fit(True), fit(False)
    assert len(made) == 1 and made[0].captures >= 1
    for split in ("val", "test"):
        for key, value in eager.metrics[split].items():
            assert graphed.metrics[split][key] == pytest.approx(value, rel=1e-3, abs=1e-4)
