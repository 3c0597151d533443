"""Throughput and memory of the fusion models, fusionkit plugins vs a plain eager baseline.

Measures per row: training step (forward + 1-CCC loss + backward + Adam step) and inference
(forward, no grad) as windows/s and frames/s, the median over timed repeats after warm-up,
peak memory (CUDA: max allocated; CPU: peak RSS of a fresh process per row), the FLOPs of one
training step (``torch.utils.flop_counter``) and its bytes (a dispatch-mode counter: the bytes
of every tensor each aten op reads and writes, so an upper bound on memory traffic when no op
is fused), and from both a roofline lower bound on the step time where the device's peaks are
known (table below, or ``--peak-tflops``/``--peak-gbs``). FLOPs and bytes are counted on the
uncompiled model, also for ``compile`` rows: compiling changes neither the FLOPs nor this
unfused byte count (it does cut the real traffic, by fusing).

Rows are ``--models`` entries, each ``MODEL[:OPT+OPT...]`` with options ``bf16``/``fp32``
(autocast precision) and ``compile``/``eager`` (``torch.compile`` on/off) overriding the global
``--bf16``/``--compile`` for that row, e.g. ``tagf_eager,tagf,tagf:bf16,tagf:bf16+compile``,
and ``graphs`` (CUDA only): the whole training step (forward, loss, backward, Adam with
``capturable=True``) captured once as a CUDA graph and replayed, which removes the host's
per-kernel launch cost; shown as ``+graphs`` in the compile column.
Each row runs in a fresh process, and the rows run interleaved: ``--rounds`` times the whole
list in turn (``tagf_eager`` first in each round), so that a slow spell of a shared machine
falls on every row alike. A row's times are the median over the rounds of each process's
median, with the range over the rounds; ``vs_eager`` is, per round, the ``tagf_eager`` row's
training step time (as that row is given) over this row's, the median over the rounds with its
range: only ratios of rows measured side by side. FLOPs and bytes are counted in the first
round only (they do not change). ``--adam`` picks the Adam implementation of every row
(``for-loop``: PyTorch's default on the CPU, ``foreach``, ``fused``).

``--profile`` runs a few more training steps of each row under ``torch.profiler`` and reports
the wall time per step, the device-busy time per step (CUDA: the union of the intervals of the
kernel/memcpy/memset events, so kernels that overlap count once; n/a on the CPU), the host time
spent inside aten ops (union of ``aten::`` op intervals; on the CPU all of them run on the main
thread) and the top-5 kernels (CUDA) or aten ops (CPU) by self time.

Examples::

    python benchmarks/bench.py                                   # released shapes, CPU
    python benchmarks/bench.py --models tagf_eager,tagf --threads 2 # the two TAGFs, side by side
    python benchmarks/bench.py --encoders tcn                    # with the TCN front ends
    python benchmarks/bench.py --batch 64 --device cuda \\
        --models tagf_eager,tagf,tagf:bf16,tagf:bf16+compile --profile
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eager_baseline import EagerTAGF

from fusionkit.core.recipe import EncoderSpec, FusionSpec, GateSpec, HeadSpec
from fusionkit.engine.graphs import cuda_capture, on_side_stream
from fusionkit.engine.metrics import ccc_loss
from fusionkit.engine.model import FusionModel

DIMS = {"video": 256, "audio": 128}  # released feature sizes after the encoders
RAW = {"video": 512, "audio": 128}  # released TCN inputs
TCN = {"video": [512, 512, 256, 256], "audio": [128, 128, 128, 128]}
GATES = {
    "concat": "last",
    "rjca": "last",
    "grjca": "grjca",
    "tagf": "tagf",
    "tagf_temporal": "tagf_temporal",
}
MODELS = [*GATES, "tagf_eager"]
EAGER = "tagf_eager"

# --- per-row variants -------------------------------------------------------------------------

#: option -> (Variant field, value)
OPTIONS: dict[str, tuple[str, bool]] = {
    "bf16": ("bf16", True),
    "fp32": ("bf16", False),
    "compile": ("compile", True),
    "eager": ("compile", False),
    "graphs": ("graphs", True),
}


@dataclass(frozen=True)
class Variant:
    """One table row: a model and how it runs."""

    spec: str
    model: str
    bf16: bool
    compile: bool
    graphs: bool = False

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def parse_variant(spec: str, *, bf16: bool = False, compile: bool = False) -> Variant:
    """``MODEL[:OPT+OPT...]`` -> :class:`Variant`; the options override ``bf16``/``compile``.

    Raises ValueError naming an unknown model or option (and the valid ones), or two options
    that contradict each other (``bf16+fp32``, ``compile+eager``).
    """
    spec = spec.strip()
    name, _, opts = spec.partition(":")
    name = name.strip()
    if name not in MODELS:
        raise ValueError(
            f"--models entry {spec!r}: unknown model {name!r}; models: {', '.join(MODELS)}"
        )
    fields = {"bf16": bf16, "compile": compile, "graphs": False}
    given: dict[str, str] = {}
    for opt in (o.strip() for o in opts.split("+")) if opts else ():
        if opt not in OPTIONS:
            raise ValueError(
                f"--models entry {spec!r}: unknown option {opt!r}; valid options: "
                f"{', '.join(OPTIONS)} (joined with '+', e.g. tagf:bf16+compile)"
            )
        field, value = OPTIONS[opt]
        if field in given and given[field] != opt:
            raise ValueError(f"--models entry {spec!r}: options {given[field]!r} and {opt!r} clash")
        given[field] = opt
        fields[field] = value
    return Variant(spec=spec, model=name, **fields)


def parse_models(models: str, *, bf16: bool = False, compile: bool = False) -> list[Variant]:
    return [parse_variant(s, bf16=bf16, compile=compile) for s in models.split(",") if s.strip()]


def run_order(variants: list[Variant]) -> list[Variant]:
    """One round: the ``tagf_eager`` rows first (so that ``vs_eager`` is known for every row),
    then the others, each group in the given order."""
    return [v for v in variants if v.model == EAGER] + [v for v in variants if v.model != EAGER]


# --- bytes per step ---------------------------------------------------------------------------

#: ops that move no data (views, aliases, allocations without initialisation); any op whose
#: schema marks it as a view (``OpOverload.is_view``: view, t, transpose, expand, permute,
#: as_strided, slice, select, ...) is skipped too.
FREE_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "as_strided",
        "t",
        "transpose",
        "expand",
        "permute",
        "detach",
        "alias",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "_local_scalar_dense",
    }
)
#: ops that copy only sometimes: free when the output shares the first input's storage.
MAYBE_VIEW_OPS = frozenset({"reshape", "contiguous", "flatten", "reshape_as", "view_as"})


def tensor_bytes(tree: object) -> int:
    """Bytes of every tensor in a (nested) structure: ``numel * element_size`` each."""
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _storage(t: object) -> int | None:
    try:
        return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
    except RuntimeError:
        return None


def _written(func, args: tuple, kwargs: dict) -> list:
    """The arguments an op's schema marks as mutated (``Tensor(a!)``)."""
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            if i < len(args):
                out.append(args[i])
            elif arg.name in kwargs:
                out.append(kwargs[arg.name])
    return out


