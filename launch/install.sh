#!/usr/bin/env bash
# Installs megatron_fsam with everything the demo and the tests need.
# A machine without torch gets the CPU build 2.13.0 first (a bare `torch` requirement
# would pull a multi-GB CUDA build); GPU machines keep the CUDA torch they have.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet torch==2.13.0
fi
DS_BUILD_OPS=0 python -m pip install --quiet -e ".[train,kernels,megatron-lm,test]"
