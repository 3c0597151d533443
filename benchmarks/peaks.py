"""Measure this GPU's ceilings: a bf16 matrix product and a device-to-device copy.

The roofline columns of ``bench.py`` use datasheet peaks; this script measures what the device
actually reaches, so a "% of roofline" can be read against a measured ceiling too::

    python benchmarks/peaks.py            # 8192^3 bf16 matmul, 4 GiB copy, CUDA events
"""

from __future__ import annotations

import argparse

import torch


def timed_ms(fn, repeats: int) -> float:
    """Mean milliseconds of ``fn`` over ``repeats`` calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="matrix side of the bf16 product")
    ap.add_argument("--copy-gib", type=float, default=4.0, help="size of the copied tensor")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
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