class ByteCounter(TorchDispatchMode):
    """Sums the bytes of every tensor input and output of each aten op run under it.

    The total is an upper bound on device-memory traffic for unfused execution: each op is
    taken to read all its inputs and write all its outputs once (an in-place op's tensor counts
    as read and written, also when the op returns nothing, like ``_foreach_mul_``). Views and
    metadata ops (:data:`FREE_OPS`, ``OpOverload.is_view``) add nothing, nor does an ``out=``
    argument as an input.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if getattr(func, "is_view", False) or name in FREE_OPS:
            return out
        if name in MAYBE_VIEW_OPS and args and _storage(out) == _storage(args[0]):
            return out
        ins = (args, {k: v for k, v in kwargs.items() if k != "out"})
        n = tensor_bytes(ins) + tensor_bytes(out)
        if out is None:  # in-place ops returning nothing (_foreach_*_): count the writes
            n += tensor_bytes(_written(func, args, kwargs))
        self.total += n
        self.by_op[name] += n
        return out


# --- roofline ---------------------------------------------------------------------------------

# Dense (no sparsity) peaks from the NVIDIA H100 SXM5 datasheet (H100 Tensor Core GPU
# datasheet): BF16 989 TFLOP/s, TF32 494 TFLOP/s, FP32 (no tensor cores) 67 TFLOP/s, HBM3
# 3.35 TB/s; H100 PCIe: 756 / 378 / 51 TFLOP/s, HBM2e 2.0 TB/s; H200 (NVIDIA H200 datasheet):
# the H100 SXM compute, HBM3e 4.8 TB/s. First matching substring of the device name wins.
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0, "gbs": 2000.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0, "gbs": 3350.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0, "gbs": 4800.0}),
]
PEAK_SOURCE = {
    "H100 PCIe": "NVIDIA H100 PCIe datasheet",
    "H100": "NVIDIA H100 SXM5 datasheet",
    "H200": "NVIDIA H200 datasheet",
}
MEASURED_NOTE = (
    "measured with benchmarks/peaks.py on an NVIDIA H200 (2026-12-01): 792 TFLOP/s for an "
    "8192^3 bf16 matmul and 4,301 GB/s for a device-to-device copy (read + write), i.e. ~80% "
    "and ~90% of the H200 spec peaks"
)


def device_peaks(device_name: str) -> tuple[str, dict[str, float]] | None:
    """(table key, peaks) of the first :data:`PEAKS` entry whose key is in ``device_name``."""
    for key, peaks in PEAKS:
        if key.lower() in device_name.lower():
            return key, peaks
    return None


def pick_peaks(
    device_type: str,
    device_name: str,
    bf16: bool,
    peak_tflops: float | None = None,
    peak_gbs: float | None = None,
) -> dict[str, Any]:
    """Peak compute (TFLOP/s) and bandwidth (GB/s) for a row: the flags where given, else the
    table's (CUDA only) for the row's precision (bf16 -> bf16 tensor cores, fp32 -> plain fp32,
    not TF32). Keys: tflops, gbs, source (None where unknown)."""
    tflops = gbs = None
    src = []
    table = device_peaks(device_name) if device_type == "cuda" else None
    if table is not None:
        key, peaks = table
        tflops, gbs = peaks["bf16" if bf16 else "fp32"], peaks["gbs"]
        src.append(f"{key} {'bf16' if bf16 else 'fp32'} spec, {PEAK_SOURCE[key]}")
    if peak_tflops is not None:
        tflops = peak_tflops
        src.append("--peak-tflops")
    if peak_gbs is not None:
        gbs = peak_gbs
        src.append("--peak-gbs")
    return {"tflops": tflops, "gbs": gbs, "source": "; ".join(src) or None}


def roofline(
    flops: float | None,
    nbytes: float | None,
    peak_tflops: float | None,
    peak_gbs: float | None,
) -> dict[str, Any] | None:
    """Roofline lower bound on a step: ``max(flops / peak_flops, bytes / peak_bw)``, in ms.

    Terms whose count or peak is unknown are left out (the max of the others is still a lower
    bound); None when neither term is known. ``bound`` names the larger term.
    """
    terms = {}
    if flops is not None and peak_tflops:
        terms["compute"] = flops / (peak_tflops * 1e12) * 1e3
    if nbytes is not None and peak_gbs:
        terms["memory"] = nbytes / (peak_gbs * 1e9) * 1e3
    if not terms:
        return None
    bound = max(terms, key=terms.get)
    return {
        "roofline_ms": terms[bound],
        "compute_ms": terms.get("compute"),
        "memory_ms": terms.get("memory"),
        "bound": bound,
    }


def roofline_pct(roofline_ms: float | None, step_ms: float) -> float | None:
    """Measured step as a fraction of its roofline bound, in percent (100 = at the roofline)."""
    return None if roofline_ms is None else 100.0 * roofline_ms / step_ms


# --- profiling --------------------------------------------------------------------------------

DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by a set of ``(start, end)`` intervals (overlaps count once)."""
    total = 0.0
    cur_s = cur_e = None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _is_device_work(e: Any) -> bool:
    """A CUDA kernel, memcpy or memset event (not a GPU-side user annotation range)."""
    if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
        return False
    act = getattr(e, "activity_type", None)  # absent in older torch
    return act is None or act in DEVICE_ACTIVITIES


