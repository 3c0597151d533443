"""Measure this machine's ceilings: matrix products and, on a GPU, a device-to-device copy.

The roofline columns of ``bench.py`` use datasheet peaks; this script measures what the device
actually reaches, so a "% of roofline" can be read against a measured ceiling too::

    python benchmarks/peaks.py            # 8192^3 bf16 matmul, 4 GiB copy, CUDA events
    python benchmarks/peaks.py --cpu --threads 2   # float32 against bf16 products on the CPU

``--cpu`` times float32 and bf16 products side by side (interleaved, median of the repeats) at
the shapes of the released TAGF step at batch 12, T = 300 (the gate's input projection and its
``Linear``, a recurrent product) and one large square product: whether bf16 autocast can pay on
this CPU (it needs AMX; ``amx`` says whether PyTorch sees it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

#: (rows, inner, columns) of products in the released TAGF step at batch 12, T = 300
CPU_SHAPES = {
    "gate input projection": (3600 * 3, 256, 2048),
    "gate Linear": (3600 * 3, 768, 512),
    "gate recurrent product": (3600, 256, 1024),
    "square 4096": (4096, 4096, 4096),
}


def timed_ms(fn, repeats: int) -> float:
    """Mean milliseconds of ``fn`` over ``repeats`` calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def cpu_products(threads: int, repeats: int) -> None:
    """GFLOP/s of float32 and bf16 products at :data:`CPU_SHAPES`, interleaved per repeat."""
    torch.set_num_threads(threads)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)()
    print(f"CPU, {threads} thread(s), AMX: {amx}, torch {torch.__version__}")
    dtypes = (torch.float32, torch.bfloat16)
    for name, (m, k, n) in CPU_SHAPES.items():
        pairs = {dt: (torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)) for dt in dtypes}
        times: dict[torch.dtype, list[float]] = {dt: [] for dt in dtypes}
        for a, b in pairs.values():  # warm-up
            for _ in range(2):
                a @ b
        for _ in range(repeats):
            for dt, (a, b) in pairs.items():
                t0 = time.perf_counter()
                a @ b
                times[dt].append(time.perf_counter() - t0)
        rate = {dt: 2 * m * k * n / statistics.median(ts) / 1e9 for dt, ts in times.items()}
        f32, b16 = rate[torch.float32], rate[torch.bfloat16]
        print(
            f"{name} ({m} x {k}) @ ({k} x {n}): float32 {f32:.0f} GFLOP/s, "
            f"bf16 {b16:.0f} GFLOP/s, bf16/float32 {b16 / f32:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="matrix side of the bf16 product")
    ap.add_argument("--copy-gib", type=float, default=4.0, help="size of the copied tensor")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cpu", action="store_true", help="float32 against bf16 products on the CPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (with --cpu)")
    args = ap.parse_args()
    if args.cpu:
        cpu_products(args.threads, args.repeats)
        return
    if not torch.cuda.is_available():
        raise SystemExit("peaks.py needs a CUDA device")
    n = args.n
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    ms = timed_ms(lambda: a @ b, args.repeats)
    print(f"{torch.cuda.get_device_name()}: bf16 {n}^3 matmul {2 * n**3 / ms / 1e9:.0f} TFLOP/s")
    numel = int(args.copy_gib * 2**30) // 4
    src = torch.empty(numel, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = timed_ms(lambda: dst.copy_(src), args.repeats)
    moved = 2 * numel * 4  # bytes read + written
    gbs = moved / ms / 1e6
    print(f"device-to-device copy of {args.copy_gib:g} GiB: {gbs:.0f} GB/s (read + write)")


if __name__ == "__main__":
    main()
