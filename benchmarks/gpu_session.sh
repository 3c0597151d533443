#!/usr/bin/env bash
# Every GPU number of docs/benchmarks.md in one run of about 6 minutes (at most ~9.5):
# TAGF training throughput against the eager re-creation of the released code (tagf_eager) in
# fp32, bf16, bf16 + torch.compile and bf16 + CUDA graphs at batch 64 and at the released batch
# 12 (T = 300), GPU busy time against step time (torch.profiler), FLOPs and bytes per step
# against the device's peaks (roofline; H100/H200 known) and its measured ceilings, the CUDA
# tests, and the quickstart recipe trained on CUDA, eagerly and with training.cuda_graphs.
#
# Run it from anywhere on a machine with a CUDA GPU and a Python that has torch:
#
#   bash benchmarks/gpu_session.sh                 # results in ./gpu_out
#   OUT=/tmp/gpu_out PYTHON=python3.12 bash benchmarks/gpu_session.sh
#
# fusionkit need not be installed: the script puts the repository and plugins/ on PYTHONPATH
# and, when no "fusionkit" entry points are visible, writes a minimal fusionkit dist-info
# (METADATA + entry_points.txt from pyproject.toml) into $FK_SITE (default /tmp/site), where
# importlib.metadata finds the plugins. Dependencies the machine lacks (pydantic and its own
# needs, typically) can be put as wheels into .whl/ in the repository root; they are installed
# into $FK_SITE without network access, e.g. fetched beforehand on another machine with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection typing-extensions
# (one version of each, matching pydantic's pins). PyAV is not needed: only the Aff-Wild2
# extraction modules import it; test files that need it are reported and skipped.
#
# What it writes to $OUT:
#   env.txt        nvidia-smi, python/torch/CUDA/cuDNN versions, TF32 flags, plugins, and the
#                  measured bf16 matmul and copy ceilings (benchmarks/peaks.py)
#   pytest.log     the CUDA tests (ids containing "cuda": bf16 autocast, no host sync)
#   bench64.log    batch 64, T 300: tagf_eager, tagf, tagf:bf16, tagf:bf16+graphs, rjca:bf16,
#                  rjca:bf16+graphs, tagf_temporal:bf16, tagf:bf16+compile, with --profile
#                  (busy time, top kernels), FLOPs, bytes and the roofline per row
#   levers.log     the TAGF gate (batch 12, T 300) through nn.LSTM (cuDNN) and through the
#                  fused step_scores, forward + backward: which one a GPU should use
#   bench12.log    the released batch 12 shapes, every model, fp32, and tagf in bf16 with and
#                  without CUDA graphs
#   bench.jsonl    every row of both bench runs as JSON lines (the batch field tells them apart)
#   quickstart.log `python -m fusionkit run recipes/quickstart.yaml training.device=cuda`, then
#                  the same with training.cuda_graphs=true
#
# Each step is capped with `timeout`, and a failed or timed-out step does not stop the next:
# setup ~10 s, (a) 30 s, (b) 60 s, (c) 250 s, (c2) 40 s, (d) 110 s, (e) 2 x 40 s, ~580 s
# at most (the first run on an H200 took 270 s); the caps are T_A .. T_F (seconds). Each
# bench row has its own cap too (--row-timeout: 120 s at batch 64, for the compile row). GPU
# timings are steady, so each bench row runs once (--rounds 1). In the CPU check below
# (FK_QUICK=1) the levers step runs the full CPU shapes and may hit its cap; that is harmless.
#
# The same steps on the CPU with tiny shapes, to check the script itself:
#   FK_DEVICE=cpu FK_QUICK=1 OUT=/tmp/gpu_out bash benchmarks/gpu_session.sh

set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
DEV=${FK_DEVICE:-cuda}
SITE=${FK_SITE:-/tmp/site}
read -ra PY <<<"${PYTHON:-python3}" # an array: PYTHON may carry flags
mkdir -p "$SITE"

if [ "${FK_QUICK:-0}" = 1 ]; then # CPU smoke test of this script: tiny shapes
  B64=(--batch 2 --length 40 --repeats 1 --warmup 1 --threads 2 --rounds 1)
  B12=(--batch 1 --length 40 --repeats 1 --warmup 1 --threads 2 --rounds 1)
  BIG_MODELS="tagf_eager,tagf,tagf:bf16,rjca:bf16"
  SMALL_MODELS="concat,rjca,tagf,tagf_eager,tagf:bf16"
  QS_EXTRA=(training.epochs=1)
else
  B64=(--batch 64 --length 300 --repeats 10 --warmup 3 --rounds 1)
  B12=(--batch 12 --length 300 --repeats 10 --warmup 3 --rounds 1)
  # the compile row last: if compiling runs long, it cannot starve the other rows
  BIG_MODELS="tagf_eager,tagf,tagf:bf16,tagf:bf16+graphs,rjca:bf16,rjca:bf16+graphs"
  BIG_MODELS+=",tagf_temporal:bf16,tagf:bf16+compile"
  SMALL_MODELS="concat,rjca,grjca,tagf,tagf_temporal,tagf_eager,tagf:bf16,tagf:bf16+graphs"
  QS_EXTRA=()