def _top(totals: dict[str, list[float]], k: int) -> list[dict[str, Any]]:
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:k]
    return [{"name": n[:200], "self_ms": t / 1e3, "calls": int(c)} for n, (t, c) in rows]


def summarize_profile(events: Iterable[Any], steps: int, wall_s: float, top: int = 5) -> dict:
    """Per-step busy times and the top kernels/ops from ``torch.profiler`` events.

    ``events`` are ``prof.events()`` (``FunctionEvent``: name, device_type, thread, time_range
    in us, self_cpu_time_total). Device busy = union of CUDA kernel/memcpy/memset intervals;
    host op time = union of ``aten::`` op intervals over the host threads (on CUDA the backward
    runs on autograd's device thread, on the CPU on the main thread; the threads take turns, so
    this is the time some thread is inside an aten op). Top: CUDA kernels by summed duration
    when there are any, else aten ops by self CPU time.
    """
    events = list(events)
    dev = [e for e in events if _is_device_work(e)]
    ops = [
        e
        for e in events
        if e.device_type == DeviceType.CPU
        and e.name.startswith("aten::")
        and not getattr(e, "is_async", False)
    ]
    host_us = union_length((e.time_range.start, e.time_range.end) for e in ops)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if dev:
        busy_us = union_length((e.time_range.start, e.time_range.end) for e in dev)
        for e in dev:
            totals[e.name][0] += e.time_range.end - e.time_range.start
            totals[e.name][1] += 1
        top_kind = "CUDA kernels/memcpy by total time"
    else:
        busy_us = None
        for e in ops:
            totals[e.name][0] += e.self_cpu_time_total
            totals[e.name][1] += 1
        top_kind = "aten ops by self CPU time"
    wall_ms = wall_s * 1e3 / steps
    busy_ms = None if busy_us is None else busy_us / 1e3 / steps
    host_ms = host_us / 1e3 / steps
    return {
        "steps": steps,
        "wall_ms": wall_ms,
        "device_busy_ms": busy_ms,
        "device_busy_pct": None if busy_ms is None else 100.0 * busy_ms / wall_ms,
        "host_ops_ms": host_ms,
        "host_ops_pct": 100.0 * host_ms / wall_ms,
        "n_device_events": len(dev),
        "top_kind": top_kind,
        "top": _top(totals, top),
    }


