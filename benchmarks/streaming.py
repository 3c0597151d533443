"""Per-frame latency of online (streaming) prediction on one CPU thread.

For each model, a :class:`fusionkit.engine.streaming.StreamingPredictor` with a trailing window of
``--context`` frames is fed synthetic features frame by frame (released feature sizes after the
encoders, or the TCN front ends with ``--encoders tcn``); the latency of every ``push`` is
recorded after warm-up. Real time at 30 fps needs a p99 below 33.3 ms.

    python benchmarks/streaming.py --context 300 --frames 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import DIMS, GATES, RAW, build, machine

from fusionkit.engine.streaming import StreamingPredictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default=",".join(GATES))
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--frames", type=int, default=300, help="timed frames per model")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--encoders", choices=["none", "tcn"], default="none")
    ap.add_argument("--mode", choices=["agnostic", "faithful"], default="agnostic")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.device = "cpu"
    print(f"# {machine(args)}")
    print(
        f"# context {args.context} frames, encoders {args.encoders}, rjca {args.mode}, "
        f"{args.frames} timed frames after {args.warmup}"
    )
    print("| model | p50 ms | p99 ms | max ms | frames/s (1/mean) | real time at 30 fps |")
    print("|---|---|---|---|---|---|")
    feats = RAW if args.encoders == "tcn" else DIMS
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build(name, args.encoders, args.mode, args.context).eval()
        sp = StreamingPredictor(model, feats, context=args.context)
        stream = {m: torch.randn(args.warmup + args.frames, d) for m, d in feats.items()}
        times = []
        for t in range(args.warmup + args.frames):
            frame = {m: x[t] for m, x in stream.items()}
            t0 = time.perf_counter()
            sp.push(frame)
            if t >= args.warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        p50 = statistics.median(times) * 1e3
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))] * 1e3
        fps = 1.0 / statistics.fmean(times)
        ok = "yes" if p99 < 1000 / 30 else "no"
        print(
            f"| {name} | {p50:.1f} | {p99:.1f} | {times[-1] * 1e3:.1f} | {fps:.0f} | {ok} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
