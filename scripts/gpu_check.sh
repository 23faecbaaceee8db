#!/usr/bin/env bash
# The one prepared GPU check of issue 4 (hubtool's Triton kernels), for a session lent a device machine:
#   run(command="bash scripts/gpu_check.sh", timeout_s=560)
# It runs from the repository root on the device image (its python3 holds CUDA torch and triton; nothing
# is installed, nothing is fetched): environment, the GPU tests, then the kernel benchmark on CUDA with
# CUDA graphs at M = 1..256. Logs and bench_kernels.json land in $OUT (or /tmp/gpu_check) and the JSON
# is printed at the end. Steps have their own time limits so a hang in one still leaves the others' output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HUBTOOL_CACHE="${HUBTOOL_CACHE:-/tmp/hubtool-cache}" HUBTOOL_LOG=INFO
unset TRITON_INTERPRET HUBTOOL_KERNEL HUBTOOL_CPU_ISA

echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
timeout 120 "$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.log"
import json, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
print("triton", triton.__version__)
from hubtool.runtime.backends import describe_kernels
print(json.dumps(describe_kernels(build=True), indent=1))
PYEOF

echo "== GPU tests"
timeout 200 "$PY" -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== kernel benchmark (CUDA graphs)"
timeout 220 "$PY" - "$OUT/bench_kernels.json" <<'PYEOF' 2>&1 | tee "$OUT/bench.log"
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from hubtool import bench_kernels as bk
res = bk.run(sys.argv[1], cpu=False, cuda=True, cuda_ms=(1, 2, 4, 8, 16, 32, 64, 128, 256))
print(bk.format_table(res))
PYEOF
bench_rc=${PIPESTATUS[0]}

echo "== bench_kernels.json"
cat "$OUT/bench_kernels.json" 2>/dev/null || echo "(no JSON written)"
echo "== gpu tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