def profile_steps(step: Callable[[], None], device: torch.device, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    return summarize_profile(prof.events(), steps, wall)


# --- models and measurement -------------------------------------------------------------------


class Identity(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x, mask):
        return x


class EagerWrapper(nn.Module):
    """Gives the eager baseline the FusionModel call signature."""

    def __init__(self, encoders: nn.ModuleDict, length: int) -> None:
        super().__init__()
        self.encoders = encoders
        self.net = EagerTAGF(length=length)

    def forward(self, inputs, mask):
        v = self.encoders["video"](inputs["video"], mask)
        a = self.encoders["audio"](inputs["audio"], mask)
        return SimpleNamespace(pred=self.net(v, a))


def build(name: str, encoders: str, mode: str, length: int) -> nn.Module:
    def comp(spec, cname, params=None, **kw):
        return spec.model_validate({"name": cname, "params": params}).build(**kw)

    if encoders == "tcn":
        enc = nn.ModuleDict(
            {
                m: comp(EncoderSpec, "tcn", {"channels": TCN[m]}, in_dim=RAW[m], modality=m)
                for m in DIMS
            }
        )
    else:
        enc = nn.ModuleDict({m: Identity(d) for m, d in DIMS.items()})
    if name == EAGER:
        return EagerWrapper(enc, length)
    dims = {m: e.out_dim for m, e in enc.items()}
    if name == "concat":
        fusion = comp(FusionSpec, "concat", {"normalize": True}, in_dims=dims)
    else:
        fusion = comp(FusionSpec, "rjca", {"mode": mode, "length": length}, in_dims=dims)
    gate = comp(GateSpec, GATES[name], in_dims=dict(fusion.out_dims), num_steps=fusion.num_steps)
    head = comp(HeadSpec, "regression", {"hidden": 256}, in_dim=gate.out_dim, n_targets=2)
    return FusionModel(enc, fusion, gate, head)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tf32() -> dict[str, bool] | None:
    if not torch.cuda.is_available():
        return None
    return {
        "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn": bool(torch.backends.cudnn.allow_tf32),
    }


ADAM = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_adam(
    params: Iterable[nn.Parameter], impl: str, *, capturable: bool = False
) -> torch.optim.Adam:
    """Adam (lr 1e-4) in one of its implementations (:data:`ADAM`); ``for-loop`` is what
    ``torch.optim.Adam`` picks by default for CPU tensors. ``capturable`` keeps the step count
    on the device, as a CUDA graph capture needs."""
    return torch.optim.Adam(params, lr=1e-4, capturable=capturable, **ADAM[impl])


def cuda_graphed(step: Callable[[], None], device: torch.device, warmup: int = 3):
    """``step`` (a whole training step on static tensors) captured as a CUDA graph; returns
    the graph's ``replay``. Warm-up runs on a side stream first, as capture requires."""
    if device.type != "cuda":
        raise ValueError(f"the graphs option needs --device cuda (got {device.type})")
    for _ in range(warmup):
        on_side_stream(step, device)
    return cuda_capture(device)(step)


def measure(args: argparse.Namespace, var: Variant) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(var.model, args.encoders, args.mode, args.length).to(device)
    feat = RAW if args.encoders == "tcn" else DIMS
    b, t = args.batch, args.length
    inputs = {m: torch.randn(b, t, d, device=device) for m, d in feat.items()}
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    target = torch.rand(b, t, 2, device=device) * 2 - 1
    opt = make_adam(model.parameters(), getattr(args, "adam", "for-loop"), capturable=var.graphs)
    fwd = torch.compile(model) if var.compile else model

    def make_train_step(forward: Callable) -> Callable[[], None]:
        def train_step():
            opt.zero_grad(set_to_none=True)
            # a CUDA graph must not capture autocast's cast cache (freed on context exit)
            with torch.autocast(
                device.type, dtype=torch.bfloat16, enabled=var.bf16, cache_enabled=not var.graphs
            ):
                pred = forward(inputs, mask).pred
            loss = ccc_loss(pred.float(), target, mask)
            loss.backward()
            opt.step()

        return train_step

    train_step = make_train_step(fwd)
    if device.type == "cuda":  # before capturing: a graph's memory pool counts too
        torch.cuda.reset_peak_memory_stats(device)
    if var.graphs:
        model.train()
        train_step = cuda_graphed(train_step, device)

    def infer_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=var.bf16):
            fwd(inputs, mask)

    def timed(step, train: bool) -> float:
        model.train(train)
        for _ in range(args.warmup):
            step()
        _sync(device)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    train_s = timed(train_step, True)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    infer_s = timed(infer_step, False)
    prof = None
    if args.profile:
        model.train()
        prof = profile_steps(train_step, device, args.profile_steps)

    # FLOPs and bytes on the uncompiled model: both are properties of the computation.
    from torch.utils.flop_counter import FlopCounterMode

    flops = nbytes = None
    by_op: dict[str, int] = {}
    if getattr(args, "counts", True):
        model.train()
        eager_step = make_train_step(model)
        with FlopCounterMode(display=False) as counter:
            eager_step()
        flops = counter.get_total_flops()
        with ByteCounter() as bc:
            eager_step()
        _sync(device)
        nbytes, by_op = bc.total, dict(bc.by_op)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = pick_peaks(device.type, name, var.bf16, args.peak_tflops, args.peak_gbs)
    roof = roofline(flops, nbytes, peaks["tflops"], peaks["gbs"])
    train_ms = train_s * 1e3
    return {
        "model": var.model,
        "variant": var.spec,
        "precision": var.precision,
        "bf16": var.bf16,
        "compile": var.compile,
        "graphs": var.graphs,
        "params": sum(p.numel() for p in model.parameters()),
        "train_step_ms": train_ms,
        "train_windows_s": b / train_s,
        "train_frames_s": b * t / train_s,
        "infer_windows_s": b / infer_s,
        "infer_frames_s": b * t / infer_s,
        "peak_mem_mb": peak / 2**20,
        "train_gflop": None if flops is None else flops / 1e9,
        "train_gflops_s": None if flops is None else flops / train_s / 1e9,
        "train_gb": None if nbytes is None else nbytes / 1e9,
        "train_gb_s": None if nbytes is None else nbytes / train_s / 1e9,
        "top_bytes_ops": {k: v / 1e9 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:5]},
        "peak_tflops": peaks["tflops"],
        "peak_gbs": peaks["gbs"],
        "peak_source": peaks["source"],
        "tf32": _tf32(),
        "roofline_ms": None if roof is None else roof["roofline_ms"],
        "roofline_bound": None if roof is None else roof["bound"],
        "roofline_compute_ms": None if roof is None else roof["compute_ms"],
        "roofline_memory_ms": None if roof is None else roof["memory_ms"],
        "roofline_pct": roofline_pct(None if roof is None else roof["roofline_ms"], train_ms),
        "profile": prof,
    }


