"""Grid throughput on the CPU: wall time, CPU busy share and runs per hour of one grid.

Runs ``fusionkit run RECIPE -j J`` with the given overrides into a fresh folder and reports
the wall time, the CPU time of all processes involved (user + system, from the children's
resource usage), the CPU busy share (CPU time / (wall time x available cores)) and the runs
per hour. ``--source DIR`` runs the fusionkit found in DIR (a checkout of another commit,
put first on PYTHONPATH) instead of the installed one, so that two versions can be measured
side by side on the same machine and grid.

Example (the numbers in docs/benchmarks.md):

    python benchmarks/grid_throughput.py recipes/ablations/fusion_gate.yaml -j 2 \\
        training.epochs=5 'sweep={training.seed: [0, 1, 2]}'
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(recipe: str, overrides: list[str], workers: int, source: str | None) -> dict:
    out = tempfile.mkdtemp(prefix="gridbench-")
    env = dict(os.environ)
    if source:
        src = Path(source).resolve()
        env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "plugins")])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # run from the output folder: `python -m` puts the working directory first on sys.path,
    # which from a checkout's root would shadow --source with that checkout's fusionkit
    proc = subprocess.run(
        [sys.executable, "-m", "fusionkit", "run", str(Path(recipe).resolve()), *overrides,
         f"output.dir={out}", "-j", str(workers), "-q"],
        env=env, cwd=out, capture_output=True, text=True, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"grid failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    runs = sum(1 for _ in Path(out).rglob("metrics.json"))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cores = len(os.sched_getaffinity(0))
    return {
        "source": source or "installed",
        "runs": runs,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cpu_busy_pct": round(100 * cpu / (wall * cores), 1),
        "runs_per_hour": round(3600 * runs / wall, 1),
        "output": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("-j", "--workers", type=int, default=2)
    ap.add_argument(
        "--source", action="append", default=[], help="a checkout to run instead (repeatable)"
    )
    ap.add_argument("--installed", action="store_true", help="also measure the installed one")
    args = ap.parse_args()
    sources = list(args.source) + ([None] if args.installed or not args.source else [])
    for src in sources:
        print(json.dumps(measure(args.recipe, args.overrides, args.workers, src)), flush=True)


if __name__ == "__main__":
    main()
