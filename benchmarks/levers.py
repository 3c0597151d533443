"""Component-level levers of the TAGF training step, each variant against its base, side by side.

Every group builds its variants in one process and runs them interleaved (A, B, A, B, ...),
``--repeats`` times after one warm-up, so that a slow spell of a shared machine hits every
variant alike. Reported per variant: the minimum and the median time in ms, the ratio of the
base's minimum to the variant's, and the median (with the range) of the per-repeat ratios of
the base to the variant (above 1: the variant is faster). Shapes are the released ones:
batch 12 x T 300 frames, S = 3 steps, video 256 and audio 128 features.

Groups (``--groups``):

* ``gate``: the TAGF gate's forward + backward in training mode (both streams): the released
  computation through modules (``nn.LSTM`` over the steps, ``nn.Dropout``, ``Linear``,
  ``normalize``; ``TAGFGate.fused = False``) against fusionkit's fused ``step_scores``
  (``fused = True``), and each under ``torch.compile`` (first-call compile time printed).
  ``--device cuda`` runs this group on a GPU (the others are CPU measurements).
* ``lstm_batching``: the two streams' step BiLSTMs as two ``nn.LSTM`` calls against one call
  with the audio stream zero-padded to the video width (forward + backward).
* ``dropout``: dropout masks for the ~19 million units one training step drops (RJCA and gate):
  ``bernoulli_`` (``nn.Dropout`` on the CPU), ``rand < 1 - p`` (fusionkit's
  ``FastDropout``), and 15-bit integers (two per 32-bit draw; keep probability rounded to
  ``2^-15``, not used by fusionkit).
* ``adam``: one Adam step over the TAGF parameters (3.0 M) with gradients: the for-loop
  implementation (PyTorch's default on the CPU), ``foreach`` and ``fused``.
* ``seeds``: several seeds of one model trained as one batched model. For each model of the
  fusion/gate grid (``recipes/ablations/fusion_gate.yaml``: TCN encoders with 32 channels on
  the synthetic dataset's features), ``--seeds`` copies with their own initialisation take one
  training step each (forward, ``1 - CCC`` loss, backward, fused Adam) in turn, against one
  step of the same copies stacked into one model (``torch.func.stack_module_state``) whose
  loss gradient is ``vmap``-ed over the copies (own inputs, own dropout draws), with one fused
  Adam over the stacked parameters. Same FLOPs; what changes is operation count and size. A
  model whose components cannot run under ``vmap`` is reported with the reason. ``--device
  cuda`` runs this group on a GPU, where small models leave the device idle.

Example::

    python benchmarks/levers.py --threads 2
    python benchmarks/levers.py --threads 2 --groups gate --repeats 7
    python benchmarks/levers.py --threads 1 --groups seeds --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DIMS, build

from fusionkit.core.registry import get_registry
from fusionkit.engine.metrics import ccc_loss

B, T, S = 12, 300, 3
GROUPS = ["gate", "lstm_batching", "dropout", "adam", "seeds"]
REPO = Path(__file__).resolve().parent.parent
ARGS = argparse.Namespace(device="cpu", compile=True, seeds=3)


def gate_variants(device: str = "cpu") -> dict[str, Callable[[], None]]:
    comp = get_registry().get("gate", "tagf")
    stacks = {
        m: torch.randn(B, T, S, d, device=device, requires_grad=True) for m, d in DIMS.items()
    }
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    out = {}
    names = ["modules", "fused"] + (["modules+compile", "fused+compile"] if ARGS.compile else [])
    for name in names:
        torch.manual_seed(0)
        gate = comp.build(comp.params(), in_dims=dict(DIMS), num_steps=S).to(device).train()
        gate.fused = name.startswith("fused")  # the released modules (nn.LSTM) or step_scores
        fn = torch.compile(gate) if name.endswith("compile") else gate

        def step(fn=fn) -> None:
            fn(stacks, mask).features.sum().backward()
            if device != "cpu":
                torch.cuda.synchronize()

        if name.endswith("compile"):
            t0 = time.perf_counter()
            step()
            print(f"# {name}: first call (compiling) {time.perf_counter() - t0:.1f} s", flush=True)
        out[name] = step
    return out


def lstm_batching_variants() -> dict[str, Callable[[], None]]:
    lv = torch.nn.LSTM(256, 256, bidirectional=True, batch_first=True)
    la = torch.nn.LSTM(128, 128, bidirectional=True, batch_first=True)
    xv = torch.randn(B * T, S, 256, requires_grad=True)
    xa = torch.randn(B * T, S, 128, requires_grad=True)

    def two() -> None:
        (lv(xv)[0].sum() + la(xa)[0].sum()).backward()

    def one() -> None:  # audio zero-padded to 256 features and 256 hidden units
        x = torch.cat([xv, F.pad(xa, (0, 128))])
        lv(x)[0].sum().backward()

    return {"two calls": two, "one call (audio padded)": one}


def dropout_variants() -> dict[str, Callable[[], None]]:
    # units one training step drops: RJCA (2 steps x (C_m (B, d_m, d) + residual (B, T, d_m))
    # per modality, p = 0.6) and the gate ([x || h] per stream, p = 0.1)
    d = sum(DIMS.values())
    sizes = [(B, dm, d) for dm in DIMS.values()] * 2 + [(B, T, dm) for dm in DIMS.values()] * 2
    sizes += [(B * T, S, 3 * dm) for dm in DIMS.values()]
    keep = [0.4] * 8 + [0.9] * 2

    def bernoulli() -> None:
        for shape, k in zip(sizes, keep, strict=True):
            torch.empty(shape).bernoulli_(k).div_(k)

    def rand() -> None:
        for shape, k in zip(sizes, keep, strict=True):
            torch.rand(shape).lt_(k).div_(k)

    def int15() -> None:
        for shape, k in zip(sizes, keep, strict=True):
            n = torch.Size(shape).numel()
            r = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16)[:n]
            r.bitwise_and_(0x7FFF).lt_(round(k * 32768)).to(torch.float32).div_(k)

    return {"bernoulli_": bernoulli, "rand < keep": rand, "int15": int15}


def adam_variants() -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    model = build("tagf", "none", "faithful", T).train()
    inputs = {m: torch.randn(B, T, d) for m, d in DIMS.items()}
    mask = torch.ones(B, T, dtype=torch.bool)
    target = torch.rand(B, T, 2) * 2 - 1
    ccc_loss(model(inputs, mask).pred, target, mask).backward()
    out = {}
    for name, kw in (
        ("for-loop", {"foreach": False}),
        ("foreach", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, **kw)
        out[name] = opt.step
    return out


def seeds_variants(
    seeds: int = 3, device: str = "cpu"
) -> list[tuple[str, dict[str, Callable[[], None]] | str]]:
    """Per grid model: ``seeds`` models stepped in turn against one vmapped stacked model."""
    from torch.func import functional_call, grad_and_value, stack_module_state, vmap

    from fusionkit.core.recipe import load_recipe
    from fusionkit.engine.model import build_model
    from fusionkit.studies.grid import expand_grid

    grid = load_recipe(REPO / "recipes" / "ablations" / "fusion_gate.yaml")
    points = {
        p.values["variant"]: p.recipe for p in expand_grid(grid) if p.values["training.seed"] == 0
    }
    dims = {"audio": 32, "video": 48}  # the synthetic dataset's defaults
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    inputs = {m: torch.randn(seeds, B, T, d, device=device) for m, d in dims.items()}
    target = torch.rand(seeds, B, T, 2, device=device) * 2 - 1

    def sync() -> None:
        if device != "cpu":
            torch.cuda.synchronize()

    out: list[tuple[str, dict[str, Callable[[], None]] | str]] = []
    for name, recipe in points.items():
        models = []
        for k in range(seeds):
            torch.manual_seed(k)
            models.append(build_model(recipe, dims).to(device).train())
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in models]

        def in_turn(models=models, opts=opts) -> None:
            for k, (m, opt) in enumerate(zip(models, opts, strict=True)):
                pred = m({d: x[k] for d, x in inputs.items()}, mask).pred
                ccc_loss(pred.float(), target[k], mask).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()

        params, buffers = stack_module_state(models)
        skeleton = build_model(recipe, dims).to("meta").train()

        def loss(p, b, x, y, skeleton=skeleton):
            pred = functional_call(skeleton, (p, b), (x, mask)).pred
            return ccc_loss(pred.float(), y, mask)

        step = vmap(grad_and_value(loss), randomness="different")
        names = list(params)
        stacked = [params[n] for n in names]
        opt = torch.optim.Adam(stacked, lr=1e-3, fused=True)

        def batched(step=step, params=params, buffers=buffers, names=names, opt=opt) -> None:
            grads, _ = step(params, buffers, inputs, target)
            for n in names:
                params[n].grad = grads[n]
            opt.step()
            sync()

        try:
            batched()
        except Exception as exc:  # reported in the table, not hidden
            out.append((name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            continue
        out.append((name, {f"{seeds} models in turn": in_turn, "one vmapped model": batched}))
    return out


BUILDERS = {
    "gate": lambda: gate_variants(ARGS.device),
    "lstm_batching": lstm_batching_variants,
    "dropout": dropout_variants,
    "adam": adam_variants,
    "seeds": lambda: seeds_variants(ARGS.seeds, ARGS.device),
}


def compare(variants: dict[str, Callable[[], None]], repeats: int) -> list[dict]:
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    base = next(iter(variants))
    rows = []
    for k, ts in times.items():
        ratios = [a / b for a, b in zip(times[base], ts, strict=True)]
        rows.append(
            {
                "variant": k,
                "min": min(ts),
                "median": statistics.median(ts),
                "ratio_min": min(times[base]) / min(ts),
                "ratio_median": statistics.median(ratios),
                "ratio_range": (min(ratios), max(ratios)),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"from {', '.join(GROUPS)}")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="device of the gate and seeds groups")
    ap.add_argument(
        "--no-compile", dest="compile", action="store_false", help="gate group without compile"
    )
    ap.add_argument("--seeds", type=int, default=3, help="models per step in the seeds group")
    args = ap.parse_args()
    ARGS.device, ARGS.compile, ARGS.seeds = args.device, args.compile, args.seeds
    torch.set_num_threads(args.threads)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    unknown = [g for g in groups if g not in BUILDERS]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; groups: {', '.join(GROUPS)}")
    where = "CPU" if args.device == "cpu" else f"{args.device} for the gate and seeds groups"
    print(
        f"# {where}, {args.threads} CPU threads; {args.repeats} interleaved repeats after 1 warm-up"
    )
    print("| group | variant | min ms | median ms | base/variant (min) | base/variant per repeat |")
    print("|---|---|---|---|---|---|")
    for g in groups:
        built = BUILDERS[g]()
        sets = built if isinstance(built, list) else [("", built)]
        for label, variants in sets:
            where = f"{g} {label}".strip()
            if isinstance(variants, str):  # the variants could not be built: say why
                print(f"| {where} | not measured: {variants} | | | | |", flush=True)
                continue
            for r in compare(variants, args.repeats):
                lo, hi = r["ratio_range"]
                print(
                    f"| {where} | {r['variant']} | {r['min']:.1f} | {r['median']:.1f} | "
                    f"{r['ratio_min']:.2f}x | {r['ratio_median']:.2f}x ({lo:.2f}-{hi:.2f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