# --- output -----------------------------------------------------------------------------------


def machine(args: argparse.Namespace) -> str:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    return f"{dev}; {cpu}; torch {torch.__version__}; python {platform.python_version()}"


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if abs(v) >= 10:
            return f"{v:,.1f}"
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


COLS = [
    "model",
    "precision",
    "compile",
    "params",
    "train_step_ms",
    "train_step_range",
    "vs_eager",
    "train_windows_s",
    "train_frames_s",
    "infer_frames_s",
    "peak_mem_mb",
    "train_gflop",
    "train_gb",
    "train_gflops_s",
    "roofline_ms",
    "% of roofline",
]


def _runs_as(row: dict) -> str:
    """The compile column: ``compile`` or ``eager``, ``+graphs`` when CUDA graphs replay it."""
    return ("compile" if row["compile"] else "eager") + ("+graphs" if row.get("graphs") else "")


def table_row(row: dict) -> str:
    cells = []
    for c in COLS:
        if c == "vs_eager":
            v, rng = row.get("vs_eager"), row.get("vs_eager_range")
            text = "" if v is None else f"{v:.2f}x"
            cells.append(text if rng is None else f"{text} ({rng[0]:.2f}-{rng[1]:.2f})")
        elif c == "train_step_range":
            rng = row.get("train_step_range")
            cells.append("" if rng is None else f"{_cell(rng[0])}-{_cell(rng[1])}")
        elif c == "% of roofline":
            v = row.get("roofline_pct")
            bound = {"compute": "compute", "memory": "mem"}.get(row.get("roofline_bound"), "")
            cells.append("" if v is None else f"{v:.1f}% ({bound})")
        elif c == "compile":
            cells.append(_runs_as(row))
        else:
            cells.append(_cell(row.get(c)))
    return "| " + " | ".join(cells) + " |"