fi

step() { # step NAME LOG CAP -- command...: run capped, log, never abort the script
  local name=$1 log=$2 cap=$3
  shift 4
  echo "=== $name (cap ${cap}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$log"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

# --- setup: carried wheels, PYTHONPATH, entry points ------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  "${PY[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || echo "!!! wheel install failed"
fi
export PYTHONPATH="$SITE:$PWD:$PWD/plugins${PYTHONPATH:+:$PYTHONPATH}"
"${PY[@]}" - "$SITE" <<'EOF' || echo "!!! entry-point setup failed"
import importlib.metadata as md
import sys
from pathlib import Path

if md.entry_points(group="fusionkit"):
    print("fusionkit entry points already visible (installed); nothing written")
    sys.exit(0)
import tomllib

proj = tomllib.loads(Path("pyproject.toml").read_text())["project"]
d = Path(sys.argv[1]) / f"fusionkit-{proj['version']}.dist-info"
d.mkdir(parents=True, exist_ok=True)
(d / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: fusionkit\nVersion: {proj['version']}\n"
)
eps = proj["entry-points"]["fusionkit"]
(d / "entry_points.txt").write_text(
    "[fusionkit]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(eps.items()))
)
print(f"wrote {d} with {len(eps)} fusionkit entry points")
EOF

# --- (a) machine and versions -----------------------------------------------------------------
ENV="$OUT/env.txt"
{
  date -u
  nvidia-smi || echo "nvidia-smi not available"
} >"$ENV" 2>&1
step "versions" "$ENV" "${T_A:-30}" -- "${PY[@]}" -c '
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, p.total_memory // 2**20, "MiB,", p.multi_processor_count, "SMs")
    print("tf32 matmul", torch.backends.cuda.matmul.allow_tf32, "cudnn", torch.backends.cudnn.allow_tf32)
import pydantic, fusionkit
from fusionkit.core.registry import get_registry
r = get_registry()
print("pydantic", pydantic.__version__, "fusionkit", fusionkit.__file__)
print("plugin failures:", [(f.plugin, f.error) for f in r.failures])
print("components:", ", ".join(f"{c.kind}/{c.name}" for c in r.components()))
'

if [ "$DEV" = cuda ]; then
  step "ceilings" "$ENV" 30 -- "${PY[@]}" benchmarks/peaks.py
fi

# --- (b) the CUDA tests -----------------------------------------------------------------------
# Every test file is collected (a file that cannot import, e.g. for av, is reported and skipped)
# and the tests with "cuda" in their id run: the bf16 autocast tests of encoders, rjca, gates,
# and the training step of every built-in component under CUDA sync debug mode "error".
step "cuda tests" "$OUT/pytest.log" "${T_B:-60}" -- "${PY[@]}" -m pytest -q -p no:cacheprovider \
  --continue-on-collection-errors -k cuda tests

# --- (c) batch 64, T 300, with the profiler ----------------------------------------------------
step "bench batch 64" "$OUT/bench64.log" "${T_C:-250}" -- "${PY[@]}" benchmarks/bench.py \
  --device "$DEV" "${B64[@]}" --models "$BIG_MODELS" --profile --row-timeout 120 \
  --json "$OUT/bench.jsonl"

# --- (c2) the TAGF gate on the GPU: nn.LSTM (cuDNN) against the fused step_scores -----------
# (TAGFGate.fused picks the modules on a GPU by default, the fused path on the CPU)
step "gate levers" "$OUT/levers.log" "${T_F:-40}" -- "${PY[@]}" benchmarks/levers.py \
  --device "$DEV" --groups gate --no-compile --repeats 10

# --- (d) the released shapes: batch 12 --------------------------------------------------------
step "bench batch 12" "$OUT/bench12.log" "${T_D:-110}" -- "${PY[@]}" benchmarks/bench.py \
  --device "$DEV" "${B12[@]}" --models "$SMALL_MODELS" --row-timeout 60 --json "$OUT/bench.jsonl"

# --- (e) a full recipe run --------------------------------------------------------------------
step "quickstart on $DEV" "$OUT/quickstart.log" "${T_E:-40}" -- "${PY[@]}" -m fusionkit run \
  recipes/quickstart.yaml "training.device=$DEV" output.dir=/tmp/fk_runs "${QS_EXTRA[@]}"
if [ "$DEV" = cuda ]; then
  step "quickstart with CUDA graphs" "$OUT/quickstart.log" "${T_E:-40}" -- "${PY[@]}" -m \
    fusionkit run recipes/quickstart.yaml training.device=cuda training.cuda_graphs=true \
    output.dir=/tmp/fk_runs output.name=quickstart_graphs
fi

echo "=== done in $SECONDS s; files in $OUT:"
ls -la "$OUT"
