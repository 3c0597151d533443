#!/usr/bin/env bash
# One-shot GPU measurement for issue #7 (TAGF training >= 3x tagf_eager at batch 64, T = 300;
# GPU busy time against step time; FLOPs and bytes per step against the device's peaks).
#
# How a session with the device tool runs it (one call, ~10 minutes):
#
#   1. Here, in the repo root, fetch the wheels the GPU machine lacks (pydantic is missing
#      there; its own needs with it; ~2.6 MB in all, far under the 64 MiB carry limit):
#        grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 \
#          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#          pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
#          typing-inspection==0.4.2 typing-extensions==4.15.0
#      (sizes seen: pydantic 472 KB, pydantic_core cp312 manylinux2014 2.09 MB,
#      typing_extensions 45 KB, typing_inspection 15 KB, annotated_types 14 KB; one version
#      of each, or the install stops.)
#   2. The device tool's call:
#        run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600)
#      (kind: nvidia-h100-x1, the default; the roofline peak table knows H100 and H200.)
#   3. What comes back under $OUT (6 files, the limit is 8):
#        env.txt        nvidia-smi, python/torch/CUDA/cuDNN versions, TF32 flags, plugins
#        pytest.log     the CUDA tests (ids containing "cuda": bf16 autocast, no host sync)
#        bench64.log    batch 64, T 300: tagf_eager, tagf, tagf:bf16, rjca:bf16,
#                       tagf_temporal:bf16, tagf:bf16+compile, with --profile (busy time,
#                       top kernels), FLOPs, bytes and the roofline per row
#        bench12.log    the released batch 12 shapes, every model, fp32 and tagf in bf16
#        bench.jsonl    every row of both bench runs as JSON lines (batch field tells them apart)
#        quickstart.log `python -m fusionkit run recipes/quickstart.yaml training.device=cuda`
#
# What the GPU machine has (device/KINDS.md, 2026-11): Python 3.12, torch 2.11 + torchaudio,
# numpy, einops, pluggy, typer, rich, safetensors, pyyaml, matplotlib, pytest. Missing and
# needed: pydantic (+ pydantic-core, annotated-types, typing-inspection; typing-extensions is
# there but carried so the versions match pydantic's pins) -> the wheels above. Missing and not
# needed: av (PyAV) is imported only by the affwild2 media/extraction modules, never when the
# registry loads plugins, by bench.py or by `fusionkit run` on the synthetic data; matplotlib
# (there anyway) only by report plots. In step (b), test files that import av or jsonschema
# fail to collect; pytest reports them and (--continue-on-collection-errors) runs the rest.
#
# fusionkit is not pip-installed there: it runs from PYTHONPATH (repo root + plugins/). Its
# registry finds plugins only through the "fusionkit" entry-point group (importlib.metadata,
# fusionkit/registry.py), so when no such entry points are visible the script writes a minimal
# fusionkit-<version>.dist-info (METADATA + entry_points.txt from pyproject.toml) into
# /tmp/site, which is on PYTHONPATH; importlib.metadata finds it like an installed package.
#
# Time budget (each step is capped with `timeout`, and a failed or timed-out step does not stop
# the next): setup ~10 s, (a) 20 s, (b) 60 s, (c) 330 s, (d) 90 s, (e) 60 s: at most ~570 s
# of the 600 s call; expected ~6 min. Caps can be changed with T_A .. T_E (seconds). Each
# bench row also has its own cap (--row-timeout: 200 s at batch 64, for the compile row).
#
# Local smoke test of the same steps on the CPU (small shapes, no CUDA):
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
  B64=(--batch 2 --length 40 --repeats 1 --warmup 1 --threads 2)
  B12=(--batch 1 --length 40 --repeats 1 --warmup 1 --threads 2)
  BIG_MODELS="tagf_eager,tagf,tagf:bf16,rjca:bf16"
  QS_EXTRA=(training.epochs=1)
else
  B64=(--batch 64 --length 300 --repeats 10 --warmup 3)
  B12=(--batch 12 --length 300 --repeats 10 --warmup 3)
  # the compile row last: if compiling runs long, it cannot starve the other rows
  BIG_MODELS="tagf_eager,tagf,tagf:bf16,rjca:bf16,tagf_temporal:bf16,tagf:bf16+compile"
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
step "versions" "$ENV" "${T_A:-20}" -- "${PY[@]}" -c '
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

# --- (b) the CUDA tests -----------------------------------------------------------------------
# Every test file is collected (a file that cannot import, e.g. for av, is reported and skipped)
# and the tests with "cuda" in their id run: the bf16 autocast tests of encoders, rjca, gates,
# and the training step of every built-in component under CUDA sync debug mode "error".
step "cuda tests" "$OUT/pytest.log" "${T_B:-60}" -- "${PY[@]}" -m pytest -q -p no:cacheprovider \
  --continue-on-collection-errors -k cuda tests

# --- (c) issue #7: batch 64, T 300, with the profiler -----------------------------------------
step "bench batch 64" "$OUT/bench64.log" "${T_C:-330}" -- "${PY[@]}" benchmarks/bench.py \
  --device "$DEV" "${B64[@]}" --models "$BIG_MODELS" --profile --row-timeout 200 \
  --json "$OUT/bench.jsonl"

# --- (d) the released shapes: batch 12 --------------------------------------------------------
step "bench batch 12" "$OUT/bench12.log" "${T_D:-90}" -- "${PY[@]}" benchmarks/bench.py \
  --device "$DEV" "${B12[@]}" --models concat,rjca,grjca,tagf,tagf_temporal,tagf_eager,tagf:bf16 \
  --row-timeout 60 --json "$OUT/bench.jsonl"

# --- (e) a full recipe run --------------------------------------------------------------------
step "quickstart on $DEV" "$OUT/quickstart.log" "${T_E:-60}" -- "${PY[@]}" -m fusionkit run \
  recipes/quickstart.yaml "training.device=$DEV" output.dir=/tmp/fk_runs "${QS_EXTRA[@]}"

echo "=== done in $SECONDS s; files in $OUT:"
ls -la "$OUT"