def profile_section(rows: list[dict]) -> list[str]:
    rows = [r for r in rows if r.get("profile")]
    if not rows:
        return []
    p0 = rows[0]["profile"]
    cuda = any(r["profile"]["device_busy_ms"] is not None for r in rows)
    out = [
        "",
        f"## Profile: {p0['steps']} training steps per row under torch.profiler, after timing",
        "",
        "device busy = union of CUDA kernel/memcpy/memset intervals per step (overlaps once)"
        if cuda
        else "device busy: n/a on the CPU (no device timeline)",
        "host aten ops = union of aten:: op intervals per step, host threads together (main "
        "thread; on CUDA also autograd's backward thread)",
        "wall = profiled step (profiler overhead included); step = the timed train_step_ms",
        "",
        "| model | precision | compile | wall_ms | step_ms | device_busy_ms | busy % wall | "
        "busy % step | host_aten_ms | host % wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["profile"]
        busy = p["device_busy_ms"]
        cells = [
            r["model"],
            r["precision"],
            _runs_as(r),
            _cell(p["wall_ms"]),
            _cell(r["train_step_ms"]),
            "n/a" if busy is None else _cell(busy),
            "n/a" if busy is None else f"{p['device_busy_pct']:.1f}%",
            "n/a" if busy is None else f"{100 * busy / r['train_step_ms']:.1f}%",
            _cell(p["host_ops_ms"]),
            f"{p['host_ops_pct']:.1f}%",
        ]
        out.append("| " + " | ".join(cells) + " |")
    for r in rows:
        p = r["profile"]
        out.append("")
        out.append(f"top-5 {p['top_kind']}, {r['variant']} (ms per step, calls per step):")
        for k in p["top"]:
            name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
            out.append(
                f"  {k['self_ms'] / p['steps']:9.3f} ms  {k['calls'] / p['steps']:7.1f}x  {name}"
            )
    return out


def footer(rows: list[dict]) -> list[str]:
    out = [
        "",
        "train_gflop: torch.utils.flop_counter, one training step. train_gb: bytes of every "
        "tensor each aten op reads and writes over one training step (views free), an upper "
        "bound on memory traffic without fusion; both counted uncompiled.",
    ]
    if any(r.get("roofline_ms") is not None for r in rows):
        srcs = sorted({r["peak_source"] for r in rows if r.get("peak_source")})
        out.append(
            "roofline_ms = max(FLOPs / peak FLOP/s, bytes / peak bandwidth); % of roofline = "
            "roofline_ms / train_step_ms, (compute|mem) = the larger term. Peaks: "
            + "; ".join(
                sorted(
                    {
                        f"{r['precision']} {r['peak_tflops']} TFLOP/s, {r['peak_gbs']} GB/s"
                        for r in rows
                        if r.get("roofline_ms") is not None
                    }
                )
            )
            + f" ({'; '.join(srcs)})."
        )
        tf = next((r["tf32"] for r in rows if r.get("tf32")), None)
        if tf and any(not r["bf16"] for r in rows):
            out.append(
                "fp32 rows use the plain fp32 peak; TF32 allowed: matmul "
                f"{tf['matmul']}, cuDNN {tf['cudnn']} (TF32 tensor-core peak 494 TFLOP/s on "
                "H100/H200, so where TF32 runs, the fp32 bound is loose)."
            )
    else:
        out.append(
            "roofline: no peaks known for this device (CUDA table: H100, H100 PCIe, H200); "
            "give --peak-tflops/--peak-gbs to compute one."
        )
    out.append(f"Note: {MEASURED_NOTE}.")
    return out


def run_child(args: argparse.Namespace, var: Variant, counts: bool = True) -> dict | str:
    """One row in a fresh process; the row, or a one-line failure message."""
    argv = [*sys.argv[1:], "--single", var.spec] + ([] if counts else ["--no-counts"])
    try:
        out = subprocess.run(
            [sys.executable, __file__, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=args.row_timeout,
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {args.row_timeout} s"
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        return lines[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])


#: per-process timings combined over the rounds by their median
TIMED = ["train_step_ms", "train_windows_s", "train_frames_s", "infer_windows_s", "infer_frames_s"]


def combine(rounds: list[dict], ratios: list[float | None]) -> dict:
    """One table row from a row's measurements in each round (the first one holds the counts)
    and its per-round ``vs_eager`` ratios (None where that round had no eager row).

    Timings: the median over the rounds, ``train_step_range`` their (min, max); peak memory:
    the largest; ``vs_eager``: the median of the ratios, ``vs_eager_range`` their (min, max).
    """
    row = dict(rounds[0])
    for key in TIMED:
        row[key] = statistics.median(r[key] for r in rounds)
    steps = [r["train_step_ms"] for r in rounds]
    row["train_step_range"] = (min(steps), max(steps))
    row["rounds_train_step_ms"] = steps
    row["peak_mem_mb"] = max(r["peak_mem_mb"] for r in rounds)
    if row.get("train_gflop") is not None:
        row["train_gflops_s"] = row["train_gflop"] / row["train_step_ms"] * 1e3
        row["train_gb_s"] = row["train_gb"] / row["train_step_ms"] * 1e3
    row["roofline_pct"] = roofline_pct(row.get("roofline_ms"), row["train_step_ms"])
    known = [x for x in ratios if x is not None]
    row["rounds_vs_eager"] = ratios
    row["vs_eager"] = statistics.median(known) if known else None
    row["vs_eager_range"] = (min(known), max(known)) if len(known) > 1 else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--models",
        default=",".join(MODELS),
        help="rows, MODEL[:OPT+OPT], OPT one of bf16, fp32, compile, eager, graphs",
    )
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--length", type=int, default=300)
    ap.add_argument("--encoders", choices=["none", "tcn"], default="none")
    ap.add_argument(
        "--mode",
        choices=["agnostic", "faithful"],
        default="faithful",
        help="rjca key projection (faithful = released structure)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for rows without fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile rows without eager")
    ap.add_argument("--adam", choices=list(ADAM), default="for-loop", help="Adam implementation")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--rounds", type=int, default=3, help="times the row list runs, interleaved (default 3)"
    )
    ap.add_argument("--profile", action="store_true", help="torch.profiler section per row")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, help="peak compute for the roofline")
    ap.add_argument("--peak-gbs", type=float, help="peak memory bandwidth (GB/s) for it")
    ap.add_argument("--row-timeout", type=float, help="seconds per row (default: none)")
    ap.add_argument("--json", type=Path, help="append results as JSON lines here")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    ap.add_argument("--no-counts", dest="counts", action="store_false", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        variants = parse_models(args.models, bf16=args.bf16, compile=args.compile)
        if args.single:
            single = parse_variant(args.single, bf16=args.bf16, compile=args.compile)
    except ValueError as exc:
        ap.error(str(exc))
    if args.single:  # child process: one row, JSON on stdout
        print(json.dumps(measure(args, single)))
        return
    mach = machine(args)
    print(f"# {mach}")
    print(
        f"# batch {args.batch}, T {args.length}, encoders {args.encoders}, rjca {args.mode}, "
        f"defaults bf16 {args.bf16} compile {args.compile}, Adam {args.adam}; median of "
        f"{args.repeats} after {args.warmup} warm-up per process, {args.rounds} interleaved "
        "round(s) of fresh processes",
        flush=True,
    )
    order = run_order(variants)
    runs: dict[str, list[dict]] = {v.spec: [] for v in order}
    ratios: dict[str, list[float | None]] = {v.spec: [] for v in order}
    failed: dict[str, str] = {}
    eager_spec = next((v.spec for v in order if v.model == EAGER), None)
    for r in range(args.rounds):
        eager_ms = None
        done = []
        for var in order:
            row = run_child(args, var, counts=not runs[var.spec])
            if isinstance(row, str):
                failed[var.spec] = row
                done.append(f"{var.spec} failed")
                continue
            if var.spec == eager_spec:
                eager_ms = row["train_step_ms"]
            runs[var.spec].append(row)
            ratio = None if eager_ms is None else eager_ms / row["train_step_ms"]
            ratios[var.spec].append(ratio)
            done.append(
                f"{var.spec} {row['train_step_ms']:.1f} ms"
                + ("" if ratio is None else f" ({ratio:.2f}x)")
            )
        print(f"# round {r + 1}/{args.rounds}: " + ", ".join(done), flush=True)
    print("| " + " | ".join(COLS) + " |")
    print("|" + "---|" * len(COLS))
    rows = []
    for var in order:
        if not runs[var.spec]:
            print(f"| {var.spec} | failed: {failed.get(var.spec, '?')} |")
            continue
        row = combine(runs[var.spec], ratios[var.spec])
        row.update(
            machine=mach,
            batch=args.batch,
            length=args.length,
            encoders=args.encoders,
            mode=args.mode,
            adam=args.adam,
            rounds=len(runs[var.spec]),
            eager_variant=eager_spec,
        )
        rows.append(row)
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        print(table_row(row))
    for line in profile_section(rows) + footer(rows):
        print(line)


if __name__ == "__main__":
    main()
