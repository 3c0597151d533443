"""Where a training step goes: per-stage times and the aten ops that dominate them.

For each ``--models`` row (fresh process each, like ``bench.py``; the same model builder, inputs
and training step: forward, ``1 - CCC`` loss, backward, Adam step) it times, per step:

* the forward of each stage (fusion, gate, head) and the loss, from forward hooks;
* the backward of each stage, from gradient hooks on the stage outputs: the head's backward
  ends when the gradient of the gate output is complete, the gate's when the gradients of all
  fusion outputs are; the rest of the backward is the fusion's (plus any encoders). The
  autograd engine runs the operations of later stages first on the CPU, so the boundaries
  hold;
* the optimizer step, and then the same step with the ``foreach`` and ``fused`` Adam
  implementations on the same parameters and gradients (``--optimizers``).

Stages are reported as the median and the minimum over ``--steps`` steps after
``--warmup``; on a shared machine the minimum is the steadier estimate of the cost. The
``tagf_eager`` row (the released structure, ``eager_baseline.py``) has no stage modules: its
forward is split at the first step layer, the gate encoders and the head's first Linear, and
its backward is reported as one number.

``--ops N`` adds the N aten ops with the largest self CPU time over a few profiled steps
(``torch.profiler``), grouped by op name, in ms per step.

Besides the models of ``bench.py``, ``tagf_modules`` is fusionkit's ``tagf`` computed as before
its CPU fast path: the gate's BiLSTM through ``nn.LSTM`` and every dropout through
``nn.Dropout`` (the same parameters and math; see ``released_paths``).

Examples::

    python benchmarks/breakdown.py --models tagf_eager,tagf --threads 2
    python benchmarks/breakdown.py --models tagf_modules,tagf --threads 2 --ops 12
    python benchmarks/breakdown.py --models tagf --threads 2 --ops 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DIMS, EAGER, RAW, build

from fusionkit.engine.metrics import ccc_loss

MODULES = "tagf_modules"  # fusionkit's tagf without its CPU fast path (released_paths)
FWD = ["fusion_fwd", "gate_fwd", "head_fwd", "loss_fwd"]
BWD = ["head_bwd", "gate_bwd", "fusion_bwd"]
STAGES = [*FWD, *BWD, "backward", "optimizer", "step"]


class Clock:
    """Named timestamps of the current step."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())


def _after_all(tensors: list[torch.Tensor], fn: Callable[[], None]) -> None:
    """Call ``fn`` once the gradients of all ``tensors`` are computed."""
    left = [t for t in tensors if t.requires_grad]
    pending = {id(t) for t in left}

    def hook_for(t: torch.Tensor):
        def hook(grad):
            pending.discard(id(t))
            if not pending:
                fn()
            return grad

        return hook

    for t in left:
        t.register_hook(hook_for(t))


def instrument(model: torch.nn.Module, clock: Clock) -> None:
    """Forward and gradient hooks that put stage boundaries on ``clock``."""
    if hasattr(model, "net"):  # the eager baseline: forward boundaries only
        net = model.net
        net.layers[0].register_forward_pre_hook(lambda m, a: clock.mark("fusion_start"))
        net.gate_v.register_forward_pre_hook(lambda m, a: clock.mark("fusion_end"))
        net.fc1.register_forward_pre_hook(lambda m, a: clock.mark("gate_end"))
        net.fc2.register_forward_hook(lambda m, a, o: clock.mark("head_end"))
        return
    model.fusion.register_forward_pre_hook(lambda m, a: clock.mark("fusion_start"))

    def fusion_out(m, args, out):
        clock.mark("fusion_end")
        _after_all(list(out.values()), lambda: clock.mark("gate_bwd_end"))

    def gate_out(m, args, out):
        clock.mark("gate_end")
        _after_all([out.features], lambda: clock.mark("head_bwd_end"))

    model.fusion.register_forward_hook(fusion_out)
    model.gate.register_forward_hook(gate_out)
    model.head.register_forward_hook(lambda m, a, o: clock.mark("head_end"))


def stage_times(marks: dict[str, float]) -> dict[str, float]:
    m = marks
    out = {
        "fusion_fwd": m["fusion_end"] - m["fusion_start"],
        "gate_fwd": m["gate_end"] - m["fusion_end"],
        "head_fwd": m["head_end"] - m["gate_end"],
        "loss_fwd": m["loss_end"] - m["head_end"],
        "backward": m["backward_end"] - m["loss_end"],
        "optimizer": m["optimizer_end"] - m["backward_end"],
        "step": m["optimizer_end"] - m["start"],
    }
    if "head_bwd_end" in m:
        out["head_bwd"] = m["head_bwd_end"] - m["loss_end"]
        out["gate_bwd"] = m["gate_bwd_end"] - m["head_bwd_end"]
        out["fusion_bwd"] = m["backward_end"] - m["gate_bwd_end"]
    return {k: v * 1e3 for k, v in out.items()}


