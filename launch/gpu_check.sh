#!/usr/bin/env bash
# Check and time the SAM shard kernels on one GPU: compile the Triton kernels, compare them with
# the torch fallback on CUDA (fp32 and bf16 params, preconditioning on and off, aligned and
# unaligned shards), run the kernel tests on CUDA, then the benchmark and the step fraction.
# Needs torch with CUDA and triton, no network; everything goes to stdout. About 3-4 minutes on
# one H100. Every step runs even if an earlier one fails; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

failed=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo
  echo "=== $name: $* (limit ${seconds}s)"
  local start=$SECONDS
  timeout "$seconds" "$@" || failed+=("$name")
  echo "=== $name took $((SECONDS - start))s"
}

echo "=== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import triton" 2>/dev/null || pip install --quiet triton \
  || echo "triton is missing and could not be installed: only the torch kernels can run"
python - <<'EOF' || exit 1
import sys

import torch

import megatron_fsam.kernels  # must import with torch alone (no megatron-core)

assert "megatron.core" not in sys.modules, "the kernels package pulled in megatron-core"
assert torch.cuda.is_available(), "torch sees no CUDA device"
try:
    import triton

    version = triton.__version__
except ImportError:
    version = "missing"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {version}, device {torch.cuda.get_device_name()}")
EOF

step "compile and check vs torch" 180 python -m launch.bench_kernels --check --no-bench
if python -c "import pytest" 2>/dev/null; then
  step "kernel tests on CUDA" 120 python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "not subprocess"
fi
step "benchmark" 240 python -m launch.bench_kernels --sweep-blocks 1024 2048 4096 8192 16384
step "step fraction" 120 python -m launch.bench_kernels --no-bench --step-model 1.3e9

echo
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
