#!/usr/bin/env bash
# Checks of the GPU path on one GPU: the environment, the Triton kernels' self-check (what
# kernels="auto" decides at a run's first step), the compiled Triton kernels against the torch
# fallback on CUDA (fp32 and bf16 params, preconditioning on and off, aligned and unaligned
# shards), the kernel tests on CUDA, the SAM step on CUDA (tests/test_gpu.py: bf16 with the
# distributed optimizer and overlapped grad reduce / param gather, its fp32 twin against the
# reference; the gate's cotangent offload), Transformer Engine's layers and fp8 delayed scaling
# (tests/test_gpu_te.py), the SAM / AdamW step-time ratio, then the kernel bandwidth table and
# the step fraction. Context parallelism is not checked here: TE's attention at CP=2 needs 2
# GPUs (one line says so). Needs torch with CUDA and triton, and no network except to install
# Transformer Engine where it is missing (pip, then a build of several minutes that the checks'
# limits do not count); everything goes to stdout. The checks are sized for under 9 minutes on
# one H100. Every check runs even if an earlier one fails (except after a failed environment
# check); at the end one summary line per check (PASS/FAIL, name, seconds, the check's last
# output line), and the exit status is 1 when any check failed.
#
# Adding a check: one `check NAME SECONDS COMMAND...` line in the list at the bottom (a longer
# check goes into a script or module of its own, like the ones below).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

summary=()
failures=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

check() { # check NAME SECONDS COMMAND...: run one check under a time limit, record its line
  local name=$1 seconds=$2
  shift 2
  local command="$*"
  echo
  echo "=== $name: ${command%%$'\n'*} (limit ${seconds}s)"
  local start=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start)) verdict=PASS
  local last
  last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-200)
  last=${last:-"(no output)"}
  if ((rc != 0)); then
    verdict=FAIL
    failures=$((failures + 1))
    ((rc == 124)) && last="timed out after ${seconds}s; last output: $last"
  fi
  echo "=== $name: $verdict (exit status $rc, ${took}s)"
  summary+=("$(printf '%-4s  %-26s %5ss  %s' "$verdict" "$name" "$took" "$last")")
  return "$rc"
}

finish() { # the summary, one line per check; exit 1 if any failed
  echo
  echo "=== summary: ${#summary[@]} checks, $failures failed"
  printf '%s\n' "${summary[@]}"
  if ((failures)); then
    echo "FAILED"
    exit 1
  fi
  echo "all checks passed"
  exit 0
}

read -r -d '' ENVIRONMENT <<'EOF'
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

# The Transformer Engine requirement: the versions megatron-core itself names for it (0.16's
# "dev" extra: >=2.9,<2.12; 0.19's "te" extra: any), with TE's core library for the CUDA major
# version torch was built with (core_cu12 or core_cu13; an H100 runs either).
read -r -d '' TE_REQUIREMENT <<'EOF'
import re
from importlib.metadata import requires

import torch

cuda = (torch.version.cuda or "").split(".")[0]
assert cuda in ("12", "13"), f"TE ships core libraries for CUDA 12 and 13; torch has {cuda!r}"
versions = ""
for requirement in requires("megatron-core") or []:
    match = re.match(r"transformer[-_]engine\s*(\[[^\]]*\])?\s*([^;]*)", requirement)
    if match:
        versions = match.group(2).strip()
        break
print(f"transformer_engine[pytorch,core_cu{cuda}]{versions}")
EOF

echo "=== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import triton" 2>/dev/null || pip install --quiet triton \
  || echo "triton is missing and could not be installed: only the torch kernels can run"
# Transformer Engine for tests/test_gpu_te.py, which fails rather than skips without it under
# this script (MEGATRON_FSAM_REQUIRE_TE). Its PyTorch extension is a source package that pip
# compiles against the installed torch with nvcc (--no-build-isolation); with no package index
# in reach pip gives up at once (no retries), not after minutes.
export MEGATRON_FSAM_REQUIRE_TE=1
if ! python -c "import transformer_engine.pytorch" 2>/dev/null; then
  if te=$(python -c "$TE_REQUIREMENT"); then
    echo "=== installing $te (builds its PyTorch extension: several minutes)"
    NVTE_FRAMEWORK=pytorch MAX_JOBS="$(nproc)" timeout 1800 \
      pip install --quiet --retries 0 --timeout 15 --no-build-isolation "$te" \
      || echo "Transformer Engine could not be installed: the TE test will fail"
  else
    echo "no Transformer Engine for this torch: the TE test will fail"
  fi
fi

# ----- the checks ------------------------------------------------------------------------------
check "environment" 120 python -c "$ENVIRONMENT" || finish # nothing else can run
# A fresh process, as a run's first step: compile, compare with torch, print the verdict and
# what kernels="auto" uses.
check "triton self-check" 300 python -m megatron_fsam.kernels.self_check --device cuda
check "compile and check vs torch" 180 python -m launch.bench_kernels --check --no-bench
if python -c "import pytest" 2>/dev/null; then
  check "kernel tests on CUDA" 180 python -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "not subprocess"
fi
if python -c "import pytest" 2>/dev/null; then
  # The step on the GPU: bf16 with the distributed optimizer, overlap_grad_reduce and
  # overlap_param_gather, its fp32 twin against the reference, graph-safe RNG replay, CUDA-event
  # phase timers; the logit gate's cotangent offload on side streams.
  check "SAM step on CUDA" 300 python -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    tests/test_config.py
  # TE's layer spec: rho 0 bit-equal to plain training, fsam against the reference; fp8 delayed
  # scaling: a SAM step ends with a plain step's amax history, and not without the replay.
  check "Transformer Engine and fp8" 240 python -m pytest -q -p no:cacheprovider \
    tests/test_gpu_te.py
fi
echo "=== context parallelism: skipped (TE's attention at CP=2 needs 2 GPUs; these checks use 1)"
check "step ratio (bf16)" 300 python -m launch.bench_step --bf16 --layers 8 --hidden 1024 \
  --heads 8 --vocab 32768 --seq 1024 --micro-batch 4 --microbatches 4 --steps 5
check "benchmark" 240 python -m launch.bench_kernels --sweep-blocks 1024 2048 4096 8192 16384
check "step fraction" 120 python -m launch.bench_kernels --no-bench --step-model 1.3e9
finish