def top_ops(step: Callable[[], None], steps: int, k: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.name.startswith("aten::"):
            totals[e.name][0] += e.self_cpu_time_total
            totals[e.name][1] += 1
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:k]
    return [{"op": n, "ms": t / 1e3 / steps, "calls": c / steps} for n, (t, c) in rows]


def optimizer_times(model: torch.nn.Module, step_grads: Callable[[], None], reps: int) -> dict:
    """Adam step time (ms, min over ``reps``) for each implementation, same grads."""
    step_grads()
    out = {}
    for impl, kw in (
        ("for-loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        try:
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, **kw)
        except (RuntimeError, TypeError, ValueError) as exc:  # not supported here
            out[impl] = f"n/a ({exc})"
            continue
        times = []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[impl] = min(times[2:]) * 1e3
    return out


def released_paths(model: torch.nn.Module) -> torch.nn.Module:
    """fusionkit's TAGF computed as before its CPU fast path: the gate through its modules
    (``nn.LSTM`` over the steps, ``nn.Dropout``) and the RJCA dropouts as ``nn.Dropout``
    (``bernoulli_`` masks). The same parameters and math."""
    model.gate.fused = False
    for sub in model.modules():
        if isinstance(sub, torch.nn.Dropout):
            sub.forward = types.MethodType(torch.nn.Dropout.forward, sub)
    return model


def measure(args: argparse.Namespace, name: str) -> dict:
    torch.manual_seed(0)
    if name == MODULES:
        model = released_paths(build("tagf", args.encoders, args.mode, args.length))
    else:
        model = build(name, args.encoders, args.mode, args.length)
    feat = RAW if args.encoders == "tcn" else DIMS
    b, t = args.batch, args.length
    inputs = {m: torch.randn(b, t, d) for m, d in feat.items()}
    mask = torch.ones(b, t, dtype=torch.bool)
    target = torch.rand(b, t, 2) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    clock = Clock()
    instrument(model, clock)
    model.train()

    def train_step() -> None:
        clock.marks = {}
        clock.mark("start")
        opt.zero_grad(set_to_none=True)
        pred = model(inputs, mask).pred
        loss = ccc_loss(pred.float(), target, mask)
        clock.mark("loss_end")
        loss.backward()
        clock.mark("backward_end")
        opt.step()
        clock.mark("optimizer_end")

    for _ in range(args.warmup):
        train_step()
    per_step = []
    for _ in range(args.steps):
        train_step()
        per_step.append(stage_times(clock.marks))
    stats = {}
    for k in STAGES:
        vals = [s[k] for s in per_step if k in s]
        if vals:
            stats[k] = {"median": statistics.median(vals), "min": min(vals)}

    def grads_only() -> None:
        opt.zero_grad(set_to_none=True)
        ccc_loss(model(inputs, mask).pred.float(), target, mask).backward()

    return {
        "model": name,
        "stages": stats,
        "optimizers": optimizer_times(model, grads_only, args.steps) if args.optimizers else None,
        "ops": top_ops(train_step, 2, args.ops) if args.ops else None,
        "params": sum(p.numel() for p in model.parameters()),
    }


def report(rows: list[dict]) -> list[str]:
    out = [
        "| stage | " + " | ".join(f"{r['model']} median | min" for r in rows) + " |",
        "|---|" + "---|---|" * len(rows),
    ]
    for k in STAGES:
        cells = []
        for r in rows:
            s = r["stages"].get(k)
            cells += ["", ""] if s is None else [f"{s['median']:.1f}", f"{s['min']:.1f}"]
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["optimizers"]:
            cells = ", ".join(
                f"{k} {v:.1f} ms" if isinstance(v, float) else f"{k} {v}"
                for k, v in r["optimizers"].items()
            )
            out += ["", f"Adam step, {r['model']} ({r['params']:,} parameters, min): {cells}"]
    for r in rows:
        if r["ops"]:
            out += [
                "",
                f"top aten ops by self CPU time, {r['model']} (ms per step, calls per step):",
            ]
            out += [f"  {o['ms']:9.1f} ms  {o['calls']:6.1f}x  {o['op']}" for o in r["ops"]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=f"{EAGER},tagf")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--encoders", choices=["none", "tcn"], default="none")
    ap.add_argument("--mode", choices=["agnostic", "faithful"], default="faithful")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--ops", type=int, default=0, help="top-N aten ops (0: none)")
    ap.add_argument("--no-optimizers", dest="optimizers", action="store_false")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.single:
        print(json.dumps(measure(args, args.single)))
        return
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--single", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(f"{name}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"# CPU, {args.threads} threads; batch {args.batch}, T {args.length}, encoders "
        f"{args.encoders}, rjca {args.mode}; ms per training step, {args.steps} steps after "
        f"{args.warmup} warm-up"
    )
    for line in report(rows):
        print(line)


if __name__ == "__main__":
    main()
