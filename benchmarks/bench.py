"""Throughput and memory of the fusion models, fusionkit plugins vs a plain eager baseline.

Measures per model: training step (forward + 1-CCC loss + backward + Adam step) and inference
(forward, no grad) as windows/s and frames/s, the median over timed repeats after warm-up,
peak memory (CUDA: max allocated; CPU: peak RSS of a fresh process per model), and the FLOPs
of one training step (``torch.utils.flop_counter``).

Examples::

    python benchmarks/bench.py                                   # released shapes, CPU
    python benchmarks/bench.py --encoders tcn                    # with the TCN front ends
    python benchmarks/bench.py --batch 64 --device cuda --bf16 --compile
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
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eager_baseline import EagerTAGF

from fusionkit.metrics import ccc_loss
from fusionkit.model import FusionModel
from fusionkit.registry import get_registry

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
    reg = get_registry()

    def comp(kind, cname, params=None, **kw):
        c = reg.get(kind, cname)
        return c.build(c.params.model_validate(params or {}), **kw)

    if encoders == "tcn":
        enc = nn.ModuleDict(
            {
                m: comp("encoder", "tcn", {"channels": TCN[m]}, in_dim=RAW[m], modality=m)
                for m in DIMS
            }
        )
    else:
        enc = nn.ModuleDict({m: Identity(d) for m, d in DIMS.items()})
    if name == "tagf_eager":
        return EagerWrapper(enc, length)
    dims = {m: e.out_dim for m, e in enc.items()}
    if name == "concat":
        fusion = comp("fusion", "concat", {"normalize": True}, in_dims=dims)
    else:
        fusion = comp("fusion", "rjca", {"mode": mode, "length": length}, in_dims=dims)
    gate = comp("gate", GATES[name], in_dims=dict(fusion.out_dims), num_steps=fusion.num_steps)
    head = comp("head", "regression", {"hidden": 256}, in_dim=gate.out_dim, n_targets=2)
    return FusionModel(enc, fusion, gate, head)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, name: str) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(name, args.encoders, args.mode, args.length).to(device)
    feat = RAW if args.encoders == "tcn" else DIMS
    b, t = args.batch, args.length
    inputs = {m: torch.randn(b, t, d, device=device) for m, d in feat.items()}
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    target = torch.rand(b, t, 2, device=device) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if args.compile else model

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = fwd(inputs, mask).pred
        loss = ccc_loss(pred.float(), target, mask)
        loss.backward()
        opt.step()

    def infer_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
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

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = timed(train_step, True)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    infer_s = timed(infer_step, False)
    flops = None
    if not args.compile:
        from torch.utils.flop_counter import FlopCounterMode

        model.train()
        with FlopCounterMode(display=False) as counter:
            train_step()
        flops = counter.get_total_flops()
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "train_step_ms": train_s * 1e3,
        "train_windows_s": b / train_s,
        "train_frames_s": b * t / train_s,
        "infer_windows_s": b / infer_s,
        "infer_frames_s": b * t / infer_s,
        "peak_mem_mb": peak / 2**20,
        "train_gflop": None if flops is None else flops / 1e9,
        "train_gflops_s": None if flops is None else flops / train_s / 1e9,
    }


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
    if isinstance(v, float):
        return f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
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
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="append results as JSON lines here")
    ap.add_argument("--single", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.single:  # child process: one model, JSON on stdout
        print(json.dumps(measure(args, args.single)))
        return
    print(f"# {machine(args)}")
    print(
        f"# batch {args.batch}, T {args.length}, encoders {args.encoders}, rjca {args.mode}, "
        f"bf16 {args.bf16}, compile {args.compile}, median of {args.repeats} after "
        f"{args.warmup} warm-up"
    )
    cols = [
        "model",
        "params",
        "train_step_ms",
        "train_windows_s",
        "train_frames_s",
        "infer_frames_s",
        "peak_mem_mb",
        "train_gflop",
        "train_gflops_s",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name in args.models.split(","):
        argv = [a for a in sys.argv[1:]]
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--single", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        row = json.loads(out.stdout)
        row.update(
            machine=machine(args),
            batch=args.batch,
            length=args.length,
            encoders=args.encoders,
            mode=args.mode,
            bf16=args.bf16,
            compile=args.compile,
        )
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        cells = []
        for c in cols:
            v = row[c]
            cells.append(
                f"{v:,.1f}"
                if isinstance(v, float)
                else (f"{v:,}" if isinstance(v, int) else str(v))
            )
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
